"""FSDP and DeepSpeed on one GPU: each stage trains under each strategy, its checkpoint is read by the tools, and the
trained model gives the logits of the same run on a single device.

For pretrain, LoRA and DPO and each strategy (``auto`` = single device, ``fsdp``, ``deepspeed_stage_2``,
``deepspeed_stage_3``): ``python main.py fit`` with the shipped config, a small model and a few steps on the
corpus; then ``python main.py export`` of its ``last.ckpt`` (a folder under DeepSpeed) and the logits of the exported
model on held-out text against the single-device run's. Lightning's FSDP and DeepSpeed need CUDA, so this runs on a
GPU only (``bash bench/gpu_check.sh scaleout``).

    python bench/scaleout_check.py --corpus ../shared/corpus --tokenizer ../shared/minimind --out results.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from minimind_pl.checkpoints import load_model
from minimind_pl.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
STAGES = {"pretrain": "pretrain_real.jsonl", "lora": "sft_real.jsonl", "dpo": "dpo_real.jsonl"}
STRATEGIES = ("auto", "fsdp", "deepspeed_stage_2", "deepspeed_stage_3")
MODEL = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4}


def fit(stage: str, strategy: str, work: Path, args: argparse.Namespace, init: Path | None) -> dict[str, Any]:
    """One training run; returns its exit code, seconds, the checkpoint and the end of its log on failure."""
    folder = work / f"{stage}-{strategy}"
    command = [sys.executable, str(REPO / "main.py"), "fit", "--config", str(REPO / "configs" / "minimind3" / f"{stage}.yaml"),
               *[a for k, v in MODEL.items() for a in (f"--model.config.{k}", str(v))],
               "--model.init_weights", str(init) if init else "null", "--model.compile", "false",
               "--data.train_path", str(args.corpus / STAGES[stage]), "--data.val_path", "null",
               "--data.val_fraction", "0.05", "--data.tokenizer", str(args.tokenizer), "--data.seq_len", "256",
               "--data.batch_size", "8", "--data.num_workers", "2", "--data.cache_dir", str(work / "cache"),
               "--trainer.strategy", strategy, "--trainer.devices", "1", "--trainer.precision", "32-true",
               "--trainer.max_steps", str(args.steps), "--trainer.max_epochs", "100",
               "--trainer.val_check_interval", str(args.steps), "--trainer.limit_val_batches", "2",
               "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "2",
               "--trainer.logger.init_args.save_dir", str(folder / "logs"),
               "--trainer.callbacks", json.dumps([{"init_args": {"dirpath": str(folder / "ckpt"),
                                                                 "every_n_train_steps": args.steps}}])]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    out = {"exit": result.returncode, "seconds": round(time.perf_counter() - start, 1),
           "checkpoint": str(folder / "ckpt" / "last.ckpt")}
    if result.returncode:
        out["log"] = result.stderr[-2500:]
    return out


def export_and_logits(checkpoint: str, work: Path, ids: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor | None]:
    """``main.py export`` to a MiniMind .pth, then the exported model's logits (float32, CPU)."""
    out = work / (Path(checkpoint).parent.parent.name + ".pth")
    result = subprocess.run([sys.executable, str(REPO / "main.py"), "export", "--ckpt", checkpoint, "--out", str(out),
                             "--format", "minimind"], capture_output=True, text=True, cwd=REPO)
    if result.returncode:
        return {"export_exit": result.returncode, "export_log": result.stderr[-2000:]}, None
    model = load_model(out, device="cpu")
    with torch.no_grad():
        return {"export_exit": 0, "checkpoint_is_folder": Path(checkpoint).is_dir()}, model(ids).logits.float()


def held_out_ids(args: argparse.Namespace) -> torch.Tensor:
    tokenizer = Tokenizer.from_file(str(args.tokenizer))
    text = json.loads((args.corpus / "pretrain_real_val.jsonl").read_text(encoding="utf-8").splitlines()[0])["text"]
    return torch.tensor([[tokenizer.bos_id] + tokenizer.encode(text)[:127]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/scaleout"))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    ids, results = held_out_ids(args), {}
    reference: dict[str, torch.Tensor] = {}
    init = None
    for stage in STAGES:
        for strategy in args.strategies.split(","):
            run = fit(stage, strategy, args.work, args, init)
            if run["exit"] == 0:
                exported, logits = export_and_logits(run["checkpoint"], args.work, ids)
                run.update(exported)
                if logits is not None:
                    reference.setdefault(stage, logits)  # the single-device run comes first
                    run["max_logit_diff_vs_single"] = float((logits - reference[stage]).abs().max())
            results[f"{stage}/{strategy}"] = run
            print(f"{stage:<9}{strategy:<20}{json.dumps({k: v for k, v in run.items() if 'log' not in k})}", flush=True)
            if args.out:
                args.out.write_text(json.dumps(results, indent=2))
        if stage == "pretrain":
            init = Path(results["pretrain/auto"]["checkpoint"])  # LoRA and DPO start from the single-device run
    print(f"\n{'run':<32}{'exit':>5}{'s':>7}{'export':>8}{'max |Δlogit|':>14}")
    for name, run in results.items():
        diff = run.get("max_logit_diff_vs_single")
        print(f"{name:<32}{run['exit']:>5}{run['seconds']:>7}{str(run.get('export_exit', '-')):>8}"
              f"{'-' if diff is None else f'{diff:.2e}':>14}")


if __name__ == "__main__":
    main()
