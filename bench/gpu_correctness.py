"""Correctness of the GPU fast path, on a CUDA device (the CPU suite covers what runs on the CPU).

Each check compares a fast path with the plain one on the same inputs and writes its largest deviation:

- ``flex_fp32`` / ``flex_bf16``: loss and gradients of the compiled model with FlexAttention document masks
  against the eager model with the dense mask (float32; bf16 autocast).
- ``grouped_moe_bf16``: the grouped-matmul MoE against the expert loop, outputs and gradients, bf16 autocast.
- ``compiled_loss``: the compiled cross entropy on bf16 logits against the plain one.
- ``no_recompiles``: five batches whose documents move, one compiled graph (``error_on_recompile``).
- ``host_syncs``: CUDA syncs inside the training steps of ``Trainer.fit`` between two logging steps
  (``torch.cuda.set_sync_debug_mode``); the goal is zero.

    python bench/gpu_correctness.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import lightning as L
import torch
import torch._dynamo

from minimind_pl.config import ModelConfig
from minimind_pl.losses import causal_lm_loss
from minimind_pl.model import MiniMindForCausalLM
from minimind_pl.stages import Pretrain
from minimind_pl.stages.compiled import CompiledTraining

DEVICE = torch.device("cuda")
SHAPE = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4)


def packed_batch(rows: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    """Random tokens in documents of random lengths (~60 tokens), laid out as packed rows are."""
    g = torch.Generator().manual_seed(seed)
    doc_ids = torch.cumsum(torch.rand(rows, length, generator=g) < 1 / 60, dim=1)
    starts = torch.cat([torch.ones(rows, 1, dtype=torch.bool), doc_ids[:, 1:] != doc_ids[:, :-1]], dim=1)
    index = torch.arange(length).expand(rows, length)
    position_ids = index - torch.cummax(torch.where(starts, index, 0), dim=1).values
    ids = torch.randint(3, 6400, (rows, length), generator=g)
    labels = torch.cat([ids[:, 1:], torch.full((rows, 1), -100)], dim=1).masked_fill(
        torch.cat([starts[:, 1:], torch.ones(rows, 1, dtype=torch.bool)], dim=1), -100)
    batch = {"input_ids": ids, "labels": labels, "position_ids": position_ids, "doc_ids": doc_ids}
    return {k: v.to(DEVICE) for k, v in batch.items()}


def loss_and_grads(model: MiniMindForCausalLM, forward: Callable, batch: dict, dtype: torch.dtype | None):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = causal_lm_loss(forward(batch).logits, batch["labels"])
    loss.backward()
    return loss.detach().float(), {n: p.grad.detach().float().clone() for n, p in model.named_parameters()}


def largest_relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest ``|a - b| / (|b| max)`` over the tensors (each tensor against its own scale)."""
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-12)) for k in b)


def check_flex(dtype: torch.dtype | None) -> dict[str, Any]:
    torch.manual_seed(0)
    model = MiniMindForCausalLM(ModelConfig(**SHAPE)).to(DEVICE).train()
    batch = packed_batch(4, 1024, seed=1)

    def dense(b):
        return model(b["input_ids"], position_ids=b["position_ids"], doc_ids=b["doc_ids"])

    ref_loss, ref_grads = loss_and_grads(model, dense, batch, dtype)
    fast = CompiledTraining(model, flex_attention=True)
    loss, grads = loss_and_grads(model, fast.forward, batch, dtype)
    limit = 2e-2 if dtype else 1e-4
    deviation = largest_relative(grads, ref_grads)
    loss_deviation = float((loss - ref_loss).abs() / ref_loss.abs())
    return {"loss_rel": loss_deviation, "grad_rel_max": deviation, "tolerance": limit,
            "ok": loss_deviation < limit and deviation < limit * 5}


def check_grouped_moe() -> dict[str, Any]:
    torch.manual_seed(0)
    config = ModelConfig(**SHAPE, use_moe=True, num_experts=4, num_experts_per_tok=2)
    moe = MiniMindForCausalLM(config).to(DEVICE).model.layers[0].mlp.train()
    x = torch.randn(8, 512, config.hidden_size, device=DEVICE, requires_grad=True)
    results = []
    for grouped in (True, False):
        moe.zero_grad(set_to_none=True)
        x.grad = None
        with mock.patch("minimind_pl.model.grouped_matmul_applies", return_value=grouped), \
                torch.autocast("cuda", dtype=torch.bfloat16):
            y, aux = moe(x)
        (y.float().square().mean() + aux).backward()
        results.append(({"y": y.detach().float()}, {"x": x.grad.float(), **{n: p.grad.float() for n, p in moe.named_parameters()}}))
    out_dev, grad_dev = largest_relative(results[0][0], results[1][0]), largest_relative(results[0][1], results[1][1])
    return {"out_rel_max": out_dev, "grad_rel_max": grad_dev, "ok": out_dev < 2e-2 and grad_dev < 5e-2}


def check_compiled_loss() -> dict[str, Any]:
    torch.manual_seed(0)
    logits = (3 * torch.randn(16, 1024, 6400, device=DEVICE)).bfloat16()
    labels = torch.randint(0, 6400, (16, 1024), device=DEVICE).masked_fill(torch.rand(16, 1024, device=DEVICE) < 0.3, -100)
    plain, fast = causal_lm_loss(logits, labels), torch.compile(causal_lm_loss)(logits, labels)
    deviation = float((plain - fast).abs() / plain.abs())
    return {"loss_rel": deviation, "ok": deviation < 1e-4}


def check_no_recompiles() -> dict[str, Any]:
    torch._dynamo.reset()
    model = MiniMindForCausalLM(ModelConfig(**SHAPE)).to(DEVICE).train()
    fast = CompiledTraining(model, flex_attention=True)
    with torch._dynamo.config.patch(error_on_recompile=True), torch.autocast("cuda", dtype=torch.bfloat16):
        for seed in range(5):
            batch = packed_batch(4, 1024, seed=seed)
            causal_lm_loss(fast.forward(batch).logits, batch["labels"]).backward()
    return {"batches": 5, "ok": True}


class SyncCounter(L.Callback):
    """Count CUDA sync warnings inside each training step, between logging steps."""

    def __init__(self, first: int) -> None:
        self.first, self.per_step, self._caught = first, [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx >= self.first:
            self._caught = warnings.catch_warnings(record=True)
            self._records = self._caught.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._caught is not None:
            torch.cuda.set_sync_debug_mode("default")
            self.per_step.append(sorted({str(w.message)[:120] for w in self._records if "synchroniz" in str(w.message)}))
            self._caught.__exit__(None, None, None)
            self._caught = None


def check_host_syncs() -> dict[str, Any]:
    torch._dynamo.reset()
    torch.manual_seed(0)
    stage = Pretrain(config=ModelConfig(**SHAPE), seq_len=1024, peak_tflops=0)
    batches = []
    for seed in range(8):
        batch = {k: v.cpu() for k, v in packed_batch(4, 1024, seed=seed).items()}
        batch["real_tokens"] = torch.tensor(4 * 1024)
        batches.append(batch)
    counter = SyncCounter(first=4)
    trainer = L.Trainer(accelerator="cuda", devices=1, max_steps=len(batches), precision="bf16-mixed",
                        gradient_clip_val=1.0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, log_every_n_steps=1000, callbacks=[counter])
    loader = torch.utils.data.DataLoader(batches, batch_size=None, pin_memory=True)
    trainer.fit(stage, train_dataloaders=loader)
    syncs = sum(len(step) for step in counter.per_step)
    return {"sync_kinds_per_step": counter.per_step, "steps_watched": len(counter.per_step), "ok": syncs == 0}


CHECKS = {"flex_fp32": lambda: check_flex(None), "flex_bf16": lambda: check_flex(torch.bfloat16),
          "grouped_moe_bf16": check_grouped_moe, "compiled_loss": check_compiled_loss,
          "no_recompiles": check_no_recompiles, "host_syncs": check_host_syncs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--checks", default=",".join(CHECKS), help="comma-separated subset of " + ", ".join(CHECKS))
    args = parser.parse_args()
    torch.set_float32_matmul_precision("highest")  # float32 comparisons in float32, not TF32
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for name in args.checks.split(","):
        try:
            results[name] = CHECKS[name]()
        except Exception as error:  # report and go on: one failing check must not hide the others
            results[name] = {"ok": False, "error": f"{type(error).__name__}: {error}"[:2000],
                             "traceback": traceback.format_exc()[-3000:]}
        print(f"{name}: {'ok' if results[name]['ok'] else 'FAILED'} "
              f"{ {k: v for k, v in results[name].items() if k not in ('traceback', 'sync_kinds_per_step')} }", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
