"""Text generation with a KV cache: greedy or sampled (temperature, top-k, top-p), MiniMind-style
repetition penalty, batched prompts of different lengths (left padding), and streaming.

`SamplingSettings` holds how the next token is chosen and MiniMind's defaults; every command takes its
defaults from it. `generate` and `stream_generate` work with any model whose forward matches
`MiniMindForCausalLM.forward`. Both run on `DecodeBatch`, the KV-cache state of rows that decode together,
which rows may also join and leave between steps (the server's continuous batching uses it directly, with
`sample_rows` giving each row its own settings). A row of a vision-language model (`vision.vlm.MiniMindVLM`)
may carry its images, (N, 3, H, W) already preprocessed: they enter at that row's prefill only, text rows and
image rows going the same way. The model runs in eval mode under `torch.inference_mode`
only while a step is computed; its train/eval mode is restored after every step, so a paused
`stream_generate` iterator never leaks inference mode or eval mode into the caller's code.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class SamplingSettings:
    """How the next token is chosen. The defaults are MiniMind's (its chat and evaluation scripts).

    Args:
        temperature: Softmax temperature; 0 means greedy.
        top_p: Nucleus sampling: keep the most likely tokens up to this probability mass (1 = off).
        top_k: Sample only among the k most likely tokens (0 = no limit).
        repetition_penalty: MiniMind's penalty on tokens of the prompt and output so far (1 = off).
        do_sample: False means greedy decoding whatever the temperature.
    """

    temperature: float = 0.85
    top_p: float = 0.85
    top_k: int = 50
    repetition_penalty: float = 1.0
    do_sample: bool = True

    def __post_init__(self) -> None:
        """Refuse unusable values with the numbers in the message."""
        if self.temperature < 0 or self.top_k < 0:
            raise ValueError(f"temperature and top_k must be >= 0, got {self.temperature}, {self.top_k}")
        if not 0 < self.top_p <= 1 or self.repetition_penalty <= 0:
            raise ValueError(f"top_p must be in (0, 1] and repetition_penalty > 0, got {self.top_p}, "
                             f"{self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        """True when the most likely token is always taken."""
        return not self.do_sample or self.temperature == 0

    def with_overrides(self, **overrides: Any) -> "SamplingSettings":
        """A copy with some fields changed (``None`` values are ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})


GREEDY = SamplingSettings(do_sample=False)


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float | Tensor) -> Tensor:
    """MiniMind's penalty: for tokens already seen, divide positive logits and multiply negative ones.

    Args:
        logits: (B, V) float logits.
        seen: (B, V) bool, True for tokens in the prompt or the output so far.
        penalty: > 1 discourages repetition, 1 changes nothing; a float, or (B, 1) per row.
    """
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k(logits: Tensor, top_k: int) -> Tensor:
    """Set every logit below the k-th largest of its row to -inf (top_k <= 0 keeps all)."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def beyond_top_p(sorted_logits: Tensor, top_p: float | Tensor) -> Tensor:
    """For logits sorted in descending order (B, K): True where the probability mass of the tokens before
    already exceeds ``top_p`` (a float, or (B, 1) per row), so the token that crosses top_p and the most likely
    one always stay."""
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    return F.pad(cum[..., :-1], (1, 0)) > top_p


def filter_top_p(logits: Tensor, top_p: float) -> Tensor:
    """Nucleus filter: keep the most likely tokens until their probability reaches top_p.

    The token that crosses top_p is kept, and so is always the most likely one (top_p >= 1 keeps all).
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
    drop_sorted = beyond_top_p(sorted_logits, top_p)
    drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


@dataclass(frozen=True)
class RowSampling:
    """The sampling settings of every row of a batch as (B,) tensors, so that one set of tensor ops picks the
    next token of all rows, whatever mix of settings they have. Build it when rows join or leave
    (`RowSampling.of`), not at every step.

    Args:
        temperature: (B,) float; 1 for greedy rows (their sampled token is not used).
        top_k: (B,) long; the vocabulary size where a row sets no limit.
        top_p: (B,) float; +inf where a row keeps all (top_p = 1).
        penalty: (B, 1) float repetition penalty, or None when no row has one.
        greedy: (B,) bool, or None when no row is greedy.
        widest_k: the largest ``top_k``: one top-k pass of this width comes before the top-p sort.
        sampled: False when every row is greedy (the argmax is all there is to do).
        generator: draws the uniforms of the rows without their own generator (None: torch's default).
        row_generators: (row, generator) of the sampled rows that have their own (a request's seed).
    """

    temperature: Tensor
    top_k: Tensor
    top_p: Tensor
    penalty: Optional[Tensor]
    greedy: Optional[Tensor]
    widest_k: int
    sampled: bool
    generator: Optional[torch.Generator] = None
    row_generators: tuple[tuple[int, torch.Generator], ...] = ()

    @classmethod
    def of(cls, settings: list[SamplingSettings], vocab_size: int, device: torch.device,
           generators: Optional[list[Optional[torch.Generator]]] = None,
           generator: Optional[torch.Generator] = None) -> "RowSampling":
        """Per-row ``settings`` (and per-row ``generators``, or one shared ``generator``) as tensors."""
        greedy = [s.greedy for s in settings]
        top_k = [s.top_k if 0 < s.top_k < vocab_size else vocab_size for s in settings]
        penalties = [s.repetition_penalty for s in settings]
        as_tensor = lambda values, dtype=torch.float32: torch.tensor(values, dtype=dtype, device=device)  # noqa: E731
        return cls(
            temperature=as_tensor([1.0 if g else s.temperature for s, g in zip(settings, greedy)]),
            top_k=as_tensor(top_k, torch.long),
            top_p=as_tensor([float("inf") if s.top_p >= 1 else s.top_p for s in settings]),
            penalty=as_tensor(penalties)[:, None] if any(p != 1.0 for p in penalties) else None,
            greedy=as_tensor(greedy, torch.bool) if any(greedy) else None,
            widest_k=max((k for k, g in zip(top_k, greedy) if not g), default=1),
            sampled=not all(greedy), generator=generator,
            row_generators=tuple((row, g) for row, (g, greedy_row) in enumerate(zip(generators or [], greedy))
                                 if g is not None and not greedy_row))

    def uniforms(self) -> Tensor:
        """(B,) uniform draws in [0, 1): rows with their own generator draw from it, the others together."""
        draws = torch.rand(len(self.temperature), generator=self.generator, device=self.temperature.device)
        for row, generator in self.row_generators:
            draws[row] = torch.rand(1, generator=generator, device=generator.device)[0]
        return draws


def sample_batch(logits: Tensor, seen: Optional[Tensor], rows: RowSampling) -> Tensor:
    """Pick the next token of every row from (B, V) logits, each row with its own settings; returns (B,) long.

    Repetition penalty, then argmax for greedy rows; for the others temperature, one top-k pass of the widest
    row's k (sorted, descending), each row's own k and top-p applied as masks on it, and inverse-CDF sampling
    with one uniform per row. Ties at a row's k-th logit keep exactly k tokens.
    """
    logits = logits.float()
    if rows.penalty is not None and seen is not None:
        logits = apply_repetition_penalty(logits, seen, rows.penalty)
    if not rows.sampled:
        return logits.argmax(dim=-1)
    top_logits, top_ids = torch.topk(logits / rows.temperature[:, None], rows.widest_k, dim=-1)  # (B, K) sorted
    rank = torch.arange(rows.widest_k, device=logits.device)
    top_logits = top_logits.masked_fill(rank >= rows.top_k[:, None], float("-inf"))
    top_logits = top_logits.masked_fill(beyond_top_p(top_logits, rows.top_p[:, None]), float("-inf"))
    cum = top_logits.softmax(dim=-1).cumsum(dim=-1)  # (B, K)
    # the first token whose cumulative probability exceeds u (tokens of probability 0 are never picked)
    pick = torch.searchsorted(cum, (rows.uniforms() * cum[:, -1])[:, None], right=True).clamp(max=rows.widest_k - 1)
    tokens = top_ids.gather(-1, pick).squeeze(-1)
    return tokens if rows.greedy is None else torch.where(rows.greedy, logits.argmax(dim=-1), tokens)


def sample_next(logits: Tensor, seen: Optional[Tensor] = None, sampling: SamplingSettings = SamplingSettings(),
                generator: Optional[torch.Generator] = None, **overrides: Any) -> Tensor:
    """Pick the next token of every row from (B, V) logits, all rows with the same settings; returns (B,) long.

    ``overrides`` change single fields of ``sampling`` (``temperature=0``, ``top_k=1``, ...). Greedy means
    argmax after the repetition penalty.
    """
    sampling = sampling.with_overrides(**overrides)
    rows = RowSampling.of([sampling] * logits.shape[0], logits.shape[-1], logits.device, generator=generator)
    return sample_batch(logits, seen, rows)


def sample_rows(logits: Tensor, seen: Optional[Tensor], settings: list[SamplingSettings],
                generators: list[Optional[torch.Generator]]) -> Tensor:
    """Pick the next token of every row from (B, V) logits, each row with its own settings and generator
    (a seeded row draws as `sample_next` would for that row alone); returns (B,) long. Callers that sample
    the same rows at every step build `RowSampling` once and call `sample_batch`."""
    return sample_batch(logits, seen, RowSampling.of(settings, logits.shape[-1], logits.device, generators))


@contextmanager
def inference_step(model: nn.Module) -> Iterator[None]:
    """Eval mode + inference mode for one step, restoring the model's previous mode afterwards.

    A model whose root is in eval mode is taken to be in eval mode throughout (what ``.eval()`` leaves) and is not
    touched: switching modes walks every submodule, which cost a third of a small model's decode step.
    """
    was_training = model.training
    if was_training:
        model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        if was_training:
            model.train()


class DecodeBatch:
    """KV-cache decoding state of sequences that decode together; rows may join and leave between steps.

    The cache of every layer is one left-padded (B, K, S, D) tensor; ``mask`` (B, S) marks real keys (None
    when no row is padded, so attention takes the causal fast path) and ``next_pos`` (B,) holds each row's
    next RoPE position, so a row's numbers do not depend on its neighbours. Prompts that join are run
    through the model together (prefill, left-padded) and their cache is left-padded to the batch's length
    (or the batch's to theirs). ``logits`` (B, V) are the next-token logits of every row.
    """

    def __init__(self, model: nn.Module, track_seen: bool = False) -> None:
        """Args:
            model: a `MiniMindForCausalLM` (or anything with the same forward), in eval mode.
            track_seen: keep ``seen`` (B, V), the tokens of each row so far, for the repetition penalty.
        """
        self.model, self.track_seen = model, track_seen
        self.device = next(model.parameters()).device
        self.cache: Optional[list[tuple[Tensor, Tensor]]] = None
        self.mask: Optional[Tensor] = None
        self.next_pos = torch.zeros(0, dtype=torch.long, device=self.device)
        self.logits: Optional[Tensor] = None
        self.seen: Optional[Tensor] = None

    @property
    def size(self) -> int:
        """Rows in the batch."""
        return int(self.next_pos.shape[0])

    def add(self, prompts: list[list[int]], images: Optional[list[Optional[Tensor]]] = None) -> None:
        """Prefill ``prompts`` (each at least one token) and append them as the last rows.

        ``images``: per prompt, None or its images (N, 3, H, W) in the order of its placeholder runs (a
        vision-language model only); they enter here, at the row's prefill, and never again.
        """
        lengths = [len(p) for p in prompts]
        width = max(lengths)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        pad_mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            pad_mask[i, width - len(prompt):] = 1
        position_ids = (pad_mask.cumsum(-1) - 1).clamp(min=0).to(self.device)  # (B, T) 0.. per real token
        mask = pad_mask.to(self.device) if min(lengths) < width else None
        pixel_values = stack_images(images, len(prompts), self.device)
        extra = {} if pixel_values is None else {"pixel_values": pixel_values}
        out = self.model(ids.to(self.device), position_ids=position_ids, attention_mask=mask,
                         use_cache=True, logits_to_keep=1, **extra)
        seen = None
        if self.track_seen:
            seen = torch.zeros(out.logits[:, -1].shape, dtype=torch.bool, device=self.device)
            for i, prompt in enumerate(prompts):
                seen[i, torch.tensor(prompt, device=self.device)] = True
        self._append(out.past_key_values, mask, torch.tensor(lengths, device=self.device), out.logits[:, -1], seen)

    def _append(self, cache: list[tuple[Tensor, Tensor]], mask: Optional[Tensor], next_pos: Tensor, logits: Tensor,
                seen: Optional[Tensor]) -> None:
        """Join new rows to the batch, left-padding whichever cache is shorter."""
        if self.cache is None or self.size == 0:
            self.cache, self.mask, self.next_pos, self.logits, self.seen = cache, mask, next_pos, logits, seen
            return
        old_len, new_len = self.cache[0][0].shape[2], cache[0][0].shape[2]
        width = max(old_len, new_len)
        self.cache = [(torch.cat([_left_pad(k0, width), _left_pad(k1, width)]),
                       torch.cat([_left_pad(v0, width), _left_pad(v1, width)]))
                      for (k0, v0), (k1, v1) in zip(self.cache, cache)]
        self.mask = torch.cat([_padded_mask(self.mask, self.size, old_len, width, self.device),
                               _padded_mask(mask, len(next_pos), new_len, width, self.device)])
        self.next_pos = torch.cat([self.next_pos, next_pos])
        self.logits = torch.cat([self.logits, logits])
        if self.seen is not None:
            self.seen = torch.cat([self.seen, seen])
        self._trim()

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (indices, in this order); the others leave the batch."""
        if len(rows) == self.size:
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.next_pos, self.logits = self.next_pos[index], self.logits[index]
        if self.seen is not None:
            self.seen = self.seen[index]
        if not rows:
            self.cache, self.mask = None, None
            return
        self.cache = [(k[index], v[index]) for k, v in self.cache]
        self.mask = None if self.mask is None else self.mask[index]
        self._trim()

    def _trim(self) -> None:
        """Drop the leading cache columns no row uses; no mask at all once nothing is padded."""
        if self.mask is None:
            return
        used = self.mask.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else self.mask.shape[1]
        if first:
            self.mask = self.mask[:, first:]
            self.cache = [(k[:, :, first:], v[:, :, first:]) for k, v in self.cache]
        if bool(self.mask.all()):
            self.mask = None

    def feed(self, tokens: Tensor) -> None:
        """Append one token per row (B,) and compute the logits that follow it."""
        tokens = tokens.to(self.device)  # one copy, if the caller's tokens are on the host
        if self.seen is not None:
            self.seen[torch.arange(tokens.shape[0], device=self.device), tokens] = True
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        out = self.model(tokens[:, None], position_ids=self.next_pos[:, None],
                         attention_mask=self.mask, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.next_pos = self.next_pos + 1
        self.cache, self.logits = out.past_key_values, out.logits[:, -1]


def stack_images(images: Optional[list[Optional[Tensor]]], rows: int, device: torch.device) -> Optional[Tensor]:
    """Per-row images ((N_i, 3, H, W) or None) -> pixel_values (rows, max N_i, 3, H, W), zero-padded (the model
    leaves a row's padding images unused); None when no row has an image."""
    if images is None or all(i is None or len(i) == 0 for i in images):
        return None
    if len(images) != rows:
        raise ValueError(f"images must give one entry (a tensor or None) per prompt: {len(images)} for {rows}")
    shape = next(i for i in images if i is not None and len(i)).shape[1:]
    if any(i is not None and len(i) and (i.dim() != 4 or i.shape[1:] != shape) for i in images):
        raise ValueError(f"every row's images must be (N, 3, H, W) of the same H, W: "
                         f"{[None if i is None else tuple(i.shape) for i in images]}")
    most = max(0 if i is None else len(i) for i in images)
    pixel_values = torch.zeros(rows, most, *shape, dtype=torch.float32)
    for row, row_images in enumerate(images):
        if row_images is not None and len(row_images):
            pixel_values[row, :len(row_images)] = row_images
    return pixel_values.to(device)


def _left_pad(x: Tensor, width: int) -> Tensor:
    """(B, K, S, D) -> (B, K, width, D), zeros in front."""
    return F.pad(x, (0, 0, width - x.shape[2], 0))


def _padded_mask(mask: Optional[Tensor], rows: int, length: int, width: int, device: torch.device) -> Tensor:
    """A (rows, width) key mask: ``mask`` (or all ones for ``length`` keys) with zeros in front."""
    if mask is None:
        mask = torch.ones(rows, length, dtype=torch.long, device=device)
    return F.pad(mask, (width - length, 0))


def _decode_steps(
    model: nn.Module, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingSettings,
    eos_token_id: Optional[int], generator: Optional[torch.Generator], images: Optional[list[Optional[Tensor]]],
) -> Iterator[list[Optional[int]]]:
    """Yield, per step, each row's new token (None for rows that already finished)."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not prompts or max_new_tokens == 0:
        return
    decoder = DecodeBatch(model, track_seen=sampling.repetition_penalty != 1.0)
    with inference_step(model):
        decoder.add(prompts, images)
    rows = RowSampling.of([sampling] * len(prompts), decoder.logits.shape[-1], decoder.device, generator=generator)
    finished = [False] * len(prompts)
    for step in range(max_new_tokens):
        with inference_step(model):
            if step > 0:
                decoder.feed(tokens)
            tokens = sample_batch(decoder.logits, decoder.seen, rows)
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
    sampling: SamplingSettings = SamplingSettings(),
    eos_token_id: Optional[int] = 2,
    generator: Optional[torch.Generator] = None,
    images: Optional[list[Optional[Tensor]]] = None,
    **overrides: Any,
) -> list[list[int]]:
    """Continue every prompt; returns the new token ids per prompt (eos excluded).

    Args:
        model: a `MiniMindForCausalLM` (or anything with the same forward).
        prompts: token ids per prompt; lengths may differ (left padding is handled here).
        max_new_tokens: most tokens to generate per prompt.
        sampling: how tokens are chosen (`GREEDY` for greedy decoding).
        eos_token_id: a row stops after producing it (None = never stop early).
        generator: random generator for sampling; must live on the model's device.
        images: per prompt, None or its preprocessed images (N, 3, H, W), one per placeholder run of the
            prompt, in order (a vision-language model: ``vision.vlm.MiniMindVLM``).
        overrides: single fields of `sampling` (e.g. ``do_sample=False``, ``temperature=0.7``).
    """
    sampling = sampling.with_overrides(**overrides)
    outputs: list[list[int]] = [[] for _ in prompts]
    for step in _decode_steps(model, prompts, max_new_tokens, sampling, eos_token_id, generator, images):
        for out, token in zip(outputs, step):
            if token is not None:
                out.append(token)
    return outputs


def stream_generate(
    model: nn.Module,
    prompt: list[int],
    max_new_tokens: int = 256,
    sampling: SamplingSettings = SamplingSettings(),
    eos_token_id: Optional[int] = 2,
    generator: Optional[torch.Generator] = None,
    images: Optional[Tensor] = None,
    **overrides: Any,
) -> Iterator[int]:
    """Yield the new token ids of one prompt one by one, as they are produced (see `generate`; ``images``: the
    prompt's (N, 3, H, W) or None)."""
    sampling = sampling.with_overrides(**overrides)
    for step in _decode_steps(model, [prompt], max_new_tokens, sampling, eos_token_id, generator, [images]):
        if step[0] is not None:
            yield step[0]
