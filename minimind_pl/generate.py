"""Text generation with a KV cache: greedy or sampled (temperature, top-k, top-p), MiniMind-style
repetition penalty, batched prompts of different lengths (left padding), and streaming.

`generate` and `stream_generate` work with any model whose forward matches
`MiniMindForCausalLM.forward`. The model runs in eval mode under `torch.inference_mode`
only while a step is computed; its train/eval mode is restored after every step, so a paused
`stream_generate` iterator never leaks inference mode or eval mode into the caller's code.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import Tensor, nn


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """MiniMind's penalty: for tokens already seen, divide positive logits and multiply negative ones.

    Args:
        logits: (B, V) float logits.
        seen: (B, V) bool, True for tokens in the prompt or the output so far.
        penalty: > 1 discourages repetition, 1 changes nothing.
    """
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k(logits: Tensor, top_k: int) -> Tensor:
    """Set every logit below the k-th largest of its row to -inf (top_k <= 0 keeps all)."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: Tensor, top_p: float) -> Tensor:
    """Nucleus filter: keep the most likely tokens until their probability reaches top_p.

    The token that crosses top_p is kept, and so is always the most likely one (top_p >= 1 keeps all).
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = torch.zeros_like(cum, dtype=torch.bool)
    drop_sorted[..., 1:] = cum[..., :-1] > top_p  # the mass before this token already exceeds top_p
    drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: Tensor, seen: Optional[Tensor] = None, temperature: float = 0.85, top_k: int = 50,
    top_p: float = 0.85, repetition_penalty: float = 1.0, do_sample: bool = True,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Pick the next token of every row from (B, V) logits; returns (B,) long.

    Greedy (argmax after the repetition penalty) when do_sample is False or temperature is 0.
    """
    logits = logits.float()
    if repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    if not do_sample or temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_top_p(filter_top_k(logits / temperature, top_k), top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


@contextmanager
def _inference_step(model: nn.Module) -> Iterator[None]:
    """Eval mode + inference mode for one step, restoring the model's previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


class _BatchDecoder:
    """KV-cache decoding state for a batch of left-padded prompts."""

    def __init__(self, model: nn.Module, prompts: list[list[int]], track_seen: bool) -> None:
        """Run the prompts through the model (prefill) and keep the cache and last logits."""
        self.model = model
        device = next(model.parameters()).device
        lengths = [len(p) for p in prompts]
        width = max(lengths)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        pad_mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            pad_mask[i, width - len(prompt):] = 1
        position_ids = (pad_mask.cumsum(-1) - 1).clamp(min=0).to(device)  # (B, T) 0.. per real token
        # no mask at all when nothing is padded: attention then takes the is_causal fast path
        self.mask = pad_mask.to(device) if min(lengths) < width else None
        self.next_pos = torch.tensor(lengths, device=device)  # (B,) position of the next token
        out = model(ids.to(device), position_ids=position_ids, attention_mask=self.mask,
                    use_cache=True, logits_to_keep=1)
        self.cache, self.logits = out.past_key_values, out.logits[:, -1]  # (B, V)
        self.seen: Optional[Tensor] = None
        if track_seen:
            self.seen = torch.zeros(self.logits.shape, dtype=torch.bool, device=device)
            for i, prompt in enumerate(prompts):
                self.seen[i, torch.tensor(prompt, device=device)] = True

    def feed(self, tokens: Tensor) -> None:
        """Append one token per row (B,) and compute the logits that follow it."""
        if self.seen is not None:
            self.seen[torch.arange(tokens.shape[0], device=tokens.device), tokens] = True
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        out = self.model(tokens[:, None], position_ids=self.next_pos[:, None], attention_mask=self.mask,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.next_pos = self.next_pos + 1
        self.cache, self.logits = out.past_key_values, out.logits[:, -1]


def _check_args(prompts: list[list[int]], max_new_tokens: int, temperature: float, top_k: int,
                top_p: float, repetition_penalty: float) -> None:
    """Raise ValueError for unusable generation arguments."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 0 or temperature < 0 or top_k < 0:
        raise ValueError(f"max_new_tokens, temperature and top_k must be >= 0, got "
                         f"{max_new_tokens}, {temperature}, {top_k}")
    if not 0 < top_p <= 1 or repetition_penalty <= 0:
        raise ValueError(f"top_p must be in (0, 1] and repetition_penalty > 0, got {top_p}, {repetition_penalty}")


def _decode_steps(
    model: nn.Module, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_k: int,
    top_p: float, repetition_penalty: float, do_sample: bool, eos_token_id: Optional[int],
    generator: Optional[torch.Generator],
) -> Iterator[list[Optional[int]]]:
    """Yield, per step, each row's new token (None for rows that already finished)."""
    _check_args(prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    if not prompts or max_new_tokens == 0:
        return
    with _inference_step(model):
        decoder = _BatchDecoder(model, prompts, track_seen=repetition_penalty != 1.0)
    finished = [False] * len(prompts)
    for step in range(max_new_tokens):
        with _inference_step(model):
            if step > 0:
                decoder.feed(tokens)
            tokens = sample_next(decoder.logits, decoder.seen, temperature, top_k, top_p,
                                 repetition_penalty, do_sample, generator)
            if eos_token_id is not None:  # finished rows keep feeding eos; it is never emitted
                tokens = tokens.masked_fill(torch.tensor(finished, device=tokens.device), eos_token_id)
        emitted: list[Optional[int]] = []
        for i, token in enumerate(tokens.tolist()):
            done = finished[i] or token == eos_token_id
            emitted.append(None if done else token)
            finished[i] = done
        yield emitted
        if all(finished):
            return


def generate(
    model: nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int = 256,
    temperature: float = 0.85,
    top_k: int = 50,
    top_p: float = 0.85,
    repetition_penalty: float = 1.0,
    do_sample: bool = True,
    eos_token_id: Optional[int] = 2,
    generator: Optional[torch.Generator] = None,
) -> list[list[int]]:
    """Continue every prompt; returns the new token ids per prompt (eos excluded).

    Args:
        model: a `MiniMindForCausalLM` (or anything with the same forward).
        prompts: token ids per prompt; lengths may differ (left padding is handled here).
        max_new_tokens: most tokens to generate per prompt.
        temperature: softmax temperature; 0 means greedy.
        top_k: sample only among the k most likely tokens (0 = no limit).
        top_p: nucleus sampling threshold (1 = off).
        repetition_penalty: MiniMind-style penalty on tokens of the prompt and output (1 = off).
        do_sample: False means greedy decoding.
        eos_token_id: a row stops after producing it (None = never stop early).
        generator: random generator for sampling; must live on the model's device.
    """
    outputs: list[list[int]] = [[] for _ in prompts]
    for step in _decode_steps(model, prompts, max_new_tokens, temperature, top_k, top_p,
                              repetition_penalty, do_sample, eos_token_id, generator):
        for out, token in zip(outputs, step):
            if token is not None:
                out.append(token)
    return outputs


def stream_generate(
    model: nn.Module,
    prompt: list[int],
    max_new_tokens: int = 256,
    temperature: float = 0.85,
    top_k: int = 50,
    top_p: float = 0.85,
    repetition_penalty: float = 1.0,
    do_sample: bool = True,
    eos_token_id: Optional[int] = 2,
    generator: Optional[torch.Generator] = None,
) -> Iterator[int]:
    """Yield the new token ids of one prompt one by one, as they are produced (see `generate`)."""
    for step in _decode_steps(model, [prompt], max_new_tokens, temperature, top_k, top_p,
                              repetition_penalty, do_sample, eos_token_id, generator):
        if step[0] is not None:
            yield step[0]
