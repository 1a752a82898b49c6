"""Checkpoints that survive the run being killed: atomic writes, and a clean stop on SIGTERM / SIGINT.

``AtomicCheckpointIO`` writes every checkpoint so that a kill at any moment (``kill -9``, out of memory, a
preempted node) leaves either the previous file or the new one, complete. ``StopOnSignal`` turns the signal a
scheduler sends before it kills a job (SIGTERM) and Ctrl+C (SIGINT) into a checkpoint of the current optimizer
step, a message saying how to resume, and a non-zero exit. ``python main.py fit`` / ``validate`` install both
(``cli.MiniMindCLI``) unless the config names its own.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import socket
import threading
import uuid
from pathlib import Path
from types import FrameType
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Optional

import lightning as L
import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import CheckpointIO, TorchCheckpointIO

from minimind_pl.errors import TrainingStopped

# A file being written is named <target>.tmp-<host>-<pid>-<token>: never *.ckpt, so nothing takes it for a
# checkpoint, and the host and process id tell a later writer whether its writer is still alive.
TEMP_MARK = ".tmp-"
_TEMP_NAME = re.compile(rf"^.+{re.escape(TEMP_MARK)}(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{{8}}$")


# --------------------------------------------------------------------------------------------- atomic files
def temporary_path(target: Path) -> Path:
    """A new name beside ``target`` (same folder, so the same filesystem) for writing its next version."""
    return target.with_name(f"{target.name}{TEMP_MARK}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def stale_temporaries(folder: Path, in_progress: Iterable[str] = (), folders: bool = False) -> list[Path]:
    """Temporary files (or, with ``folders``, temporary folders: the token cache builds one) in ``folder`` left
    behind by writers that were killed.

    A file counts as stale when it was made on this host by a process that is gone, or by this very process
    but is not in ``in_progress`` (a restarted container reuses its host name and process ids). Files of other
    hosts are left alone: their writers may still be alive.
    """
    host, own, busy = socket.gethostname(), os.getpid(), set(in_progress)
    stale = []
    for path in folder.iterdir() if folder.is_dir() else ():
        match = _TEMP_NAME.match(path.name)
        if not match or match["host"] != host or str(path) in busy or path.is_dir() != folders:
            continue
        pid = int(match["pid"])
        if pid == own or not _process_alive(pid):
            stale.append(path)
    return stale


def fsync_folder(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (POSIX; a no-op where folders cannot be opened or synced)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open a folder; it has no folder entries to sync either
        return
    try:
        os.fsync(fd)
    except OSError as error:  # some filesystems (network, FUSE) refuse fsync on folders
        if error.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EACCES):
            raise
    finally:
        os.close(fd)


#: Temporary files this process is writing through ``atomic_file`` without a set of its own: never stale.
_WRITING_NOW: set[str] = set()


@contextlib.contextmanager
def atomic_file(target: Path, in_progress: Optional[set[str]] = None) -> Iterator[BinaryIO]:
    """A binary file to write whose content becomes ``target`` only when the block ends without an error, so that
    readers only ever see the old or the complete new file.

    The data goes to a temporary file beside ``target``, is flushed and fsynced, renamed over ``target``
    (``os.replace``: atomic on POSIX and Windows), and the rename is fsynced with the folder. Temporary files of
    earlier writers that were killed are removed first; ``in_progress`` holds the temporary files this process
    is writing right now, which are not stale (by default the process-wide set: two files written at once in one
    folder keep each other's temporaries).
    """
    in_progress = _WRITING_NOW if in_progress is None else in_progress
    folder = target.parent
    folder.mkdir(parents=True, exist_ok=True)
    for stale in stale_temporaries(folder, in_progress):
        stale.unlink(missing_ok=True)
    temporary = temporary_path(target)
    in_progress.add(str(temporary))
    try:
        with open(temporary, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:  # an error, or a second signal: never leave the half-written file behind
        temporary.unlink(missing_ok=True)
        raise
    finally:
        in_progress.discard(str(temporary))
    fsync_folder(folder)


def write_atomically(target: Path, write: Callable[[BinaryIO], None], in_progress: set[str]) -> None:
    """Write ``target`` through ``write(file)`` atomically (see ``atomic_file``)."""
    with atomic_file(target, in_progress) as file:
        write(file)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``torch.save`` checkpoints, written atomically beside the target and fsynced.

    Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction: a temporary file from
    ``tempfile.mkstemp()`` in ``$TMPDIR``, moved over the target at the end (``fsspec``'s
    ``LocalFileOpener.commit``: ``shutil.move``). When ``$TMPDIR`` is on another filesystem (``/dev/shm``, a
    node-local disk) that move copies into the target itself, so a kill during it leaves a truncated, unreadable
    ``last.ckpt`` plus an orphaned temporary file of the checkpoint's size in ``$TMPDIR``; nothing is fsynced.
    This plugin writes local checkpoints with ``write_atomically`` instead (a kill leaves the previous file
    complete, and its temporary file beside it, removed by the next save). Remote paths (``s3://``, ...) keep
    Lightning's way: an object store replaces an object whole. Loading and removing are Lightning's.
    """

    def __init__(self) -> None:
        super().__init__()
        self._in_progress: set[str] = set()  # temporary files being written now (Lightning may save from a thread)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        """Write ``checkpoint`` to ``path`` with ``torch.save``, atomically for local paths."""
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)  # Lightning's checks and remote IO
        write_atomically(Path(path), lambda file: torch.save(checkpoint, file), self._in_progress)


def with_atomic_checkpoints(trainer_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``Trainer`` arguments with ``AtomicCheckpointIO`` added to the plugins, unless they name a CheckpointIO
    already, as a plugin or inside a strategy instance (read from ``_checkpoint_io``: the ``checkpoint_io``
    property would make a default one)."""
    plugins = trainer_kwargs.get("plugins")
    plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    strategy_io = getattr(trainer_kwargs.get("strategy"), "_checkpoint_io", None)
    if isinstance(strategy_io, CheckpointIO) or any(isinstance(p, CheckpointIO) for p in plugins):
        return trainer_kwargs
    return {**trainer_kwargs, "plugins": [*plugins, AtomicCheckpointIO()]}


# ---------------------------------------------------------------------------------------- stop on signal
#: The signals that stop training with a checkpoint: a scheduler's warning before it kills a job, and Ctrl+C.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def ignore_stop_signals(worker_id: int) -> None:
    """``worker_init_fn`` of DataLoaders: the worker ignores ``STOP_SIGNALS``.

    Ctrl+C signals every process of the terminal's process group and a scheduler often signals every process
    of the job; a worker that died of it would end the run with "DataLoader worker exited unexpectedly" before
    ``StopOnSignal`` saves the step. The training process shuts its workers down; a worker whose training
    process is gone exits by itself (PyTorch's worker watchdog).
    """
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


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
        if trainer.fit_loop._should_accumulate():
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
