"""PretrainDataModule: ``{"text": ...}`` lines (MiniMind's pretrain_t2t*.jsonl) for causal LM pretraining."""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import numpy as np

from .base import JsonlDataModule
from .cache import RecordEncoder


class PretrainEncoder(RecordEncoder):
    """``{"text": str}`` -> ``[bos] + tokens(text) + [eos]`` (as MiniMind's PretrainDataset).

    The ``text`` field must be a non-blank string; every token is a training target (no mask).

    Args:
        tokenizer: the tokenizer.
        field: name of the text field.
    """

    kind = "pretrain"
    version = 1
    has_mask = False

    def __init__(self, tokenizer: Any, field: str = "text") -> None:
        super().__init__(tokenizer)
        self.field = field

    def settings(self) -> dict:
        """Cache key: the base settings plus the text field."""
        return {**super().settings(), "field": self.field}

    def encode_records(self, records: Sequence[tuple[int, Any]]) -> list:
        """Tokenize the texts of ``records`` in one batch; invalid records become error strings."""
        out: list = [None] * len(records)
        texts, where = [], []
        for i, (_, obj) in enumerate(records):
            if not isinstance(obj, dict):
                out[i] = f"expected a JSON object with a {self.field!r} field, got {type(obj).__name__}"
            elif self.field not in obj:
                out[i] = f"missing {self.field!r} field (keys: {', '.join(map(str, list(obj)[:8])) or 'none'})"
            elif not isinstance(obj[self.field], str):
                out[i] = f"{self.field!r} must be a string, got {type(obj[self.field]).__name__}"
            elif not obj[self.field].strip():
                out[i] = f"empty document ({self.field!r} is blank)"
            else:
                texts.append(obj[self.field])
                where.append(i)
        bos, eos = self.tokenizer.bos_id, self.tokenizer.eos_id
        for i, ids in zip(where, self.tokenizer.encode_batch(texts) if texts else []):
            doc = np.empty(len(ids) + 2, np.int64)
            doc[0], doc[-1] = bos, eos
            doc[1:-1] = ids
            out[i] = [(doc, None)]
        return out


class PretrainDataModule(JsonlDataModule):
    """Pretraining data: jsonl lines ``{"text": "..."}``, each a document ``<|im_start|> text <|im_end|>``.

    Documents are packed into full rows of ``seq_len`` tokens (see :mod:`minimind_pl.data.packing`),
    or padded one per row (``packing: false``; a too-long text is cut and still ends with eos, as in
    MiniMind). Every token after a document's first is a target.

    Args:
        train_path: jsonl file(s) to train on (several files are read one after the other).
        seq_len: tokens per training row (the model's context length during training).
        batch_size: rows per batch on each device.
        val_path: jsonl file(s) for validation, in the same format. Mutually exclusive with ``val_fraction``.
        val_fraction: fraction of the training documents held out for validation (chosen at random
            from ``seed``; 0 = no validation unless ``val_path`` is given).
        tokenizer: tokenizer directory (``tokenizer.json`` + ``tokenizer_config.json``).
        num_workers: DataLoader worker processes (0 = load in the training process).
        seed: seed of the row order (each epoch reshuffles from ``seed`` and the epoch) and of the
            validation split.
        packing: pack documents into full rows (no padding, no attention across documents);
            False pads one document per row as MiniMind does.
        cross_document_attention: with packing, let tokens attend to earlier documents of the same
            row (plain causal attention; batches then carry no ``doc_ids``/``position_ids``).
        cache_dir: folder for the token caches (default: beside each jsonl file).
        skip_invalid: skip bad lines (invalid JSON/UTF-8, missing or blank ``text``) and report how
            many; by default the first bad line raises an error naming file and line.
        num_proc: processes that tokenize while a cache is built (None: all CPUs, at most 32).
    """

    keep_eos_on_truncate = True

    def make_encoder(self) -> PretrainEncoder:
        """Text documents wrapped in bos/eos."""
        return PretrainEncoder(self.tokenizer)
