"""Callbacks the CLI adds to every training run: a sync-free progress bar and the sample logger."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar

from minimind_pl.generation import GREEDY, generate
from minimind_pl.stages.strategies import shards_parameters


class SyncFreeProgressBar(TQDMProgressBar):
    """A progress bar that shows the training loss without a GPU->CPU sync on every step.

    Metrics logged with ``prog_bar=True`` are turned into Python numbers by Lightning after every batch,
    which waits for the GPU each step. The stages log with ``prog_bar=False``; this bar reads
    ``train/loss`` itself, only on the steps where the logger writes anyway (``log_every_n_steps``).
    """

    def __init__(self, refresh_rate: int = 1) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self._shown: dict[str, float] = {}
        self._read_at_step = -1

    def get_metrics(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> dict[str, Any]:
        """Lightning's bar metrics plus the latest train loss, refreshed once per logging interval."""
        metrics = super().get_metrics(trainer, pl_module)
        step = trainer.global_step
        if step != self._read_at_step and step % max(trainer.log_every_n_steps, 1) == 0:
            loss = trainer.callback_metrics.get("train/loss")
            if loss is not None:
                self._shown["loss"] = round(float(loss), 4)
            self._read_at_step = step
        return {**self._shown, **metrics}


class SampleLogger(Callback):
    """After each validation, complete the stage's ``sample_prompts`` greedily and log them as TensorBoard text.

    Reads from the stage: ``hparams.sample_prompts``, ``hparams.sample_max_new_tokens``, its ``tokenizer`` (the
    run's one copy, named by ``hparams.tokenizer``) and ``sample_prompt_ids(tokenizer)`` (plain text or chat, by the
    stage's ``SAMPLE_STYLE``). Runs on rank 0 only (on every rank where the weights are sharded, logged by rank 0),
    and not during the sanity check. Does nothing for stages or loggers without them.
    """

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        """Generate and log the samples."""
        hparams = pl_module.hparams
        experiment = getattr(trainer.logger, "experiment", None)
        every_rank = shards_parameters(trainer.strategy)  # each forward needs all ranks' shards
        if (trainer.sanity_checking or (trainer.global_rank != 0 and not every_rank)
                or not hparams.get("sample_prompts") or not hparams.get("tokenizer") or not hasattr(experiment, "add_text")):
            return
        tokenizer = pl_module.tokenizer
        outputs = generate(pl_module.model, pl_module.sample_prompt_ids(tokenizer), hparams.sample_max_new_tokens,
                           GREEDY, tokenizer.eos_id)
        if trainer.global_rank != 0:
            return
        lines = [f"**{p}** → {tokenizer.decode(o)}" for p, o in zip(hparams.sample_prompts, outputs)]
        experiment.add_text("samples", "\n\n".join(lines), global_step=trainer.global_step)
