"""PretrainDataModule: ``{"text": ...}`` lines (MiniMind's pretrain_t2t*.jsonl) for causal LM pretraining."""
from __future__ import annotations

from typing import Any, Sequence

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

    Its arguments are those of :class:`JsonlDataModule`; ``skip_invalid`` skips lines that are not JSON
    or valid UTF-8, or whose ``text`` is missing or blank.
    """

    keep_eos_on_truncate = True

    def make_encoder(self) -> PretrainEncoder:
        """Text documents wrapped in bos/eos."""
        return PretrainEncoder(self.tokenizer)
