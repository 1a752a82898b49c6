"""Callbacks the CLI adds to every training run."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


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
