"""The jsonl data formats: one :class:`DataFormat` record per format, and the registry that lists them.

Formats (MiniMind's files), in the order they claim a line:

- ``dpo``: ``{"chosen": [messages], "rejected": [messages]}`` (dpo.jsonl), :mod:`.dpo`;
- ``pretrain``: ``{"text": ...}`` (pretrain_hq.jsonl, pretrain_t2t*.jsonl), :mod:`.pretrain`;
- ``vlm``: ``{"conversations": [messages], "images": [paths]}``: conversations about images, with ``<image>`` tags
  (MiniMind-V), :mod:`.vlm`; also every MiniMind-V Parquet file (told by its content, not a line);
- ``rl``: prompts for reinforcement learning: ``{"prompt": ...}``, or conversations whose last assistant turn is
  empty (rlaif.jsonl), :mod:`.prompts`;
- ``sft``: ``{"conversations": [messages]}`` whose assistant turns all answer (sft_*.jsonl, lora_*.jsonl, r1_mix),
  :mod:`.sft`.

One rule says which format a line is, for every tool (``data`` stats/clean, ``eval``, tokenizer training): the
first format of :data:`FORMATS` whose ``detect`` accepts the object. So a line with both ``text`` and
``conversations`` is pretraining data everywhere, and a conversation is an image conversation only when it has an
``images`` field (a plain SFT line never has one). A record's validity is its format's ``check``, the training
code's own rule, so a line ``data clean`` keeps is a line training accepts.

Nothing here imports Lightning (the commands that read data start without it). To add a format, see
docs/DESIGN.md ("Extension points").
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

from ...errors import UserError
from ..jsonl import parse_line, read_jsonl
from ..parquet import is_parquet
from .dpo import DPO
from .pretrain import PRETRAIN
from .prompts import RL
from .record import DataFormat
from .sft import SFT
from .vlm import VLM

#: Every format, in the order they claim a line (the first whose ``detect`` accepts it owns it).
FORMATS: tuple[DataFormat, ...] = (DPO, PRETRAIN, VLM, RL, SFT)
FORMAT_NAMES = tuple(f.name for f in FORMATS)

__all__ = ["DataFormat", "FORMATS", "FORMAT_NAMES", "detect_format", "format_named", "jsonl_texts",
           "resolve_format"]


def detect_format(obj: Any) -> Optional[DataFormat]:
    """The format a parsed line is written in (by its fields), or None when it is none of them."""
    if not isinstance(obj, dict):
        return None
    return next((f for f in FORMATS if f.detect(obj)), None)


def format_named(name: str, argument: str = "--format") -> DataFormat:
    """The format called ``name``; a :class:`UserError` naming ``argument`` for an unknown name."""
    for data_format in FORMATS:
        if data_format.name == name:
            return data_format
    raise UserError(f"{argument} must be auto or one of {', '.join(FORMAT_NAMES)}, got {name!r}")


def resolve_format(path: Path, name: str) -> DataFormat:
    """The format ``name``, or with ``auto`` the format of the first line of ``path`` that is a JSON object of
    a known format. A Parquet file is MiniMind-V's, of the ``vlm`` format whatever ``name`` says otherwise."""
    if is_parquet(path):
        if name not in ("auto", VLM.name):
            raise UserError(f"{path} is a Parquet file, read as MiniMind-V's image conversations (--format auto or "
                            f"{VLM.name}), not {name!r}")
        return VLM
    if name != "auto":
        return format_named(name)
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            parsed, _ = parse_line(raw.rstrip(b"\r\n"), line_no)
            found = detect_format(parsed)
            if found:
                return found
    raise UserError(f"{path}: no line is a record of a known format ({', '.join(FORMAT_NAMES)}); "
                    "check the file, or name its format with --format")


def jsonl_texts(files: Sequence[Union[str, Path]], argument: str = "--data") -> Iterator[str]:
    """The non-empty strings a model reads in jsonl files, line by line (tokenizer training reads them).

    Each line may be of any format (its ``texts``: a pretraining text; the message texts of a conversation, an RL
    prompt or a preference pair). Lines are not held to the training rules (a conversation without an answer still
    has text to learn a vocabulary from); a missing file, a line that is not JSON, of no known format, or whose
    fields are not what its format says raises :class:`UserError` naming file and line.

    Args:
        files: the jsonl files, read one after the other.
        argument: the argument they came from, for the messages.
    """
    if not files:
        raise UserError(f"name at least one jsonl file ({argument})")
    for path in files:
        for line_no, record in read_jsonl(path, argument):
            yield from record_texts(record, f"{path}:{line_no}")


def record_texts(record: Any, where: str) -> list[str]:
    """The non-empty strings of one parsed line (:func:`jsonl_texts`); ``where`` (``FILE:LINE``) names it in errors."""
    data_format = detect_format(record)
    if data_format is None:
        raise UserError(f"{where}: not a record of a known format (expected one of: "
                        f"{'; '.join(f.fields for f in FORMATS)}); fix the line")
    try:
        texts = data_format.texts(record)
    except (KeyError, TypeError, AttributeError):  # fields of the wrong type: the format's check says which
        raise UserError(f"{where}: {data_format.check(record) or 'malformed record'}; fix the line") from None
    return [text for text in texts if isinstance(text, str) and text]
