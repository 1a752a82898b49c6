"""The pretraining format: ``{"text": ...}`` lines (MiniMind's pretrain_hq.jsonl, pretrain_t2t*.jsonl).

Trained on by :class:`minimind_pl.data.PretrainDataModule`.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..cache import RecordEncoder
from .record import DataFormat


def check_text_record(obj: Any, field: str = "text") -> Optional[str]:
    """Why ``obj`` is not a ``{field: non-blank string}`` record, or None."""
    if not isinstance(obj, dict):
        return f"expected a JSON object with a {field!r} field, got {type(obj).__name__}"
    if field not in obj:
        return f"missing {field!r} field (keys: {', '.join(map(str, list(obj)[:8])) or 'none'})"
    if not isinstance(obj[field], str):
        return f"{field!r} must be a string, got {type(obj[field]).__name__}"
    if not obj[field].strip():
        return f"empty document ({field!r} is blank)"
    return None


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
            out[i] = check_text_record(obj, self.field)
            if out[i] is None:
                texts.append(obj[self.field])
                where.append(i)
        bos, eos = self.tokenizer.bos_id, self.tokenizer.eos_id
        for i, ids in zip(where, self.tokenizer.encode_batch(texts) if texts else []):
            doc = np.empty(len(ids) + 2, np.int64)
            doc[0], doc[-1] = bos, eos
            doc[1:-1] = ids
            out[i] = [(doc, None)]
        return out


def pretrain_encoder(tokenizer: Any, augment: bool = True) -> PretrainEncoder:
    """PretrainDataModule's encoder (nothing in it is random: ``augment`` changes nothing)."""
    return PretrainEncoder(tokenizer)


def has_text(obj: dict) -> bool:
    """A ``text`` field makes a pretraining line."""
    return "text" in obj


def text_texts(obj: dict) -> list[str]:
    """The document."""
    return [obj["text"]]


def map_text(obj: dict, function: Callable[[str], str]) -> dict:
    """The record with ``function`` applied to its text."""
    return {**obj, "text": function(obj["text"])}


PRETRAIN = DataFormat(name="pretrain", data_module="PretrainDataModule", fields='{"text": ...}', detect=has_text,
                      check=check_text_record, texts=text_texts, map_texts=map_text, encoder=pretrain_encoder)
