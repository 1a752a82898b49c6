"""Multi-turn tool-calling episodes on the KV-cache decoder: the rollouts of agentic RL (MiniMind's
``trainer/train_agent.py``: ``rollout_single`` / ``rollout_batch``).

Every episode of a batch is a row of one ``generation.DecodeBatch``. A row samples its reply until the model closes a
call (``</tool_call>``), ends its turn (eos) or writes ``max_new_tokens``; then its calls run
(``tools.Toolbox.run``, on the parser of ``chat_format``) and the text the chat template puts between that reply and
the next one (end of turn, the ``tool`` turn with the results, the next assistant header) is fed into the same row one
token per step, beside the rows still sampling, so no row decodes its history again after a tool turn. Fed tokens are
masked out (``mask`` 0: they are not the model's, so they carry no loss, no reference KL); sampled tokens, the eos
that ends a turn included, carry 1. A row whose reply calls no tool has finished and leaves the batch; a row still
calling on its ``max_turns``-th reply is unfinished (its last calls are not run).

The text between replies is the chat template's rendering of the conversation with the reply and the results, minus
the rendering of everything before it (MiniMind takes the same difference in token ids), so the next reply sees what
a fresh prompt would show.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from minimind_pl.chat_format import TOOL_CLOSE, TURN_END, parse_reply
from minimind_pl.generation import DecodeBatch, SamplingSettings, inference_step, sample_next
from minimind_pl.tokenizer import Tokenizer
from minimind_pl.tools import ToolResult, Toolbox, tool_message


@dataclass
class AgentEpisode:
    """One episode: its prompt, the tokens after it with their loss mask, and what happened.

    Attributes:
        prompt_ids: The rendered first prompt.
        ids: Every token after the prompt: the model's replies and the fed text between them.
        mask: Per token of ``ids``: 1 where the model sampled it, 0 where it was fed.
        replies: The text of each reply.
        results: Every call run, in order.
        invalid_calls: ``<tool_call>`` blocks that were not calls.
        unfinished: Still calling tools on the last allowed reply.
    """

    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    replies: list[str] = field(default_factory=list)
    results: list[ToolResult] = field(default_factory=list)
    invalid_calls: int = 0
    unfinished: bool = False


class _Row:
    """The decoding state of one episode's row: its conversation, the current reply, tokens waiting to be fed."""

    def __init__(self, messages: list[dict[str, Any]], toolbox: Toolbox, prompt_ids: list[int]) -> None:
        self.messages, self.toolbox = messages, toolbox
        self.episode = AgentEpisode(prompt_ids)
        self.reply: list[int] = []
        self.to_feed: list[int] = []


def agent_rollouts(model: nn.Module, tokenizer: Tokenizer, conversations: Sequence[Sequence[Mapping[str, Any]]],
                   toolboxes: Sequence[Toolbox], max_turns: int = 3, max_new_tokens: int = 768,
                   sampling: SamplingSettings = SamplingSettings(temperature=0.8),
                   generator: Optional[torch.Generator] = None,
                   max_total_tokens: Optional[int] = None) -> list[AgentEpisode]:
    """Run one episode per conversation (see the module doc); MiniMind's defaults: 3 turns, 768 tokens, T 0.8.

    Args:
        model: A ``MiniMindForCausalLM`` (or anything with its forward).
        tokenizer: Its tokenizer (the chat template renders each prompt with the toolbox's schemas).
        conversations: The conversations to answer (system / user turns).
        toolboxes: Per conversation, the tools its calls run against.
        max_turns: Most replies per episode.
        max_new_tokens: Most tokens per reply.
        sampling: How tokens are chosen.
        generator: Random generator for sampling, on the model's device.
        max_total_tokens: Longest episode, prompt included (default: the model's ``max_position_embeddings``): a
            reply that reaches it ends there, and tool results that would pass it are not fed (the episode is
            unfinished).
    """
    if max_turns < 1 or max_new_tokens < 1:
        raise ValueError(f"max_turns and max_new_tokens must be >= 1, got {max_turns}, {max_new_tokens}")
    rows = []
    for conversation, toolbox in zip(conversations, toolboxes, strict=True):
        messages = [dict(m) for m in conversation]
        rows.append(_Row(messages, toolbox, tokenizer.encode_chat(messages, tools=toolbox.schemas())))
    decoder = DecodeBatch(model, track_seen=sampling.repetition_penalty != 1.0)
    with inference_step(model):
        decoder.add([row.episode.prompt_ids for row in rows])
    active = list(range(len(rows)))  # rows of the episodes still in the decoder, in decoder order
    close_id = tokenizer.token_to_id(TOOL_CLOSE)
    limit = max_total_tokens or model.config.max_position_embeddings
    while active:
        with inference_step(model):
            sampled = sample_next(decoder.logits, decoder.seen, sampling, generator).tolist()
        tokens, staying = [], []
        for slot, index in enumerate(active):
            row = rows[index]
            token = _next_token(row, sampled[slot])
            room = limit - len(row.episode.prompt_ids) - len(row.episode.ids)
            if row.to_feed or not row.reply or not _reply_ends(row, token, close_id, tokenizer.eos_id,
                                                                min(max_new_tokens, len(row.reply) + room)):
                tokens.append(token)
                staying.append(slot)
            elif _end_reply(row, tokenizer, max_turns, room):
                tokens.append(token)  # the reply's last token goes in; the text after it follows step by step
                staying.append(slot)
        decoder.keep(staying)
        active = [active[slot] for slot in staying]
        if active:
            with inference_step(model):
                decoder.feed(torch.tensor(tokens))
    return [row.episode for row in rows]


def _next_token(row: _Row, sampled: int) -> int:
    """The row's token of this step: the next one waiting to be fed (mask 0), else the sampled one (mask 1)."""
    if row.to_feed:
        token = row.to_feed.pop(0)
        row.episode.ids.append(token)
        row.episode.mask.append(0)
        return token
    row.reply.append(sampled)
    row.episode.ids.append(sampled)
    row.episode.mask.append(1)
    return sampled


def _reply_ends(row: _Row, token: int, close_id: Optional[int], eos_id: int, max_new_tokens: int) -> bool:
    """Whether the reply ends with the token just sampled: a closed call, the end of the turn, or its length."""
    return token in (close_id, eos_id) or len(row.reply) >= max_new_tokens


def _end_reply(row: _Row, tokenizer: Tokenizer, max_turns: int, room: int) -> bool:
    """Close the row's reply: run its calls and queue the text up to the next reply; False when the episode is over
    (no calls; calls on the last allowed reply, or whose results leave no ``room`` for a reply: unfinished)."""
    episode = row.episode
    text = tokenizer.decode([t for t in row.reply if t != tokenizer.eos_id], skip_special_tokens=True)
    episode.replies.append(text)
    parsed = parse_reply(text)
    episode.invalid_calls += len(parsed.invalid_calls)
    row.reply = []
    if not parsed.tool_calls:
        return False
    if len(episode.replies) >= max_turns:
        episode.unfinished = True
        return False
    before = tokenizer.decode(episode.prompt_ids + episode.ids)
    row.messages.append({"role": "assistant", "content": text})
    for call in parsed.tool_calls:
        result = row.toolbox.run(call)
        episode.results.append(result)
        row.messages.append(tool_message(result))
    after = tokenizer.apply_chat_template(row.messages, tools=row.toolbox.schemas(), add_generation_prompt=True)
    row.to_feed = tokenizer.encode(_text_after(before, after))
    if len(row.to_feed) >= room:
        episode.unfinished, row.to_feed = True, []
        return False
    return True


def _text_after(before: str, after: str) -> str:
    """``after`` less its part that renders ``before`` (the reply's rendering may differ in layout newlines: the
    difference starts at the end of the reply's last ``</tool_call>`` or at its end of turn)."""
    if after.startswith(before):
        return after[len(before):]
    cut = max(after.rfind(TOOL_CLOSE), 0)
    cut = after.find(TURN_END, cut)
    return after[cut + len(TURN_END):] if before.endswith(TURN_END) else after[cut:]
