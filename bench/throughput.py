"""Training throughput: packed rows (ours) vs one padded sample per row (MiniMind's way), in one run.

Counts real (non-padding) tokens per second through forward + backward + AdamW step, and MFU against
the matmul peak measured on the same device in the same run (bf16 on CUDA, fp32 on CPU).

    python bench/throughput.py                       # CPU, SFT corpus of ../shared, tiny model
    python bench/throughput.py --device cuda --preset minimind-3 --seq_len 768 --batch_size 16

Prints a table and writes JSON with ``--out``. Compare the two rows as a ratio: shared machines are noisy.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from minimind_pl.config import ModelConfig
from minimind_pl.data import SFTDataModule
from minimind_pl.losses import causal_lm_loss
from minimind_pl.model import MiniMindForCausalLM

SHARED = Path(__file__).resolve().parents[2] / "shared"


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """Measured FLOP/s of a square matmul: the denominator of MFU."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def batches(packing: bool, args) -> list[dict]:
    """The first ``steps`` batches of the SFT corpus with or without packing."""
    dm = SFTDataModule(train_path=str(args.data), seq_len=args.seq_len, batch_size=args.batch_size,
                       tokenizer=str(SHARED / "minimind"), packing=packing, num_workers=0,
                       cache_dir=args.cache_dir)
    dm.prepare_data()
    dm.setup("fit")
    out = []
    for batch in dm.train_dataloader():
        out.append(batch)
        if len(out) == args.steps + args.warmup:
            break
    return out


def measure(model, optimizer, data: list[dict], device, dtype, warmup: int) -> tuple[float, float]:
    """(real tokens per second, seconds) over the batches after ``warmup``."""
    real, start = 0, 0.0
    for i, batch in enumerate(data):
        if i == warmup:
            sync(device)
            start, real = time.perf_counter(), 0
        batch = {k: v.to(device) if k != "real_tokens" else v for k, v in batch.items()}
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(batch["input_ids"], position_ids=batch.get("position_ids"), doc_ids=batch.get("doc_ids"))
            loss = causal_lm_loss(out.logits, batch["labels"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        real += int(batch["real_tokens"])
    sync(device)
    seconds = time.perf_counter() - start
    return real / seconds, seconds


def main() -> None:
    """Run both modes on the same model and data, print a table, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="debug")
    parser.add_argument("--data", type=Path, default=SHARED / "corpus" / "sft_real.jsonl")
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--cache_dir", default="/tmp/minimind_pl-bench-cache")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = ModelConfig.from_preset(args.preset)
    peak = matmul_peak(device, dtype)
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "preset": args.preset, "seq_len": args.seq_len, "batch_size": args.batch_size,
               "matmul_peak_tflops": peak / 1e12, "modes": {}}
    flops_per_token = 6 * config.num_parameters()[1] + 12 * config.num_hidden_layers * config.hidden_size * args.seq_len
    for name, packing in (("padded (MiniMind)", False), ("packed (ours)", True)):
        torch.manual_seed(0)
        model = MiniMindForCausalLM(config).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        data = batches(packing, args)
        fraction = sum(int(b["real_tokens"]) for b in data) / sum(b["input_ids"].numel() for b in data)
        tok_s, seconds = measure(model, optimizer, data, device, dtype, args.warmup)
        results["modes"][name] = {"real_tokens_per_s": tok_s, "real_token_fraction": fraction,
                                  "mfu": tok_s * flops_per_token / peak, "seconds": seconds}
    modes = results["modes"]
    results["packed_over_padded"] = modes["packed (ours)"]["real_tokens_per_s"] / modes["padded (MiniMind)"]["real_tokens_per_s"]
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    print(f"device {results['device']}, {args.preset}, seq {args.seq_len} x batch {args.batch_size}, "
          f"matmul peak {results['matmul_peak_tflops']:.3f} TFLOP/s")
    print(f"{'mode':<20}{'real tok/s':>12}{'real frac':>11}{'MFU':>8}")
    for name, r in modes.items():
        print(f"{name:<20}{r['real_tokens_per_s']:>12.0f}{r['real_token_fraction']:>11.1%}{r['mfu']:>8.1%}")
    print(f"packed / padded real tokens per second: {results['packed_over_padded']:.2f}x")


if __name__ == "__main__":
    main()
