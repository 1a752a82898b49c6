"""The preference-pair format: MiniMind's ``dpo.jsonl`` (``{"chosen": [messages], "rejected": [messages]}``).

Trained on by :class:`minimind_pl.data.DPODataModule` (its module doc says how a pair becomes two documents).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np

from ...chat_format import empty_answer
from ..cache import RecordEncoder
from .record import UNLIMITED, DataFormat, check_messages, map_messages, message_texts

MASK_TARGET = 1  # mask bit: this token is a target (part of the final answer)
MASK_TRUNCATED = 2  # mask bit, on a document's first token: the pair was cut to fit seq_len
OVERLONG_MODES = ("truncate", "error")
SIDES = ("chosen", "rejected")


def _common_prefix(texts: Sequence[str]) -> str:
    """Longest common prefix of several strings."""
    first, last = min(texts), max(texts)
    n = 0
    while n < len(first) and first[n] == last[n]:
        n += 1
    return first[:n]


def check_pair(obj: Any) -> Optional[str]:
    """Why ``obj`` is not a valid preference pair, or None."""
    if not isinstance(obj, dict) or any(side not in obj for side in SIDES):
        keys = ", ".join(map(str, list(obj)[:8])) if isinstance(obj, dict) else type(obj).__name__
        return f"expected a JSON object with 'chosen' and 'rejected' message lists (got: {keys or 'none'})"
    for side in SIDES:
        msgs = obj[side]
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, Mapping) for m in msgs):
            return f"'{side}' must be a non-empty list of messages"
        if msgs[-1].get("role") != "assistant":
            return f"the last '{side}' message must be the assistant's answer (role {msgs[-1].get('role')!r})"
        if empty_answer(msgs[-1]):  # the same rule as SFT's: tool calls answer, reasoning alone does not
            return f"empty {side} answer"
    chosen, rejected = obj["chosen"][:-1], obj["rejected"][:-1]
    if not chosen:
        return "a pair needs a prompt: at least one message before the final answer"
    if chosen != rejected:
        k = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
        return f"chosen and rejected have different prompts (first difference at message {k})"
    return None


class DPOEncoder(RecordEncoder):
    """A preference pair -> two documents (chosen, rejected): prompt tokens + answer tokens.

    The mask marks answer tokens with ``MASK_TARGET``; the first token of a truncated pair's documents
    also carries ``MASK_TRUNCATED``. See the module doc for how prompt and answer are split.

    Args:
        tokenizer: the tokenizer (its chat template renders the conversations).
        max_tokens: the most tokens a document may have (``seq_len + 1``: inputs plus the last target).
        overlong: ``"truncate"`` (prompt first) or ``"error"`` for pairs longer than ``max_tokens``.
    """

    kind = "dpo"
    version = 1
    has_mask = True
    docs_per_record = 2

    def __init__(self, tokenizer: Any, max_tokens: int, overlong: str = "truncate") -> None:
        super().__init__(tokenizer)
        if overlong not in OVERLONG_MODES:
            raise ValueError(f"overlong must be one of {OVERLONG_MODES}, got {overlong!r}")
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
        self.max_tokens = int(max_tokens)
        self.overlong = overlong

    def settings(self) -> dict:
        """Cache key: the base settings plus the length limit and what happens beyond it."""
        return {**super().settings(), "max_tokens": self.max_tokens, "overlong": self.overlong}

    def split_texts(self, obj: dict) -> tuple[str, str, str]:
        """``(prompt, chosen answer, rejected answer)`` texts of a valid pair (see the module doc)."""
        tok = self.tokenizer
        generation = tok.apply_chat_template(obj["chosen"][:-1], add_generation_prompt=True)
        full = [tok.apply_chat_template(obj[side]) for side in SIDES]
        prompt = _common_prefix([generation, *full])
        eos = tok.id_to_token(tok.eos_id)
        answers = [text[len(prompt):] for text in full]
        answers = [a[: a.rindex(eos) + len(eos)] if eos and eos in a else a.rstrip("\n") for a in answers]
        return prompt, answers[0], answers[1]

    def encode_records(self, records: Sequence[tuple[int, Any]]) -> list:
        """Validate, render and tokenize the pairs; invalid ones become error strings."""
        out: list = [None] * len(records)
        texts: list[str] = []
        for i, (_, obj) in enumerate(records):
            try:
                out[i] = check_pair(obj) or len(texts)
                if not isinstance(out[i], str):
                    texts.extend(self.split_texts(obj))
            except ValueError as exc:  # the chat template names the bad message
                out[i] = str(exc)
        ids = self.tokenizer.encode_batch(texts) if texts else []
        for i, res in enumerate(out):
            if not isinstance(res, str):
                out[i] = self.make_documents(*ids[res:res + 3])
        return out

    def make_documents(self, prompt: list[int], chosen: list[int], rejected: list[int]) -> Union[list, str]:
        """The two ``(ids, mask)`` documents of a pair, fitted into ``max_tokens``, or an error string."""
        if not chosen or not rejected:
            return "empty answer after tokenization"
        longest = len(prompt) + max(len(chosen), len(rejected))
        excess = longest - self.max_tokens
        if excess > 0 and self.overlong == "error":
            return (f"pair of {longest} tokens is longer than seq_len + 1 = {self.max_tokens} "
                    "(raise seq_len, or set overlong='truncate')")
        keep_prompt = len(prompt) - min(max(excess, 0), max(len(prompt) - 1, 0))
        prompt = prompt[len(prompt) - keep_prompt:]
        docs = []
        for answer in (chosen, rejected):
            answer = answer[: self.max_tokens - len(prompt)]
            ids = np.asarray(prompt + answer, dtype=np.int64)
            mask = np.zeros(ids.size, np.uint8)
            mask[len(prompt):] = MASK_TARGET
            mask[0] |= MASK_TRUNCATED if excess > 0 else 0
            docs.append((ids, mask))
        return docs


def dpo_encoder(tokenizer: Any, augment: bool = True) -> DPOEncoder:
    """DPODataModule's encoder at its default settings (nothing random), without a length limit."""
    return DPOEncoder(tokenizer, max_tokens=UNLIMITED)


def has_sides(obj: dict) -> bool:
    """A ``chosen`` or a ``rejected`` field makes a preference pair."""
    return "chosen" in obj or "rejected" in obj


def check_dpo_record(obj: Any) -> Optional[str]:
    """Why ``obj`` is not a pair DPOEncoder trains on: its fields, then each side's messages."""
    return check_pair(obj) or check_messages(obj["chosen"]) or check_messages(obj["rejected"])


def pair_texts(obj: dict) -> list[str]:
    """The prompt's texts once, then both answers."""
    return message_texts(obj["chosen"] + obj["rejected"][-1:])


def map_pair(obj: dict, function: Callable[[str], str]) -> dict:
    """The pair with ``function`` applied to the message texts of both sides."""
    return {**obj, **{side: map_messages(obj[side], function) for side in SIDES}}


DPO = DataFormat(name="dpo", data_module="DPODataModule", fields='{"chosen": [messages], "rejected": [messages]}',
                 detect=has_sides, check=check_dpo_record, texts=pair_texts, map_texts=map_pair, encoder=dpo_encoder)
