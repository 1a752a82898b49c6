"""A model that answers with fixed token ids: the serve and tool-benchmark tests' stand-in for a trained model."""

from __future__ import annotations

import threading
import time

import torch
from torch import nn

from minimind_pl.commands.serve import ChatEngine, make_server
from minimind_pl.config import ModelConfig
from minimind_pl.model import CausalLMOutput

TOOL_RESPONSE = 23  # the <tool_response> token of MiniMind's tokenizer


class ScriptedModel(nn.Module):
    """Answers every prompt with the same token ids (then eos) under greedy decoding; records the prompts.

    Every row of a batch follows its own script: the row's prompt length and which script it reads (``after_tool``
    once the prompt holds a ``<tool_response>``) ride in its KV cache, so rows may join and leave between steps.
    ``delay`` seconds per forward make generation slow enough to interrupt; ``calls`` counts forwards.
    """

    def __init__(self, script: list[int], eos: int = 2, vocab_size: int = 6400, after_tool: list[int] | None = None,
                 delay: float = 0.0) -> None:
        super().__init__()
        self.config = ModelConfig.from_preset("debug", vocab_size=vocab_size)
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the model a device
        self.scripts = [script + [eos], (after_tool if after_tool is not None else script) + [eos]]
        self.delay, self.calls, self.prompts = delay, 0, []

    def forward(self, input_ids, position_ids=None, attention_mask=None, past_key_values=None, use_cache=False,
                logits_to_keep=0, **_):
        self.calls += 1
        time.sleep(self.delay)
        b, t = input_ids.shape
        if past_key_values:  # (B, 1, S, 1) caches: prompt length and script index, zeros where left-padded
            prompt_len = past_key_values[0][0].amax(dim=2)[:, 0, 0].long()
            which = past_key_values[0][1].amax(dim=2)[:, 0, 0].long()
            produced = position_ids[:, -1] - prompt_len + 1  # tokens generated so far
        else:
            mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            prompts = [row[keep.bool()].tolist() for row, keep in zip(input_ids, mask)]
            self.prompts += prompts
            prompt_len = mask.sum(1)
            which = torch.tensor([int(TOOL_RESPONSE in p) for p in prompts])
            produced = torch.zeros(b, dtype=torch.long)
        logits = torch.full((b, 1, self.config.vocab_size), -1e4)
        for row in range(b):
            script = self.scripts[int(which[row])]
            logits[row, 0, script[min(int(produced[row]), len(script) - 1)]] = 1e4
        new = tuple(value.float().view(b, 1, 1, 1).expand(b, 1, t, 1) for value in (prompt_len, which))
        if past_key_values:
            new = tuple(torch.cat([old, part], dim=2) for old, part in zip(past_key_values[0], new))
        return CausalLMOutput(logits, torch.zeros(()), [new])


def start(engine: ChatEngine, **kwargs):
    """Start a server on a free loopback port in a thread; returns (server, base_url)."""
    server = make_server(engine, port=0, **kwargs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def echo_arguments(**arguments):
    """A tool function for tests: gives its arguments back."""
    return arguments


class HistoryModel(nn.Module):
    """Answers from the whole history of its row, which it keeps as token ids in its KV cache: the reply
    ``script(history at the reply's start)`` is written token by token after the last assistant header, then eos.
    ``contexts`` records each row's history whenever a reply starts (what a fresh prompt would have held)."""

    def __init__(self, script, header: list[int], eos: int = 2, vocab_size: int = 6400) -> None:
        super().__init__()
        self.config = ModelConfig.from_preset("debug", vocab_size=vocab_size, max_position_embeddings=4096)
        self.anchor = nn.Parameter(torch.zeros(1))
        self.script, self.header, self.eos = script, header, eos
        self.contexts: list[list[int]] = []

    def next_token(self, history: list[int]) -> int:
        """The scripted token after ``history``."""
        starts = [i + len(self.header) for i in range(len(history) - len(self.header) + 1)
                  if history[i:i + len(self.header)] == self.header]
        produced = len(history) - starts[-1]
        if produced == 0:
            self.contexts.append(history)
        script = self.script(history[:starts[-1]]) + [self.eos]
        return script[min(produced, len(script) - 1)]

    def forward(self, input_ids, position_ids=None, attention_mask=None, past_key_values=None, use_cache=False,
                logits_to_keep=0, **_):
        ids = input_ids.float()[:, None, :, None]  # (B, 1, T, 1): token ids as the cache; 0 = padding
        cache = torch.cat([past_key_values[0][0], ids], dim=2) if past_key_values else ids
        logits = torch.full((input_ids.shape[0], 1, self.config.vocab_size), -1e4)
        for row, history in enumerate(cache[:, 0, :, 0].long().tolist()):
            logits[row, 0, self.next_token([t for t in history if t != 0])] = 1e4
        return CausalLMOutput(logits, torch.zeros(()), [(cache, cache)])
