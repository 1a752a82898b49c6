"""Training throughput in real (non-padding) tokens per second and MFU, every mode in one process and run.

Each mode trains a fresh model on the same batches (real text from ../shared/corpus, MiniMind's tokenizer) and
times the optimizer steps after a warm-up (which also absorbs compilation):

- ``fit``: our ``Pretrain`` / ``SFT`` stage through ``lightning.Trainer.fit``, as ``main.py fit`` runs it
  (fused AdamW, clipping at 1.0, the non-finite step guard, logging), without a logger or progress bar;
- ``loop``: a bare PyTorch loop with the same model, kernels, batches and optimizer: forward, loss,
  backward, clip, step. ``fit / loop`` is what Lightning costs.

Modes are named ``<data>-<runner>[-<variant>]``: data ``pretrain`` (packed rows), ``sft`` (packed
conversations), ``padded`` (SFT conversations one per row, padded: MiniMind's way) or ``moe`` (pretrain rows,
the preset with 4 experts, top-1: ``minimind-3-moe`` on CUDA); variants ``eager`` (not compiled, dense document mask) and ``dense`` (compiled,
dense document mask instead of FlexAttention). Unnamed variants take the defaults (on CUDA: compiled, with
FlexAttention; on the CPU: eager).

    python bench/throughput.py                        # CPU: padded vs packed, fit vs loop, debug model
    python bench/throughput.py --device cuda          # GPU: minimind-3 at 64 x 1024, every mode (~5 min)
    python bench/throughput.py --device cuda --modes pretrain-fit,pretrain-loop --steps 30

Prints a table and writes JSON with ``--out``. Compare modes as ratios: shared machines are noisy.
FLOPs per token are PaLM's (6N + 12·L·H·D·T, ``minimind_pl.throughput``); the peak is measured in the same
run (bf16 matmuls on CUDA, float32 on the CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from minimind_pl.config import ModelConfig
from minimind_pl.data import PretrainDataModule, SFTDataModule
from minimind_pl.losses import causal_lm_loss
from minimind_pl.model import MiniMindForCausalLM
from minimind_pl.stages import SFT, Pretrain
from minimind_pl.stages.base import lr_multiplier
from minimind_pl.stages.compiled import CompiledTraining
from minimind_pl.throughput import flops_per_token, matmul_peak_tflops, synchronize

SHARED = Path(__file__).resolve().parents[2] / "shared"
CPU_MODES = "padded-loop,sft-loop,pretrain-loop,pretrain-fit"
# most wanted first: a run cut short by a time limit still has them (the JSON is written after every mode)
CUDA_MODES = "pretrain-fit,pretrain-loop,sft-fit,moe-fit,pretrain-fit-dense,pretrain-fit-eager,padded-fit-eager"


@dataclasses.dataclass
class Mode:
    """One measured configuration, parsed from its name."""

    name: str
    data: str  # pretrain | sft | padded | moe
    runner: str  # fit | loop
    compile: bool
    flex: bool

    @classmethod
    def parse(cls, name: str, device: torch.device) -> "Mode":
        data, runner, *variant = name.split("-")
        if data not in ("pretrain", "sft", "padded", "moe") or runner not in ("fit", "loop") or \
                variant not in ([], ["eager"], ["dense"]):
            raise SystemExit(f"unknown mode {name!r}: <pretrain|sft|padded|moe>-<fit|loop>[-eager|-dense]")
        fast = device.type == "cuda" and variant != ["eager"]
        return cls(name, data, runner, compile=fast, flex=fast and variant != ["dense"])


# ----------------------------------------------------------------------------- data


def corpus_batches(data: str, args: argparse.Namespace) -> list[dict[str, torch.Tensor]]:
    """``warmup + steps`` batches of real text (the corpus read again from the start when it runs out)."""
    common = dict(seq_len=args.seq_len, batch_size=args.batch_size, tokenizer=str(args.tokenizer), num_workers=0,
                  cache_dir=args.cache_dir, val_fraction=0.0)
    if data in ("pretrain", "moe"):
        module = PretrainDataModule(train_path=str(args.corpus / "pretrain_real.jsonl"), **common)
    else:
        module = SFTDataModule(train_path=str(args.corpus / "sft_real.jsonl"), packing=data == "sft", **common)
    module.prepare_data()
    module.setup("fit")
    wanted, batches = args.warmup + args.steps, []
    while len(batches) < wanted:
        for batch in module.train_dataloader():
            batches.append(batch)
            if len(batches) == wanted:
                break
    return batches


def model_config(mode: Mode, args: argparse.Namespace) -> ModelConfig:
    """The preset; for ``moe`` modes its mixture-of-experts form (4 experts, top-1, as ``minimind-3-moe``)."""
    moe = {"use_moe": True, "num_experts": 4, "num_experts_per_tok": 1} if mode.data == "moe" else {}
    config = ModelConfig.from_preset(args.preset, **moe)
    if config.max_position_embeddings < args.seq_len:
        config = ModelConfig.from_preset(args.preset, **moe, max_position_embeddings=args.seq_len)
    return config


# ----------------------------------------------------------------------------- runners


def run_loop(mode: Mode, config: ModelConfig, batches: list[dict], device: torch.device, args) -> dict[str, Any]:
    """A bare PyTorch loop: what ``fit`` does per step, without Lightning."""
    torch.manual_seed(0)
    model = MiniMindForCausalLM(config).to(device).train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                                  lr=5e-4, betas=(0.9, 0.95), fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, len(batches), 0, 0.1))
    compiled = CompiledTraining(model, flex_attention=mode.flex) if mode.compile else None
    loss_fn = compiled.loss(causal_lm_loss) if compiled else causal_lm_loss
    timer = StepTimer(args.warmup, device)
    for i, batch in enumerate(batches):
        timer.step_start(i)
        batch = {k: v.to(device, non_blocking=True) if k != "real_tokens" else v for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = compiled.forward(batch) if compiled else model(
                batch["input_ids"], position_ids=batch.get("position_ids"), doc_ids=batch.get("doc_ids"))
            loss = loss_fn(out.logits, batch["labels"]) + out.aux_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        timer.step_end(i, batch, loss)
    return timer.result()


def run_fit(mode: Mode, config: ModelConfig, batches: list[dict], device: torch.device, args) -> dict[str, Any]:
    """Our stage through ``Trainer.fit`` on the same batches."""
    torch.manual_seed(0)
    stage_class = Pretrain if mode.data in ("pretrain", "moe") else SFT
    stage = stage_class(config=config, learning_rate=5e-4, seq_len=args.seq_len, compile=mode.compile,
                        flex_attention=mode.flex, peak_tflops=0)
    timer = FitTimer(args.warmup, device)
    trainer = L.Trainer(accelerator=device.type, devices=1, max_steps=len(batches), gradient_clip_val=1.0,
                        precision="bf16-mixed" if device.type == "cuda" else "32-true", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[timer])
    loader = DataLoader(batches, batch_size=None, shuffle=False, pin_memory=device.type == "cuda")
    trainer.fit(stage, train_dataloaders=loader)
    return timer.result()


class StepTimer:
    """Times steps ``warmup`` .. end (waiting for the device at both ends) and counts their real tokens."""

    def __init__(self, warmup: int, device: torch.device) -> None:
        self.warmup, self.device = warmup, device
        self.start, self.seconds, self.real_tokens, self.losses = 0.0, 0.0, 0, []

    def step_start(self, index: int) -> None:
        if index == self.warmup:
            synchronize(self.device)
            self.start = time.perf_counter()

    def step_end(self, index: int, batch: dict, loss: torch.Tensor) -> None:
        self.losses.append(loss.detach())
        if index >= self.warmup:
            self.real_tokens += int(batch["real_tokens"])  # kept on the CPU: no sync

    def result(self) -> dict[str, Any]:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self.start
        losses = [float(v) for v in self.losses]
        return {"real_tokens_per_s": self.real_tokens / self.seconds, "seconds": self.seconds,
                "first_loss": losses[0], "last_loss": losses[-1], "finite": all(math.isfinite(v) for v in losses)}


class FitTimer(L.Callback):
    """``StepTimer`` driven by Lightning's batch hooks."""

    def __init__(self, warmup: int, device: torch.device) -> None:
        self.timer = StepTimer(warmup, device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.timer.step_start(batch_idx)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.timer.step_end(batch_idx, batch, outputs["loss"])

    def result(self) -> dict[str, Any]:
        return self.timer.result()


# ----------------------------------------------------------------------------- main


def measure(mode: Mode, args: argparse.Namespace, device: torch.device, peak: float) -> dict[str, Any]:
    config = model_config(mode, args)
    batches = corpus_batches(mode.data, args)
    fraction = sum(int(b["real_tokens"]) for b in batches) / sum(b["input_ids"].numel() for b in batches)
    result = (run_fit if mode.runner == "fit" else run_loop)(mode, config, batches, device, args)
    torch._dynamo.reset()  # each mode compiles its own model
    return {**result, **dataclasses.asdict(mode), "real_token_fraction": fraction,
            "mfu": result["real_tokens_per_s"] * flops_per_token(config, args.seq_len) / (peak * 1e12)}


def ratios(results: dict[str, dict]) -> dict[str, float]:
    """The ratios the targets are stated in, for the modes that were run."""
    pairs = {"fit_over_loop": ("pretrain-fit", "pretrain-loop"), "sft_over_pretrain": ("sft-fit", "pretrain-fit"),
             "moe_over_dense": ("moe-fit", "pretrain-fit"), "flex_over_dense_mask": ("pretrain-fit", "pretrain-fit-dense"),
             "compiled_over_eager": ("pretrain-fit", "pretrain-fit-eager"),
             "packed_over_padded": ("sft-loop", "padded-loop"), "packed_fit_over_padded_fit": ("sft-fit", "padded-fit-eager")}
    return {name: results[a]["real_tokens_per_s"] / results[b]["real_tokens_per_s"]
            for name, (a, b) in pairs.items() if a in results and b in results}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--modes", default=None, help=f"comma-separated; default on CPU {CPU_MODES}, on CUDA {CUDA_MODES}")
    parser.add_argument("--preset", default=None, help="model preset (default: debug on CPU, minimind-3 on CUDA)")
    parser.add_argument("--seq_len", type=int, default=None, help="row length (default 256 on CPU, 1024 on CUDA)")
    parser.add_argument("--batch_size", type=int, default=None, help="rows per step (default 8 on CPU, 64 on CUDA)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10 on CPU, 20 on CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2 on CPU, 6 on CUDA)")
    parser.add_argument("--corpus", type=Path, default=SHARED / "corpus")
    parser.add_argument("--tokenizer", type=Path, default=SHARED / "minimind")
    parser.add_argument("--cache_dir", default="/tmp/minimind_pl-bench-cache")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    defaults = {"modes": CUDA_MODES if cuda else CPU_MODES, "preset": "minimind-3" if cuda else "debug",
                "seq_len": 1024 if cuda else 256,
                "batch_size": 64 if cuda else 8, "steps": 20 if cuda else 10, "warmup": 6 if cuda else 2}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main() -> None:
    """Run every mode, print a table, optionally write JSON."""
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_float32_matmul_precision("highest")
        peak = matmul_peak_tflops(device, torch.float32, size=1024, repeats=5)
    else:
        torch.set_float32_matmul_precision("high")
        peak = matmul_peak_tflops(device)
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "lightning": L.__version__, "date": time.strftime("%Y-%m-%d"),
        "preset": args.preset, "seq_len": args.seq_len, "batch_size": args.batch_size, "steps": args.steps,
        "warmup": args.warmup, "matmul_peak_tflops": peak, "modes": {}}
    for name in args.modes.split(","):
        mode = Mode.parse(name, device)
        results["modes"][name] = measure(mode, args, device, peak)
        print(f"  {name}: {results['modes'][name]['real_tokens_per_s']:,.0f} real tokens/s", flush=True)
        results["ratios"] = ratios(results["modes"])
        if args.out:
            args.out.write_text(json.dumps(results, indent=2))
    print_table(results)


def print_table(results: dict[str, Any]) -> None:
    print(f"\n{results['device']}, {results['preset']}, {results['batch_size']} x {results['seq_len']}, "
          f"matmul peak {results['matmul_peak_tflops']:.3f} TFLOP/s, torch {results['torch']}")
    print(f"{'mode':<22}{'real tok/s':>13}{'real share':>12}{'MFU':>8}{'loss':>16}")
    for name, r in results["modes"].items():
        loss = f"{r['first_loss']:.2f}->{r['last_loss']:.2f}" if r["finite"] else "NOT FINITE"
        print(f"{name:<22}{r['real_tokens_per_s']:>13,.0f}{r['real_token_fraction']:>12.1%}{r['mfu']:>8.1%}{loss:>16}")
    for name, value in results["ratios"].items():
        print(f"{name}: {value:.3f}")


if __name__ == "__main__":
    main()
