"""JsonlDataModule: the shared LightningDataModule of every jsonl training format.

Everything common lives here: the token cache (built once in ``prepare_data``, opened in ``setup``),
the validation split, deterministic shuffling and a training DataLoader that resumes at the next batch.
A format plugs in through four hooks of :class:`JsonlDataModule`:

- ``make_encoder()`` (required): the :class:`~minimind_pl.data.cache.RecordEncoder` that turns a parsed
  jsonl line into documents (token ids and an optional loss mask); its ``settings()`` key the cache;
- ``make_dataset(stream)``: the rows of a split, from its :class:`~minimind_pl.data.packing.DocumentStream`
  (default: documents packed into rows, or padded one per row with ``packing: false``);
- ``collate_fn``: what the train and val loaders batch those rows with (default:
  :func:`~minimind_pl.data.packing.collate`);
- ``describe(stream, dataset)``: the statistics logged for a split (and kept in ``stats``).

A new format needs an encoder (a ``RecordEncoder`` subclass: ``kind``, ``settings()``, ``encode_records``)
and a subclass whose ``make_encoder`` returns it; rows that are not language-model rows also need
``make_dataset`` and ``collate_fn`` (see :mod:`minimind_pl.data.dpo`). Its ``__init__`` takes only its own
arguments (typed, documented in ``Args:``) and passes ``*args, **kwargs`` to ``super().__init__``:
jsonargparse then lists the base's arguments and docs in ``--help`` and YAML, and
``save_hyperparameters`` here records the subclass's arguments too.

The default rows make the batches of the contract in docs/DESIGN.md ("Batches"): ``input_ids`` (B, T)
long, ``labels`` (B, T) long already shifted (-100 = no loss), ``position_ids`` and ``doc_ids`` (B, T)
long when packing without cross-document attention, and ``real_tokens`` (0-d long, kept on the CPU):
the number of non-padding input tokens.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from ..errors import UserError
from ..tokenizer import Tokenizer
from .cache import RecordEncoder, TokenCache, ensure_cache
from .loader import ResumableDataLoader, ignore_stop_signals, make_train_loader
from .packing import DocumentStream, PackedDataset, PaddedDataset, collate


def _as_list(paths: Union[str, list[str], None]) -> list[str]:
    if paths is None:
        return []
    if isinstance(paths, (str, Path)):
        return [str(paths)]
    return [str(p) for p in paths]


class JsonlDataModule(L.LightningDataModule):
    """Shared logic of the jsonl data modules (see the module doc); subclasses implement :meth:`make_encoder`.

    Args:
        train_path: jsonl file(s) to train on (several files are read one after the other).
        seq_len: tokens per training row (the model's context length during training).
        batch_size: rows per batch on each device.
        val_path: jsonl file(s) for validation, in the same format. Mutually exclusive with ``val_fraction``.
        val_fraction: fraction of the training records (texts, conversations, pairs) held out for
            validation (chosen at random from ``seed``; 0 = no validation unless ``val_path`` is given).
        tokenizer: tokenizer directory (``tokenizer.json`` + ``tokenizer_config.json``).
        num_workers: DataLoader worker processes (0 = load in the training process).
        seed: seed of the row order (each epoch reshuffles from ``seed`` and the epoch), of the
            validation split and of any per-line augmentation (SFT's).
        packing: pack documents into full rows (no padding, no attention across documents);
            False pads one document per row as MiniMind does.
        cross_document_attention: with packing, let tokens attend to earlier documents of the same
            row (plain causal attention; batches then carry no ``doc_ids``/``position_ids``).
        cache_dir: folder for the token caches (default: beside each jsonl file; where that folder cannot
            be written, ``$XDG_CACHE_HOME/minimind_pl/tokens`` or ``~/.cache/minimind_pl/tokens``).
        skip_invalid: skip bad lines (invalid JSON/UTF-8, missing fields, empty texts or answers) and
            report how many; by default the first bad line raises an error naming file and line.
        num_proc: processes that tokenize while a cache is built (None: all CPUs, at most 32).
    """

    def __init__(
        self,
        train_path: Union[str, list[str]],
        seq_len: int,
        batch_size: int,
        val_path: Union[str, list[str], None] = None,
        val_fraction: float = 0.0,
        tokenizer: str = "checkpoints/tokenizer",
        num_workers: int = 1,
        seed: int = 42,
        packing: bool = True,
        cross_document_attention: bool = False,
        cache_dir: Optional[str] = None,
        skip_invalid: bool = False,
        num_proc: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.train_paths = _as_list(train_path)
        self.val_paths = _as_list(val_path)
        if not self.train_paths:
            raise UserError("--data.train_path is empty: name at least one jsonl file to train on")
        if not 0.0 <= val_fraction < 1.0:
            raise UserError(f"--data.val_fraction must be in [0, 1), got {val_fraction}")
        if val_fraction > 0 and self.val_paths:
            raise UserError("give either --data.val_path or --data.val_fraction, not both")
        for name, value, least in (("seq_len", seq_len, 1), ("batch_size", batch_size, 1),
                                   ("num_workers", num_workers, 0)):
            if value < least:
                raise UserError(f"--data.{name} must be >= {least}, got {value}")
        self.val_fraction = float(val_fraction)
        self.tokenizer_path = tokenizer
        self.tokenizer = Tokenizer.from_file(tokenizer)
        self.seq_len = int(seq_len)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.packing = bool(packing)
        self.cross_document_attention = bool(cross_document_attention)
        self.cache_dir = cache_dir
        self.skip_invalid = bool(skip_invalid)
        self.num_proc = num_proc
        self.train_dataset: Optional[Any] = None
        self.val_dataset: Optional[Any] = None
        self.caches: dict[str, TokenCache] = {}
        self.stats: dict[str, dict] = {}
        self._train_loader: Optional[ResumableDataLoader] = None
        self.save_hyperparameters()  # also collects the arguments of a subclass's __init__
        if not self.val_paths and self.val_fraction == 0:
            # No validation data: show Lightning the base class's (unimplemented) val_dataloader, so
            # that it skips the validation loop instead of warning about an empty loader.
            self.val_dataloader = L.LightningDataModule.val_dataloader.__get__(self)  # type: ignore[method-assign]

    # ------------------------------------------------------------------ hooks (see the module doc)
    def make_encoder(self) -> RecordEncoder:
        """The encoder that turns this format's parsed lines into documents (subclasses implement)."""
        raise NotImplementedError

    #: a truncated document keeps its eos when ``packing`` is False (MiniMind's pretraining does).
    keep_eos_on_truncate: bool = False

    def make_dataset(self, stream: DocumentStream) -> Dataset:
        """The rows of one split: documents packed into ``seq_len`` rows, or padded one per row."""
        if self.packing:
            return PackedDataset(stream, self.seq_len, self.tokenizer.pad_id, self.cross_document_attention)
        keep = self.tokenizer.eos_id if self.keep_eos_on_truncate else None
        return PaddedDataset(stream, self.seq_len, self.tokenizer.pad_id, keep_eos_id=keep)

    @property
    def collate_fn(self) -> Callable[[Sequence[Any]], dict]:
        """Turns a list of ``make_dataset`` rows into a batch, in the train and val loaders.

        Must be picklable without the data module (DataLoader workers receive it): a module-level
        function or a small object, not a bound method.
        """
        return collate

    def describe(self, stream: DocumentStream, dataset: Dataset) -> dict:
        """Statistics of one split (logged by ``setup`` and kept in ``stats``)."""
        rows = len(dataset)
        stats = {"documents": stream.n_docs, "tokens": stream.n_tokens, "rows": rows}
        if isinstance(dataset, PackedDataset) and rows:
            stats["real_token_fraction"] = min(stream.n_tokens, rows * self.seq_len) / (rows * self.seq_len)
        return stats

    # ------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        """Vocabulary size of the tokenizer (the model's ``vocab_size`` must be at least this)."""
        return self.tokenizer.vocab_size

    @property
    def encoder(self) -> RecordEncoder:
        """The record encoder (built on first use)."""
        if getattr(self, "_encoder", None) is None:
            self._encoder = self.make_encoder()
        return self._encoder

    # ------------------------------------------------------------------ caches
    def _all_paths(self) -> list[str]:
        seen: dict[str, None] = {}
        for p in self.train_paths + self.val_paths:
            seen.setdefault(p, None)
        return list(seen)

    def _cache(self, path: str, progress: bool = True) -> TokenCache:
        if path not in self.caches:
            argument = "--data.train_path" if path in self.train_paths else "--data.val_path"
            self.caches[path] = ensure_cache(path, self.encoder, cache_dir=self.cache_dir,
                                             skip_invalid=self.skip_invalid, num_proc=self.num_proc,
                                             progress=progress, argument=argument)
        return self.caches[path]

    def prepare_data(self) -> None:
        """Tokenize every file into its cache unless a valid cache exists (Lightning: once per node)."""
        for path in self._all_paths():
            self._cache(path)

    # ------------------------------------------------------------------ datasets
    def _val_split(self, caches: list[TokenCache]) -> tuple[list, list]:
        """Per training cache: (train selection, val selection) of document indices.

        Drawn from ``seed`` per record, not per document, so that the documents of one jsonl line
        (``docs_per_record`` of the encoder, e.g. DPO's chosen and rejected) stay together.
        """
        per_record = self.encoder.docs_per_record
        val_sel = []
        for i, cache in enumerate(caches):
            rng = np.random.default_rng([self.seed, 0x5A11, i])
            val_sel.append(rng.random(cache.n_docs // per_record) < self.val_fraction)
        n_val = sum(int(v.sum()) for v in val_sel)
        n_all = sum(v.size for v in val_sel)
        if n_all < 2:
            raise UserError(f"--data.val_fraction needs at least 2 training records, {self.train_paths} hold "
                            f"{n_all}; add data or give a separate --data.val_path")
        if n_val == 0:  # keep at least one validation document
            val_sel[0][np.random.default_rng([self.seed, 0x5A12]).integers(val_sel[0].size)] = True
        elif n_val == n_all:  # and at least one training document
            val_sel[0][0] = False
        train_out = [None if not v.any() else _record_docs(np.flatnonzero(~v), per_record) for v in val_sel]
        val_out = [_record_docs(np.flatnonzero(v), per_record) for v in val_sel]
        return train_out, val_out

    def _streams(self) -> tuple[DocumentStream, Optional[DocumentStream]]:
        """The documents of the train split and of the val split (None without validation data)."""
        train_caches = [self._cache(p) for p in self.train_paths]
        if self.val_fraction > 0:
            train_sel, val_sel = self._val_split(train_caches)
            return DocumentStream(train_caches, train_sel), DocumentStream(train_caches, val_sel)
        val_stream = DocumentStream([self._cache(p) for p in self.val_paths]) if self.val_paths else None
        return DocumentStream(train_caches), val_stream

    def setup(self, stage: Optional[str] = None) -> None:
        """Open the caches (building any that are missing) and make the train/val datasets."""
        if self.train_dataset is not None:
            return
        train_stream, val_stream = self._streams()
        self.train_dataset = self.make_dataset(train_stream)
        self.stats["train"] = self.describe(train_stream, self.train_dataset)
        if val_stream is not None:
            self.val_dataset = self.make_dataset(val_stream)
            self.stats["val"] = self.describe(val_stream, self.val_dataset)
        skipped = sum(c.meta["n_skipped"] for c in self.caches.values())
        if skipped:
            self.stats["skipped_lines"] = skipped
        for split, s in self.stats.items():
            rank_zero_info(f"[minimind_pl.data] {type(self).__name__} {split}: {s}")
        if len(self.train_dataset) == 0:
            raise UserError(f"no training rows in {self.train_paths} (--data.seq_len {self.seq_len})")

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self) -> ResumableDataLoader:
        """Shuffled (from ``seed`` and the epoch), sharded over ranks, resumable at the next batch."""
        if self.train_dataset is None:
            self.setup("fit")
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        self._train_loader = make_train_loader(
            self.train_dataset, self.batch_size, self.seed, self.num_workers, self.collate_fn,
            num_replicas=world, rank=rank, shuffle=True)
        return self._train_loader

    def val_dataloader(self) -> Union[DataLoader, list]:
        """Validation rows in order (only when ``val_path`` or ``val_fraction`` is set)."""
        if self.train_dataset is None:
            self.setup("validate")
        if self.val_dataset is None:
            return []
        return self.ordered_dataloader("val", persistent_workers=True)  # read again at every validation

    def ordered_dataloader(self, split: str, persistent_workers: bool = False) -> DataLoader:
        """Every row of ``split`` once, in order, on this process (validation, precomputations).

        Args:
            split: ``"train"`` or ``"val"``.
            persistent_workers: keep the worker processes (if any) alive between passes.
        """
        if self.train_dataset is None:
            self.setup("fit")
        dataset = {"train": self.train_dataset, "val": self.val_dataset}[split]
        if dataset is None:
            raise ValueError(f"no {split} data (set val_path or val_fraction)")
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                          collate_fn=self.collate_fn, pin_memory=torch.cuda.is_available(),
                          persistent_workers=persistent_workers and self.num_workers > 0,
                          worker_init_fn=ignore_stop_signals)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Move the batch to ``device``, keeping ``real_tokens`` on the CPU (logging it needs no sync)."""
        if isinstance(batch, dict) and "real_tokens" in batch:
            real = batch["real_tokens"]
            rest = {k: v for k, v in batch.items() if k != "real_tokens"}
            moved = super().transfer_batch_to_device(rest, device, dataloader_idx)
            moved["real_tokens"] = real
            return moved
        return super().transfer_batch_to_device(batch, device, dataloader_idx)


def _record_docs(records: np.ndarray, docs_per_record: int) -> np.ndarray:
    """Document indices of records: ``[k r, ..., k r + k - 1]`` for each record ``r`` (k = docs_per_record)."""
    return (docs_per_record * np.asarray(records, np.int64)[:, None] + np.arange(docs_per_record)).reshape(-1)
