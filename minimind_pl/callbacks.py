"""Callbacks the CLI adds to every training run: a sync-free progress bar, the sample logger, and the stop on
SIGTERM / SIGINT with a checkpoint.

``StopOnSignal`` turns the signal a scheduler sends before it kills a job (SIGTERM) and Ctrl+C (SIGINT) into a
checkpoint of the current optimizer step, a message saying how to resume, and a non-zero exit. ``python main.py
fit`` / ``validate`` install it (``cli.MiniMindCLI``) unless the config names its own.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar

from minimind_pl.data.loader import STOP_SIGNALS
from minimind_pl.errors import TrainingStopped
from minimind_pl.generation import GREEDY, generate
from minimind_pl.lightning_compat import should_accumulate
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
    """After each validation, complete the stage's ``sample_prompts`` greedily and log them as TensorBoard text; for a
    vision-language stage, also log the first image of the first validation batch with its prompt, the model's own
    greedy answer to that prompt (its images at prefill) and the reference.

    Reads from the stage: ``hparams.sample_prompts``, ``hparams.sample_max_new_tokens``, its ``tokenizer`` (the
    run's one copy, named by ``hparams.tokenizer``) and ``sample_prompt_ids(tokenizer)`` (plain text or chat, by the
    stage's ``SAMPLE_STYLE``); a stage with ``image_sample(batch)`` (``stages.vision_language``) gives the image.
    Runs on rank 0 only (on every rank where the weights are sharded, logged by rank 0),
    and not during the sanity check. Does nothing for stages or loggers without them.
    """

    def __init__(self) -> None:
        self._image_sample: Any = None  # the stage's ImageSample of this validation's first batch

    def on_validation_batch_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule", outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        """Keep the first validation batch's image sample (vision-language stages, rank 0)."""
        if (batch_idx == 0 and dataloader_idx == 0 and not trainer.sanity_checking and trainer.global_rank == 0
                and hasattr(pl_module, "image_sample")):
            self._image_sample = pl_module.image_sample(batch)

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        """Generate and log the samples."""
        experiment = getattr(trainer.logger, "experiment", None)
        sample, self._image_sample = self._image_sample, None
        hparams = pl_module.hparams
        every_rank = shards_parameters(trainer.strategy)  # each forward needs all ranks' shards
        if sample is not None and hasattr(experiment, "add_image"):
            experiment.add_image("samples/image", sample.image, global_step=trainer.global_step)
            answer = ""
            if not every_rank:  # the sample is rank 0's alone: sharded weights would need every rank's forward
                tokenizer = pl_module.tokenizer
                ids = generate(pl_module.model, [sample.prompt_ids], hparams.sample_max_new_tokens, GREEDY,
                               tokenizer.eos_id, images=[sample.pixels])[0]
                answer = f"model: {tokenizer.decode(ids)} · "
            experiment.add_text("samples/image_text", f"**{sample.prompt}** → {answer}reference: {sample.reference}",
                                global_step=trainer.global_step)
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


def signal_checkpoint_path(trainer: "L.Trainer") -> Path:
    """Where a stop saves: the ``ModelCheckpoint``'s last checkpoint (``last.ckpt`` in its folder), or
    ``<default_root_dir>/checkpoints/last.ckpt`` when the run has no ``ModelCheckpoint``.

    A name the callback already uses for its last checkpoint is kept; otherwise an existing file from an
    earlier run is not overwritten but versioned (``last-v1.ckpt``), as the callback itself does.
    """
    callback = trainer.checkpoint_callback
    if not isinstance(callback, ModelCheckpoint) or not callback.dirpath:
        return Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
    if callback.last_model_path and Path(callback.last_model_path).parent == Path(callback.dirpath):
        return Path(callback.last_model_path)
    path, version = callback.format_checkpoint_name({}, callback.CHECKPOINT_NAME_LAST), callback.STARTING_VERSION
    while callback.file_exists(path, trainer):
        path, version = callback.format_checkpoint_name({}, callback.CHECKPOINT_NAME_LAST, ver=version), version + 1
    return Path(path)


class StopOnSignal(Callback):
    """Stop training on SIGTERM or SIGINT (Ctrl+C) with a checkpoint of the current step, resumable exactly.

    The first signal lets the current optimizer step finish (the rest of a gradient accumulation window, and a
    validation that is running), then saves ``last.ckpt`` (``signal_checkpoint_path``) at the point of the loop
    where ``ModelCheckpoint`` saves after a batch, so ``--ckpt_path`` resumes with the next batch, and stops with
    ``TrainingStopped`` (exit code 128 + the signal: 143 for SIGTERM, 130 for SIGINT) saying how to resume. A
    second signal stops at once without saving. Under DDP the ranks agree at every optimizer step (one
    all-reduce of a number), so all of them stop after the same step, whichever rank got the signal.

    Why not Lightning's own SIGTERM handling: it stops with ``SIGTERMException`` (a ``SystemExit`` with code
    None, so exit status 0) right after whichever micro-batch the signal arrived in, mid accumulation window, and
    saves nothing (only its SLURM auto-requeue saves). This callback takes the handlers over from the start of
    the sanity check or of training, whichever comes first, until training ends; a signal during the sanity
    check stops at once (nothing is trained yet). Before that (tokenizing, setup, restoring a checkpoint)
    SIGTERM ends the process and Ctrl+C ends it through Lightning, with exit status 1: there is nothing to save.
    DataLoader workers must leave the signals to this process (``ignore_stop_signals``): a scheduler and Ctrl+C
    signal them too, and a worker that dies of it takes the run down before the step is saved.
    """

    def __init__(self) -> None:
        self._requested: Optional[signal.Signals] = None  # the first signal received, until it is acted on
        self._training = False  # in the training loop: a first signal waits for the optimizer step
        self._previous: dict[signal.Signals, Any] = {}  # the handlers this callback replaced
        self._trainer: Optional["L.Trainer"] = None
        self._pid = 0  # the process that installed the handlers (forked workers inherit them)

    # ------------------------------------------------------------------------------ handlers
    def _install(self, trainer: "L.Trainer") -> None:
        """Take the signals over (from Lightning's SIGTERM handler too, which ``Trainer.fit`` installs before)."""
        if self._previous or threading.current_thread() is not threading.main_thread():
            return  # installed already, or fit runs in a thread, where Python cannot handle signals
        self._trainer, self._requested, self._pid = trainer, None, os.getpid()
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def _uninstall(self) -> None:
        """Give the signals back to the handlers that were there before."""
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            if handler is not None:  # None: installed outside Python, cannot be put back
                signal.signal(signum, handler)
        self._training, self._trainer = False, None

    def _on_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        if os.getpid() != self._pid:
            return  # a worker forked from the training process: stopping is the training process's decision
        name = signal.Signals(signum).name
        if self._training and self._requested is None:
            self._requested = signal.Signals(signum)
            # os.write, not print: the main thread may be inside a print to the same stream right now
            os.write(2, f"\n{name} received: stopping after the current optimizer step with a checkpoint "
                        f"(send {name} again to stop at once, without it)\n".encode())
            return
        message = self._stopped_at_once_message(name)
        self._uninstall()  # a third signal acts as it would without this callback
        raise TrainingStopped(message, 128 + signum)

    def _stopped_at_once_message(self, name: str) -> str:
        trainer = self._trainer
        if not self._training:
            return f"{name} received before training started: stopped; nothing was trained, so nothing was saved"
        callback = trainer.checkpoint_callback if trainer is not None else None
        newest = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
        where = f"the newest checkpoint is {newest}" if newest and Path(newest).exists() else "no checkpoint was saved"
        return f"{name} received a second time: stopped at once without saving the current step; {where}"

    # ------------------------------------------------------------------------------ hooks
    def on_sanity_check_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        """Take the signals over; during the sanity check a signal stops at once."""
        self._install(trainer)

    def on_train_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        """Take the signals over (if the sanity check did not) and let a first signal wait for the step."""
        self._install(trainer)
        if trainer.received_sigterm:  # arrived through Lightning's handler, just before this one took over
            self._uninstall()
            raise TrainingStopped(self._stopped_at_once_message("SIGTERM"), 128 + signal.SIGTERM)
        self._training = True

    def on_train_batch_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """After an optimizer step: if any rank got a signal, save the step and stop."""
        if should_accumulate(trainer):
            return  # inside an accumulation window: its gradients are not applied yet
        signum = self._agreed_signal(trainer)
        if signum:
            self._save_and_stop(trainer, signal.Signals(signum))

    def on_train_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        """Training is over: a signal from now on acts as it would without this callback."""
        self._uninstall()

    def on_exception(self, trainer: "L.Trainer", pl_module: "L.LightningModule", exception: BaseException) -> None:
        """Give the signals back before Lightning tears the run down."""
        self._uninstall()

    def teardown(self, trainer: "L.Trainer", pl_module: "L.LightningModule", stage: str) -> None:
        """Give the signals back (if training never started or ended)."""
        self._uninstall()

    # ------------------------------------------------------------------------------ stopping
    def _agreed_signal(self, trainer: "L.Trainer") -> int:
        """The signal that stops every rank now (0: none): the largest number any rank received."""
        local = int(self._requested or 0)
        if trainer.world_size == 1:
            return local
        received = torch.tensor(local, device=trainer.strategy.root_device)
        return int(trainer.strategy.reduce(received, reduce_op="max"))

    def _save_and_stop(self, trainer: "L.Trainer", signum: signal.Signals) -> None:
        """Save the current step as the last checkpoint (every rank calls this; rank 0 writes), then stop."""
        path = signal_checkpoint_path(trainer)
        callback = trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint) and Path(callback.dirpath or "") == path.parent:
            # as ModelCheckpoint does before its own last save: the state saved in the file names the file, so a
            # resumed run keeps writing this name rather than a versioned one
            callback.last_model_path = str(path)
        trainer.save_checkpoint(path, weights_only=False)
        raise TrainingStopped(
            f"{signum.name} received: stopped after optimizer step {trainer.global_step} (epoch "
            f"{trainer.current_epoch}) and saved it to {path}; to resume, run the same command with "
            f"--ckpt_path {path}", 128 + signum)
