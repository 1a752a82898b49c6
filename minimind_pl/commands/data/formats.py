"""The jsonl formats the data tools read, what a model sees of a record, and the text rules of ``data clean``.

Formats (MiniMind's files):

- ``pretrain``: ``{"text": ...}`` (pretrain_hq.jsonl, pretrain_t2t*.jsonl);
- ``sft``: ``{"conversations": [messages]}`` whose assistant turns all answer (sft_*.jsonl, lora_*.jsonl, r1_mix);
- ``dpo``: ``{"chosen": [messages], "rejected": [messages]}`` (dpo.jsonl);
- ``rl``: prompts for reinforcement learning: conversations whose last assistant turn is empty (rlaif.jsonl),
  or ``{"prompt": ...}``.

The validity of a record is the training code's own rule (:func:`check_text_record`,
:func:`check_conversation_record` with :func:`empty_answer_error`, :func:`check_pair`, and the message checks
of :func:`prepare_messages`; RL prompts: :func:`check_prompt_record`), so a line ``data clean`` keeps is a line
training accepts.
"""
from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from typing import Any, Callable, Optional

from minimind_pl.chat_format import REASONING_FIELDS, prepare_messages
from minimind_pl.data.dpo import SIDES, check_pair
from minimind_pl.data.jsonl import parse_line
from minimind_pl.data.pretrain import check_text_record
from minimind_pl.data.prompts import check_prompt_record
from minimind_pl.data.sft import check_conversation_record, empty_answer_error
from minimind_pl.errors import UserError

FORMATS = ("pretrain", "sft", "dpo", "rl")
MESSAGE_TEXT_FIELDS = ("content", *REASONING_FIELDS)  # the strings of a message that the model reads

# Characters that carry no text: C0/C1 controls except tab and newline, the byte-order mark, zero-width space.
CONTROL_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufeff\u200b]")
TRAILING_SPACE = re.compile(r"[ \t]+(?=\n)")
BLANK_LINES = re.compile(r"\n{3,}")
CJK_RANGES = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # CJK unified ideographs (+ ext. A, compatibility)
CHINESE_CHARS = re.compile(f"[{CJK_RANGES}]")
ENGLISH_LETTERS = re.compile("[A-Za-z]")
LETTERS = re.compile(r"[^\W\d_]")  # a letter of any script
LANGUAGES = ("zh", "en", "other")


def detect_format(obj: Any) -> Optional[str]:
    """The format a parsed record is written in (by its fields), or None when it is none of them."""
    if not isinstance(obj, dict):
        return None
    if "chosen" in obj or "rejected" in obj:
        return "dpo"
    if "text" in obj:
        return "pretrain"
    if "prompt" in obj:
        return "rl"
    conversation = obj.get("conversations")
    if isinstance(conversation, list) and conversation:
        last = conversation[-1]
        unanswered = isinstance(last, dict) and last.get("role") == "assistant" and not str(last.get("content") or "").strip()
        return "rl" if unanswered else "sft"
    return "sft" if "conversations" in obj else None


def _check_messages(messages: list) -> Optional[str]:
    """The chat format's message checks (roles, content types, tools JSON), as an error string."""
    try:
        prepare_messages(messages)
    except ValueError as exc:
        return f"invalid conversation: {exc}"
    return None


def check_record(obj: Any, data_format: str) -> Optional[str]:
    """Why ``obj`` is not a valid record of ``data_format`` for training, or None."""
    if data_format == "pretrain":
        return check_text_record(obj)
    if data_format == "sft":
        error = check_conversation_record(obj)
        return error or _check_messages(obj["conversations"]) or empty_answer_error(obj["conversations"])
    if data_format == "dpo":
        return check_pair(obj) or _check_messages(obj["chosen"]) or _check_messages(obj["rejected"])
    return check_prompt_record(obj)  # the RL prompts' rule: PromptDataModule's


def _map_messages(messages: list, function: Callable[[str], str]) -> list:
    return [{k: function(v) if k in MESSAGE_TEXT_FIELDS and isinstance(v, str) else v for k, v in m.items()}
            for m in messages]


def map_texts(obj: dict, data_format: str, function: Callable[[str], str]) -> dict:
    """A copy of a valid record with ``function`` applied to every string the model reads (texts, prompts,
    message contents and reasoning); other fields (roles, tools, tool calls, extra keys) are kept as they are."""
    if data_format == "pretrain":
        return {**obj, "text": function(obj["text"])}
    if data_format == "dpo":
        return {**obj, **{side: _map_messages(obj[side], function) for side in SIDES}}
    if "prompt" in obj and data_format == "rl":
        return {**obj, "prompt": function(obj["prompt"])}
    return {**obj, "conversations": _map_messages(obj["conversations"], function)}


def model_text(obj: dict, data_format: str) -> str:
    """What a model reads of a valid record, without the chat template's markup (the same for every record, so
    it would make short conversations look alike): the strings of :func:`map_texts`, one per line. A DPO pair's
    prompt appears once, then both answers."""
    if data_format == "pretrain":
        return obj["text"]
    if data_format == "rl" and "prompt" in obj:
        return obj["prompt"]
    messages = obj["chosen"] + obj["rejected"][-1:] if data_format == "dpo" else obj["conversations"]
    # the order map_texts visits them in: message by message, each message's fields in its own order
    return "\n".join(v for m in messages for k, v in m.items() if k in MESSAGE_TEXT_FIELDS and isinstance(v, str))


def normalize_text(text: str, unicode_form: Optional[str] = "NFC") -> str:
    """``text`` in one Unicode form, without control characters, with ``\\n`` line ends, no trailing spaces on a
    line, at most one empty line in a row, and no blank start or end.

    Args:
        text: the string.
        unicode_form: ``NFC`` (composes characters; the text looks the same), ``NFKC`` (also folds compatibility
            forms: full-width ``，`` becomes ``,``), or None to keep the characters as they are.
    """
    if unicode_form:
        text = unicodedata.normalize(unicode_form, text)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = CONTROL_CHARS.sub("", text)
    if " \n" in text or "\t\n" in text:  # the regular expressions only where they can match: much faster
        text = TRAILING_SPACE.sub("", text)
    if "\n\n\n" in text:
        text = BLANK_LINES.sub("\n\n", text)
    return text.strip()


def letter_counts(text: str) -> tuple[int, int, int]:
    """``(Chinese, English, other)`` letters of ``text`` (digits, punctuation and spaces are not letters)."""
    chinese, english = len(CHINESE_CHARS.findall(text)), len(ENGLISH_LETTERS.findall(text))
    return chinese, english, max(0, len(LETTERS.findall(text)) - chinese - english)


def resolve_format(path: Path, data_format: str) -> str:
    """``data_format``, or with ``auto`` the format of the first line of ``path`` that is a JSON object."""
    if data_format != "auto":
        if data_format not in FORMATS:
            raise UserError(f"--format must be auto or one of {', '.join(FORMATS)}, got {data_format!r}")
        return data_format
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            parsed, _ = parse_line(raw.rstrip(b"\r\n"), line_no)
            found = detect_format(parsed) if isinstance(parsed, dict) else None
            if found:
                return found
    raise UserError(f"{path}: no line is a record of a known format ({', '.join(FORMATS)}); "
                    "check the file, or name its format with --format")
