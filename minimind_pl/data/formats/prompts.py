"""The RL prompt format: MiniMind's ``rlaif.jsonl`` (a conversation whose last assistant turn is empty, or that
ends with a user turn) or ``{"prompt": "..."}`` lines, with an optional ground truth ``gt``.

Trained on by :class:`minimind_pl.data.PromptDataModule` (its module doc says how a prompt is rendered).
"""
from __future__ import annotations

import random
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ...errors import UserError
from ..cache import RecordEncoder
from .record import UNLIMITED, DataFormat, check_messages, map_messages, message_texts
from .sft import with_system_prompt


def check_prompt_record(obj: Any) -> Optional[str]:
    """Why ``obj`` is not an RL prompt (``{"prompt": ...}``, or a conversation ending in an empty assistant turn
    or a user turn), or None."""
    if isinstance(obj, dict) and "prompt" in obj:
        prompt = obj["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            return "'prompt' must be a non-empty string"
        return _check_gt(obj)
    conversation = obj.get("conversations") if isinstance(obj, dict) else None
    if not isinstance(conversation, list) or not conversation or not all(isinstance(m, dict) for m in conversation):
        return "expected a JSON object with a 'prompt' string or a non-empty 'conversations' list of messages"
    asked = prompt_turns(conversation)
    if not any(m.get("role") == "user" and str(m.get("content") or "").strip() for m in asked):
        return "empty prompt (no user turn with text)"
    if asked[-1].get("role") == "assistant":
        return "the prompt ends with an answered assistant turn: leave the last assistant turn empty"
    return check_messages(conversation) or _check_gt(obj)


def _check_gt(obj: dict) -> Optional[str]:
    """Why the record's ``gt`` cannot serve as a ground truth, or None."""
    gt = obj.get("gt")
    if gt is not None and (isinstance(gt, bool) or not isinstance(gt, (str, int, float))):
        return f"'gt' must be a string or a number, got {type(gt).__name__}"
    return None


def prompt_turns(conversation: Sequence[dict]) -> list[dict]:
    """The turns the model is asked: the conversation without its final, empty assistant turn."""
    last = conversation[-1]
    if last.get("role") == "assistant" and not str(last.get("content") or "").strip() and not last.get("tool_calls"):
        return list(conversation[:-1])
    return list(conversation)


class PromptEncoder(RecordEncoder):
    """An RL prompt line -> two documents: the rendered prompt's tokens, and ``bos`` + the tokens of ``gt``.

    Args:
        tokenizer: the tokenizer (its chat template renders the prompt).
        max_tokens: the most prompt tokens (longer prompts keep their end).
        thinking_ratio: probability that a prompt leaves a ``<think>`` block open (MiniMind: 0.9).
        seed: seed of the per-line draws.
        system_prompt_ratio: probability of a random system prompt first (``sft.with_system_prompt``; MiniMind: 0.2).
    """

    kind = "prompts"
    version = 1
    docs_per_record = 2

    def __init__(self, tokenizer: Any, max_tokens: int, thinking_ratio: float = 0.0, seed: int = 42,
                 system_prompt_ratio: float = 0.0) -> None:
        super().__init__(tokenizer)
        for name, value in (("thinking_ratio", thinking_ratio), ("system_prompt_ratio", system_prompt_ratio)):
            if not 0.0 <= value <= 1.0:
                raise UserError(f"--data.{name} must be in [0, 1], got {value}")
        self.max_tokens, self.thinking_ratio, self.seed = int(max_tokens), float(thinking_ratio), int(seed)
        self.system_prompt_ratio = float(system_prompt_ratio)

    def settings(self) -> dict:
        """Cache key: the base settings, the length limit and the per-line draws."""
        random_draw = any(0.0 < r < 1.0 for r in (self.thinking_ratio, self.system_prompt_ratio))
        return {**super().settings(), "max_tokens": self.max_tokens, "thinking_ratio": self.thinking_ratio,
                "system_prompt_ratio": self.system_prompt_ratio, "seed": self.seed if random_draw else None}

    def render(self, obj: dict, line_no: int) -> str:
        """The prompt text of one valid record, with the line's seeded system prompt and thinking draws."""
        messages = [{"role": "user", "content": obj["prompt"]}] if "prompt" in obj else prompt_turns(obj["conversations"])
        rng = random.Random(f"minimind-prompts:{self.seed}:{line_no}")
        think = rng.random() < self.thinking_ratio
        messages = with_system_prompt(messages, rng, self.system_prompt_ratio)
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, open_thinking=think)

    def encode_records(self, records: Sequence[tuple[int, Any]]) -> list:
        """Validate, render and tokenize the prompts (one batch); invalid ones become error strings."""
        out: list = [None] * len(records)
        texts: list[str] = []
        for i, (line_no, obj) in enumerate(records):
            error = check_prompt_record(obj)
            if error is None:
                gt = obj.get("gt")
                texts += [self.render(obj, line_no), "" if gt is None else str(gt)]
                out[i] = len(texts) - 2
            else:
                out[i] = error
        ids = self.tokenizer.encode_batch(texts) if texts else []
        bos = self.tokenizer.bos_id
        for i, res in enumerate(out):
            if not isinstance(res, str):
                prompt, gt = ids[res][-self.max_tokens:], ids[res + 1]
                out[i] = [(np.asarray(prompt, np.int64), None), (np.asarray([bos, *gt], np.int64), None)]
        return out


def prompt_encoder(tokenizer: Any, augment: bool = True) -> PromptEncoder:
    """PromptDataModule's encoder at its default settings (no random draws), without a length limit."""
    return PromptEncoder(tokenizer, max_tokens=UNLIMITED)


def is_prompt(obj: dict) -> bool:
    """A ``prompt`` field, or a conversation whose last turn is an assistant turn left blank."""
    if "prompt" in obj:
        return True
    conversation = obj.get("conversations")
    if not isinstance(conversation, list) or not conversation:
        return False
    last = conversation[-1]
    return isinstance(last, dict) and last.get("role") == "assistant" and not str(last.get("content") or "").strip()


def prompt_texts(obj: dict) -> list[str]:
    """The prompt, or the conversation's message texts."""
    return [obj["prompt"]] if "prompt" in obj else message_texts(obj["conversations"])


def map_prompt(obj: dict, function: Callable[[str], str]) -> dict:
    """The record with ``function`` applied to its prompt or message texts (``gt`` is kept)."""
    if "prompt" in obj:
        return {**obj, "prompt": function(obj["prompt"])}
    return {**obj, "conversations": map_messages(obj["conversations"], function)}


RL = DataFormat(name="rl", data_module="PromptDataModule", fields='{"prompt": ...} or {"conversations": [..., '
                '{"role": "assistant", "content": ""}]}', detect=is_prompt, check=check_prompt_record,
                texts=prompt_texts, map_texts=map_prompt, encoder=prompt_encoder, counted_documents=1)
