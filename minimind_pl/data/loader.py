"""A resumable, deterministic training DataLoader.

:class:`ResumableSampler` orders the rows of an epoch from ``(seed, epoch)`` alone and deals them
out to the ranks in global batches. :class:`ResumableDataLoader` counts the batches it has handed
out; its ``state_dict()`` / ``load_state_dict()`` (which Lightning's fit loop saves into and
restores from checkpoints for every loader that has them) let a run resumed with ``--ckpt_path``
continue with the next batch of the same epoch, also with ``num_workers > 0`` (skipped batches are
never loaded: the sampler simply starts later in its order).

The sampler subclasses ``DistributedSampler`` only so that Lightning leaves it in place under
DDP instead of wrapping it; it shards by itself (``num_replicas`` / ``rank`` given explicitly).
"""
from __future__ import annotations

import math
import signal
import warnings
from typing import Any, Iterator, Optional

import numpy as np
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler


STATE_VERSION = 1

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


class ResumableSampler(DistributedSampler):
    """Deterministic row order per epoch, sharded over ranks, able to start mid-epoch.

    Epoch ``e`` uses the permutation ``numpy.random.default_rng([seed, e]).permutation(num_rows)``
    (or ``arange`` when ``shuffle`` is False), padded by wrapping around to a whole number of
    global batches (``batch_size * num_replicas`` rows); global batch ``g`` gives rank ``r`` the rows
    ``order[(g * num_replicas + r) * batch_size :][:batch_size]``.

    Args:
        num_rows: rows in the dataset.
        batch_size: rows per batch on each rank.
        seed: seed of the order.
        shuffle: shuffle rows (else file order).
        num_replicas: number of ranks.
        rank: this rank.
    """

    def __init__(self, num_rows: int, batch_size: int, seed: int = 42, shuffle: bool = True,
                 num_replicas: int = 1, rank: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        # DistributedSampler.__init__ wants a dataset and may query torch.distributed: set fields directly.
        self.num_rows = int(num_rows)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.drop_last = False
        self.epoch = 0
        self.batches_per_epoch = math.ceil(self.num_rows / (self.batch_size * self.num_replicas)) if num_rows else 0
        self.num_samples = self.batches_per_epoch * self.batch_size
        self.total_size = self.num_samples * self.num_replicas
        self.skip_batches = 0  # set by ResumableDataLoader for the next iteration

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration uses (Lightning calls this every epoch)."""
        self.epoch = int(epoch)

    def global_order(self, epoch: int) -> np.ndarray:
        """Row order of ``epoch`` over all ranks, padded to whole global batches."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, int(epoch)]).permutation(self.num_rows)
        else:
            order = np.arange(self.num_rows)
        if self.total_size != self.num_rows and self.num_rows:
            order = np.resize(order, self.total_size)
        return order

    def rank_indices(self, epoch: int) -> np.ndarray:
        """Rows this rank reads in ``epoch``, in order."""
        order = self.global_order(epoch)
        if not self.num_rows:
            return order
        shaped = order.reshape(self.batches_per_epoch, self.num_replicas, self.batch_size)
        return shaped[:, self.rank, :].reshape(-1)

    def __iter__(self) -> Iterator[int]:
        skip, self.skip_batches = self.skip_batches, 0
        rows = self.rank_indices(self.epoch)[skip * self.batch_size:]
        return iter(rows.tolist())

    def __len__(self) -> int:
        return self.num_samples


class _ResumableIterator:
    """Iterator of a :class:`ResumableDataLoader` that counts the batches it hands out.

    The DataLoader's own iterator (and with it the sampler's order, which worker processes fetch
    ahead) is created at the first ``next()``, not at ``iter()``: Lightning may call ``set_epoch``
    between the two (it does when resuming from an end-of-epoch checkpoint).
    """

    def __init__(self, loader: "ResumableDataLoader") -> None:
        self._loader = loader
        self._inner: Optional[Iterator] = None

    def __iter__(self) -> "_ResumableIterator":
        return self

    def __next__(self) -> Any:
        loader = self._loader
        if self._inner is None:
            sampler: ResumableSampler = loader.sampler  # type: ignore[assignment]
            loader._epoch, loader._batches_done, loader._pending = sampler.epoch, sampler.skip_batches, False
            self._inner = DataLoader.__iter__(loader)
        batch = next(self._inner)
        loader._batches_done += 1
        return batch

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or self.__dict__.get("_inner") is None:
            raise AttributeError(name)
        return getattr(self._inner, name)


class ResumableDataLoader(DataLoader):
    """DataLoader over a :class:`ResumableSampler` whose position survives checkpoints.

    ``state_dict()`` holds the epoch and the number of batches handed out in it;
    ``load_state_dict()`` makes the next iteration start right after them. Lightning's fit loop
    calls both (through its CombinedLoader) because this class has them.

    Args:
        dataset: a map-style dataset.
        sampler: the row order (its ``batch_size`` is the loader's).
        **kwargs: other DataLoader arguments (``num_workers``, ``collate_fn``, ``pin_memory``, ...).
    """

    def __init__(self, dataset: Dataset, sampler: ResumableSampler, **kwargs: Any) -> None:
        kwargs.pop("shuffle", None)
        kwargs.pop("batch_size", None)
        kwargs.pop("drop_last", None)
        super().__init__(dataset, batch_size=sampler.batch_size, sampler=sampler, drop_last=False, **kwargs)
        self._epoch = sampler.epoch
        self._batches_done = 0
        self._pending = True  # no iteration started since construction / load_state_dict / iter()

    def __iter__(self) -> Iterator:
        self._pending = True
        return _ResumableIterator(self)

    def state_dict(self) -> dict:
        """Position in the data: epoch and batches handed out in it, plus what defines the order."""
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        epoch, done = (sampler.epoch, sampler.skip_batches) if self._pending else (self._epoch, self._batches_done)
        return {
            "version": STATE_VERSION,
            "epoch": epoch,
            "batches_done": done,
            "num_rows": sampler.num_rows,
            "batch_size": sampler.batch_size,
            "num_replicas": sampler.num_replicas,
            "seed": sampler.seed,
            "shuffle": sampler.shuffle,
        }

    def load_state_dict(self, state: dict) -> None:
        """Make the next iteration continue after the batches recorded in ``state``.

        If the data or the batch layout changed since ``state`` was taken, the position is carried
        over as well as it can (same order: by rows consumed; else by the fraction of the epoch done)
        with a warning.
        """
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        epoch, done = int(state["epoch"]), int(state["batches_done"])
        same_order = (state.get("num_rows") == sampler.num_rows and state.get("seed") == sampler.seed
                      and state.get("shuffle", True) == sampler.shuffle)
        same_layout = (state.get("batch_size") == sampler.batch_size
                       and state.get("num_replicas") == sampler.num_replicas)
        if same_order and same_layout:
            skip = done
        elif same_order:
            consumed = done * int(state["batch_size"]) * int(state["num_replicas"])
            skip = consumed // (sampler.batch_size * sampler.num_replicas)
            warnings.warn(f"resuming with another batch layout: continuing after {consumed} rows of epoch {epoch}")
        else:
            old_len = max(1, math.ceil(int(state["num_rows"]) / (int(state["batch_size"]) * int(state["num_replicas"]))))
            skip = round(done / old_len * sampler.batches_per_epoch)
            warnings.warn("the training data changed since the checkpoint was written; continuing at the same "
                          f"fraction of epoch {epoch} ({skip}/{sampler.batches_per_epoch} batches), in a new order")
        if skip >= sampler.batches_per_epoch:  # the epoch was finished: start the next one
            epoch, skip = epoch + 1, 0
        sampler.set_epoch(epoch)
        sampler.skip_batches = skip
        self._epoch, self._batches_done, self._pending = epoch, skip, True


def make_train_loader(dataset: Dataset, batch_size: int, seed: int, num_workers: int, collate_fn: Any,
                      num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                      pin_memory: Optional[bool] = None) -> ResumableDataLoader:
    """A :class:`ResumableDataLoader` with persistent workers over ``dataset``."""
    import torch

    sampler = ResumableSampler(len(dataset), batch_size, seed=seed, shuffle=shuffle,
                               num_replicas=num_replicas, rank=rank)
    return ResumableDataLoader(
        dataset, sampler, num_workers=num_workers, collate_fn=collate_fn,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=num_workers > 0, worker_init_fn=ignore_stop_signals,
    )
