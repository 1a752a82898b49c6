"""The SFT format: ``{"conversations": [...]}`` lines in MiniMind's chat format, loss on assistant turns only.

Trained on by :class:`minimind_pl.data.SFTDataModule` (also for LoRA and distillation).

A conversation is a list of messages ``{"role": "system"|"user"|"assistant"|"tool", "content": ...}``
with MiniMind's optional fields: ``reasoning_content`` (assistant), ``tools`` (system; list or JSON
string) and ``tool_calls`` (assistant; list or JSON string). It is rendered exactly as MiniMind's
SFTDataset renders it, ``tokenizer.apply_chat_template(conversation, tools=<system's tools>)``, with
MiniMind's two augmentations, decided per line by an RNG seeded from ``(seed, line number)`` so the
cache is deterministic:

- with probability ``system_prompt_ratio`` (0.2) a conversation without a system message (and
  without tools) gets a random system prompt from :data:`SYSTEM_PROMPTS`;
- with probability ``empty_think_drop_ratio`` (0.8) the empty ``<think>\\n\\n</think>\\n\\n`` blocks
  the template writes for assistant turns without reasoning are removed.

The loss mask is found on the token ids as MiniMind does: every span that starts after the tokens of
``<|im_start|>assistant\\n`` and runs through the next ``<|im_end|>\\n`` (both tokens included) is a
target; so the model learns the assistant's (think block +) answer, ``<|im_end|>`` and the newline
after it, never the system prompt, user turns, tool results or padding.

Since every assistant turn is a target, each must say something: a turn whose answer is blank is an
error naming file and line (or skipped and counted with ``skip_invalid``). Tool calls are an answer;
reasoning alone is not (``reasoning_content``, or a ``<think>`` block in ``content``, with nothing after
it): training on it would teach the model to stop after thinking, and it is what ``generate`` writes for
a teacher cut off while reasoning.
"""
from __future__ import annotations

import hashlib
import random
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ...chat_format import EMPTY_THINK, REASONING_FIELDS, THINK_CLOSE, empty_answer
from ...errors import UserError
from ..cache import RecordEncoder
from .record import DataFormat, check_messages, map_messages, message_texts

#: System prompts for the random-system-prompt augmentation (MiniMind's list).
SYSTEM_PROMPTS: tuple[str, ...] = (
    "你是一个知识丰富的AI，尽力为用户提供准确的信息。",
    "你是minimind，一个小巧但有用的语言模型。",
    "你是一个专业的AI助手，请提供有价值的回答。",
    "你是minimind，请尽力帮助用户解决问题。",
    "你是一个可靠的AI，请给出准确的回答。",
    "You are a helpful AI assistant.",
    "You are minimind, a lightweight intelligent assistant.",
    "You are a friendly chatbot. Please answer the user's questions carefully.",
    "You are a knowledgeable AI. Try your best to provide accurate information.",
    "You are minimind, a small but useful language model.",
)


def find_pattern(ids: np.ndarray, pattern: np.ndarray) -> np.ndarray:
    """Start positions of every occurrence of ``pattern`` in ``ids`` (ascending)."""
    n, m = ids.size, pattern.size
    if m == 0 or n < m:
        return np.zeros(0, np.int64)
    cand = np.flatnonzero(ids[: n - m + 1] == pattern[0])
    for j in range(1, m):
        cand = cand[ids[cand + j] == pattern[j]]
    return cand


def assistant_mask(ids: Sequence[int] | np.ndarray, start: Sequence[int], end: Sequence[int]) -> np.ndarray:
    """MiniMind's SFT label rule as a uint8 mask over ``ids`` (1 = token is a training target).

    Scanning left to right: at each occurrence of ``start`` (the ids of ``<|im_start|>assistant\\n``)
    the tokens after it, through the next occurrence of ``end`` (``<|im_end|>\\n``) inclusive, are
    targets; without a closing ``end`` the span runs to the end. Scanning resumes after the span.
    """
    ids = np.asarray(ids, dtype=np.int64)
    start_a, end_a = np.asarray(start, np.int64), np.asarray(end, np.int64)
    mask = np.zeros(ids.size, np.uint8)
    ends = find_pattern(ids, end_a)
    resume = 0
    for s in find_pattern(ids, start_a).tolist():
        if s < resume:
            continue
        first = s + start_a.size
        k = int(np.searchsorted(ends, first))
        stop = int(ends[k]) + end_a.size if k < ends.size else ids.size
        mask[first:stop] = 1
        resume = stop
    return mask


def check_conversation_record(obj: Any, field: str = "conversations") -> Optional[str]:
    """Why ``obj`` is not a ``{field: [messages]}`` record with an assistant turn, or None (the message fields
    are checked when the conversation is rendered, :func:`minimind_pl.chat_format.prepare_messages`)."""
    if not isinstance(obj, dict):
        return f"expected a JSON object with a {field!r} field, got {type(obj).__name__}"
    if field not in obj:
        return f"missing {field!r} field (keys: {', '.join(map(str, list(obj)[:8])) or 'none'})"
    conv = obj[field]
    if not isinstance(conv, list):
        return f"{field!r} must be a list of messages, got {type(conv).__name__}"
    if not conv:
        return f"empty document ({field!r} is an empty list)"
    for j, m in enumerate(conv):
        if not isinstance(m, dict):
            return f"message {j} must be an object, got {type(m).__name__}"
    if not any(m.get("role") == "assistant" for m in conv):
        return "conversation has no assistant turn (nothing to learn)"
    return None


def empty_answer_error(conversation: list) -> Optional[str]:
    """Why a (well-formed) conversation has an assistant turn with nothing to learn, or None.

    Every assistant turn is a target, so each needs an answer or tool calls; reasoning alone is not
    an answer (see :func:`minimind_pl.chat_format.empty_answer`).
    """
    for j, m in enumerate(conversation):
        if m.get("role") == "assistant" and empty_answer(m):
            thought = any(m.get(key) for key in REASONING_FIELDS) or THINK_CLOSE in str(m.get("content"))
            after = " after its reasoning" if thought else ""
            return (f"empty answer: message {j} (assistant) has blank content{after} and no tool_calls, "
                    "but every assistant turn is trained on")
    return None


def with_system_prompt(messages: Sequence[dict], rng: random.Random, ratio: float,
                       prompts: Sequence[str] = SYSTEM_PROMPTS) -> list[dict]:
    """MiniMind's augmentation (``pre_processing_chat``): with probability ``ratio`` a conversation without tools and
    without a system turn gets a random one of ``prompts`` first. Draws two numbers from ``rng`` whatever happens."""
    draw, pick = rng.random(), rng.randrange(max(1, len(prompts)))
    messages = list(messages)
    if not any(m.get("tools") for m in messages) and messages[0].get("role") != "system" and draw < ratio:
        messages = [{"role": "system", "content": prompts[pick]}] + messages
    return messages


class SFTEncoder(RecordEncoder):
    """Conversations -> chat-template tokens + assistant loss mask (MiniMind's SFTDataset rules).

    Args:
        tokenizer: the tokenizer (with a chat template).
        seed: seed of the per-line augmentation RNG.
        system_prompt_ratio: probability of adding a random system prompt.
        empty_think_drop_ratio: probability of removing empty think blocks.
        system_prompts: the prompts to draw from.
        field: name of the conversation field.
    """

    kind = "sft"
    version = 1
    has_mask = True

    def __init__(self, tokenizer: Any, seed: int = 42, system_prompt_ratio: float = 0.2,
                 empty_think_drop_ratio: float = 0.8, system_prompts: Sequence[str] = SYSTEM_PROMPTS,
                 field: str = "conversations") -> None:
        super().__init__(tokenizer)
        for name, value in (("system_prompt_ratio", system_prompt_ratio),
                            ("empty_think_drop_ratio", empty_think_drop_ratio)):
            if not 0.0 <= value <= 1.0:
                raise UserError(f"{name} must be in [0, 1], got {value} (--data.{name})")
        if system_prompt_ratio > 0 and not system_prompts:
            raise ValueError("system_prompts is empty")
        self.seed = int(seed)
        self.system_prompt_ratio = float(system_prompt_ratio)
        self.empty_think_drop_ratio = float(empty_think_drop_ratio)
        self.system_prompts = tuple(system_prompts)
        self.field = field
        bos, eos = tokenizer.token_to_id("<|im_start|>"), tokenizer.token_to_id("<|im_end|>")
        if bos is None or eos is None:
            raise ValueError("the tokenizer has no <|im_start|>/<|im_end|> tokens; SFT needs a ChatML tokenizer")
        self.start_ids = np.asarray(tokenizer.encode("<|im_start|>assistant\n"), np.int64)
        self.end_ids = np.asarray(tokenizer.encode("<|im_end|>\n"), np.int64)

    def settings(self) -> dict:
        """Cache key: base settings, the augmentations (and the seed when they are random) and the label patterns."""
        random_aug = any(0.0 < r < 1.0 for r in (self.system_prompt_ratio, self.empty_think_drop_ratio))
        prompts = hashlib.sha256("\x00".join(self.system_prompts).encode()).hexdigest()[:16]
        return {
            **super().settings(),
            "field": self.field,
            "system_prompt_ratio": self.system_prompt_ratio,
            "empty_think_drop_ratio": self.empty_think_drop_ratio,
            "system_prompts": prompts,
            "seed": self.seed if random_aug else None,
            "start_ids": self.start_ids.tolist(),
            "end_ids": self.end_ids.tolist(),
        }

    def render(self, conversation: list, line_no: int) -> str:
        """The training text of one conversation, with the line's seeded augmentations."""
        rng = random.Random(f"minimind-sft:{self.seed}:{line_no}")
        messages = with_system_prompt(conversation, rng, self.system_prompt_ratio, self.system_prompts)
        r_think = rng.random()
        text = self.tokenizer.apply_chat_template(messages)
        if EMPTY_THINK in text and r_think < self.empty_think_drop_ratio:
            text = text.replace(EMPTY_THINK, "")
        return text

    def encode_records(self, records: Sequence[tuple[int, Any]]) -> list:
        """Render, tokenize (one batch) and mask ``records``; invalid ones become error strings."""
        out: list = [None] * len(records)
        texts, where = [], []
        for i, (line_no, obj) in enumerate(records):
            err = check_conversation_record(obj, self.field)
            if err is None:
                try:
                    text = self.render(obj[self.field], line_no)  # also checks roles and content types
                    err = empty_answer_error(obj[self.field])
                except ValueError as exc:
                    err = f"invalid conversation: {exc}"
            if err is None:
                texts.append(text)
                where.append(i)
            else:
                out[i] = err
        for i, ids in zip(where, self.tokenizer.encode_batch(texts) if texts else []):
            ids = np.asarray(ids, np.int64)
            mask = assistant_mask(ids, self.start_ids, self.end_ids)
            if not mask.any():
                out[i] = "no assistant tokens found in the rendered conversation"
            else:
                out[i] = [(ids, mask)]
        return out


def sft_encoder(tokenizer: Any, augment: bool = True) -> SFTEncoder:
    """SFTDataModule's encoder at its default settings; ``augment=False``: no random system prompt, and the empty
    think blocks kept (``eval`` scores the same tokens every time)."""
    if augment:
        return SFTEncoder(tokenizer)
    return SFTEncoder(tokenizer, system_prompt_ratio=0.0, empty_think_drop_ratio=0.0)


def has_conversations(obj: dict) -> bool:
    """A ``conversations`` field makes an SFT line (once the RL format has claimed unanswered ones)."""
    return "conversations" in obj


def check_sft_record(obj: Any) -> Optional[str]:
    """Why ``obj`` is not a conversation SFTEncoder trains on: its fields, its messages, an empty answer."""
    error = check_conversation_record(obj)
    return error or check_messages(obj["conversations"]) or empty_answer_error(obj["conversations"])


def conversation_texts(obj: dict) -> list[str]:
    """The conversation's message texts."""
    return message_texts(obj["conversations"])


def map_conversation(obj: dict, function: Callable[[str], str]) -> dict:
    """The record with ``function`` applied to its message texts."""
    return {**obj, "conversations": map_messages(obj["conversations"], function)}


SFT = DataFormat(name="sft", data_module="SFTDataModule", fields='{"conversations": [messages]}',
                 detect=has_conversations, check=check_sft_record, texts=conversation_texts,
                 map_texts=map_conversation, encoder=sft_encoder)
