"""MiniMind-V's Parquet files read as records: a source of ``(row number, record)`` pairs beside jsonl's lines.

A MiniMind-V file (``pretrain_i2t.parquet``, ``sft_i2t.parquet``) has a ``conversations`` column (a JSON string of
role/content turns, or a list of structs) and an ``image_bytes`` column (one encoded image, or a list of them). Each
row becomes the record the jsonl image format reads, ``{"conversations": [...], "images": [bytes, ...]}``, so the
format's check and encoder (:mod:`minimind_pl.data.formats.vlm`) serve both files. Rows are numbered from 1, and
errors name "row N" as jsonl's name "line N".

MiniMind-V gives text-only rows a placeholder image (a black 8×8 JPEG) because its loader needs one per row: a row
whose turns hold no ``<image>`` tag and whose ``image_bytes`` holds one image has that image dropped here (nothing
would read it). Every other disagreement between tags and images is left for the format's check (an error naming
the row).

pyarrow is imported only when a Parquet file is read (the ``vlm`` extra); :func:`require_pyarrow` says how to
install it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from minimind_pl.chat_format import IMAGES_FIELD, count_image_tags
from minimind_pl.errors import UserError

PARQUET_MAGIC = b"PAR1"
CONVERSATIONS_COLUMN = "conversations"
IMAGES_COLUMN = "image_bytes"
BATCH_ROWS = 256  # rows per block: about 5 MB of MiniMind-V's pre-resized JPEGs
_HASH_BLOCK = 4 << 20


@dataclass
class RecordBlock:
    """Records already parsed (a Parquet batch): what :func:`minimind_pl.data.jsonl.parse_block` gives for lines.

    Attributes:
        records: ``(row number, record)`` pairs of the valid rows.
        errors: ``(row number, why)`` of rows that are not records.
        n_lines: rows in the block.
    """

    records: list
    errors: list = field(default_factory=list)
    n_lines: int = 0


def is_parquet(path: Union[str, Path]) -> bool:
    """Whether ``path`` is a Parquet file (by its magic bytes, not its name)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == PARQUET_MAGIC
    except OSError:
        return False


def require_pyarrow() -> Any:
    """``pyarrow.parquet``, or a :class:`UserError` saying how to install it."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError('reading Parquet files needs pyarrow: pip install -e ".[vlm]" (or pip install pyarrow)') \
            from None
    return pq


def parquet_record(conversations: Any, images: Any) -> tuple[Optional[dict], Optional[str]]:
    """``(record, None)`` of one MiniMind-V row, or ``(None, why it is not one)``."""
    if isinstance(conversations, (str, bytes)):
        try:
            conversations = json.loads(conversations)
        except ValueError as exc:
            return None, f"{CONVERSATIONS_COLUMN!r} is not valid JSON ({exc})"
    images = [] if images is None else list(images) if isinstance(images, list) else [images]
    if len(images) == 1 and isinstance(conversations, list) and count_image_tags(conversations) == 0:
        images = []  # MiniMind-V's placeholder image of a text-only row
    return {CONVERSATIONS_COLUMN: conversations, IMAGES_FIELD: images}, None


def _hash_file(path: Path, hasher: Any) -> None:
    with open(path, "rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            hasher.update(block)


def parquet_blocks(path: Union[str, Path], hasher: Any = None,
                   batch_rows: int = BATCH_ROWS) -> Iterator[tuple[int, RecordBlock, int]]:
    """``(first row number, RecordBlock, bytes of the file it stands for)`` per batch of rows, in file order;
    ``hasher`` (a ``hashlib`` object) gets every byte of the file first."""
    path = Path(path)
    pq = require_pyarrow()
    if hasher is not None:
        _hash_file(path, hasher)
    parquet = pq.ParquetFile(path)
    missing = {CONVERSATIONS_COLUMN, IMAGES_COLUMN} - set(parquet.schema_arrow.names)
    if missing:
        raise UserError(f"{path}: no column {', '.join(sorted(missing))} (it has: "
                        f"{', '.join(parquet.schema_arrow.names)}); MiniMind-V's Parquet files have "
                        f"{CONVERSATIONS_COLUMN!r} and {IMAGES_COLUMN!r}")
    size, rows = os.path.getsize(path), max(1, parquet.metadata.num_rows)
    first = 1
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=[CONVERSATIONS_COLUMN, IMAGES_COLUMN]):
        block = RecordBlock(records=[], n_lines=batch.num_rows)
        pairs = zip(batch.column(0).to_pylist(), batch.column(1).to_pylist())
        for row, (conversations, images) in enumerate(pairs, start=first):
            record, error = parquet_record(conversations, images)
            if error:
                block.errors.append((row, error))
            else:
                block.records.append((row, record))
        yield first, block, size * batch.num_rows // rows
        first += batch.num_rows
