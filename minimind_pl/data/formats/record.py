"""What a data format is (:class:`DataFormat`), and the message helpers the chat formats share.

A format's record is declared in its own module of :mod:`minimind_pl.data.formats` (beside the DataModule that
trains on it, :mod:`minimind_pl.data`); nothing here imports Lightning.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from minimind_pl.chat_format import REASONING_FIELDS, prepare_messages

MESSAGE_TEXT_FIELDS = ("content", *REASONING_FIELDS)  # the strings of a message that the model reads
UNLIMITED = 1 << 30  # a length limit no document reaches: the tools count whole documents


@dataclass(frozen=True)
class DataFormat:
    """One jsonl data format: how a line is recognised, judged, read as text and tokenized.

    Attributes:
        name: its name (``data --format``, the ``format`` of ``data stats``).
        data_module: the class in :mod:`minimind_pl.data` that trains on it (``SFTDataModule``).
        fields: the fields of a line, for messages (``{"text": ...}``).
        detect: whether a JSON object is written in this format, by its fields alone (the registry asks the
            formats in its order; the first that says yes owns the line).
        check: why a record is not valid training data (the training code's own rule), or None.
        texts: the strings a model reads of a valid record, in order (``data stats`` and ``data clean`` join
            them into its model text, tokenizer training reads them); no chat markup.
        map_texts: a copy of a valid record with a function applied to each string of ``texts`` (``data clean``
            normalises them); every other field is kept.
        encoder: ``encoder(tokenizer, augment=True)``: the :class:`~minimind_pl.data.cache.RecordEncoder` its
            DataModule trains with at its default settings and without a length limit (``data stats`` counts
            the tokens training sees); ``augment=False`` turns the random augmentations off (``eval`` scores the
            same tokens every time).
        counted_documents: how many of a record's encoded documents are model input (None: all; RL prompts:
            1, the prompt and not its ground truth).
        count_images: how many images a valid record holds (None: a text-only format); ``data stats`` reports
            images per record.
    """

    name: str
    data_module: str
    fields: str
    detect: Callable[[dict], bool]
    check: Callable[[Any], Optional[str]]
    texts: Callable[[dict], list]
    map_texts: Callable[[dict, Callable[[str], str]], dict]
    encoder: Callable[..., Any]
    counted_documents: Optional[int] = None
    count_images: Optional[Callable[[dict], int]] = None

    def model_text(self, obj: dict) -> str:
        """What a model reads of a valid record, one string per line (exact duplicates are judged on it)."""
        return "\n".join(self.texts(obj))


def message_texts(messages: list) -> list[str]:
    """The strings the model reads of messages: each message's text fields, in the message's own key order
    (the order :func:`map_messages` visits them in)."""
    return [v for m in messages if isinstance(m, dict) for k, v in m.items()
            if k in MESSAGE_TEXT_FIELDS and isinstance(v, str)]


def map_messages(messages: list, function: Callable[[str], str]) -> list:
    """A copy of ``messages`` with ``function`` applied to their text fields (roles, tools, tool calls kept)."""
    return [{k: function(v) if k in MESSAGE_TEXT_FIELDS and isinstance(v, str) else v for k, v in m.items()}
            for m in messages]


def check_messages(messages: list) -> Optional[str]:
    """The chat format's message checks (roles, content types, tools JSON) as an error string, or None."""
    try:
        prepare_messages(messages)
    except ValueError as exc:
        return f"invalid conversation: {exc}"
    return None
