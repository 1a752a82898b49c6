"""Lightning's checkpoint writing made atomic: the ``CheckpointIO`` plugin every ``fit`` / ``validate`` run gets
(``cli.MiniMindCLI``) unless its config names its own."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.plugins.io import CheckpointIO, TorchCheckpointIO

from minimind_pl.files import write_atomically
from minimind_pl.lightning_compat import configured_checkpoint_io, is_local_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``torch.save`` checkpoints, written atomically beside the target and fsynced.

    Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction: a temporary file from
    ``tempfile.mkstemp()`` in ``$TMPDIR``, moved over the target at the end (``fsspec``'s
    ``LocalFileOpener.commit``: ``shutil.move``). When ``$TMPDIR`` is on another filesystem (``/dev/shm``, a
    node-local disk) that move copies into the target itself, so a kill during it leaves a truncated, unreadable
    ``last.ckpt`` plus an orphaned temporary file of the checkpoint's size in ``$TMPDIR``; nothing is fsynced.
    This plugin writes local checkpoints with ``write_atomically`` instead (a kill leaves the previous file
    complete, and its temporary file beside it, removed by the next save). Remote paths (``s3://``, ...) keep
    Lightning's way: an object store replaces an object whole. Removing is Lightning's, and so is loading, except
    for the checkpoint to resume that the CLI has read already (``resumed``): it is handed over, not read again.

    Args:
        resumed: ``(path, contents)`` of the checkpoint ``--ckpt_path`` names, as ``stages.resume.check_resume``
            read it; the first load of that path returns it.
    """

    def __init__(self, resumed: Optional[tuple[str, dict[str, Any]]] = None) -> None:
        super().__init__()
        self._in_progress: set[str] = set()  # temporary files being written now (Lightning may save from a thread)
        self._resumed = resumed

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        """Write ``checkpoint`` to ``path`` with ``torch.save``, atomically for local paths."""
        if storage_options is not None or not is_local_path(path):
            return super().save_checkpoint(checkpoint, path, storage_options)  # Lightning's checks and remote IO
        write_atomically(Path(path), lambda file: torch.save(checkpoint, file), self._in_progress)

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The checkpoint the CLI read already if ``path`` is that file (once), else Lightning's load."""
        resumed, self._resumed = self._resumed, None
        if resumed is not None and is_local_path(path) and Path(path).resolve() == Path(resumed[0]).resolve():
            return resumed[1]
        return super().load_checkpoint(path, *args, **kwargs)


def with_atomic_checkpoints(trainer_kwargs: dict[str, Any],
                            resumed: Optional[tuple[str, dict[str, Any]]] = None) -> dict[str, Any]:
    """``Trainer`` arguments with ``AtomicCheckpointIO(resumed)`` added to the plugins, unless they name a
    CheckpointIO already, as a plugin or inside a strategy instance (then Lightning reads the checkpoint to resume
    itself)."""
    plugins = trainer_kwargs.get("plugins")
    plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    strategy_io = configured_checkpoint_io(trainer_kwargs.get("strategy"))
    if isinstance(strategy_io, CheckpointIO) or any(isinstance(p, CheckpointIO) for p in plugins):
        return trainer_kwargs
    return {**trainer_kwargs, "plugins": [*plugins, AtomicCheckpointIO(resumed)]}
