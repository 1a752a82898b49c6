"""Scoring token sequences with the model, batched: the summed log-likelihood of each sequence's scored tokens and
whether greedy decoding would write them. ``eval``'s metrics (``commands.evaluate``) and the lm-evaluation-harness
model (``commands.harness``) share it."""

from __future__ import annotations

from typing import Optional, Protocol, Sequence

import torch
import torch.nn.functional as F

from minimind_pl.generation import stack_images
from minimind_pl.model import MiniMindForCausalLM

Scored = tuple[list[int], list[int]]  # token ids, 1 where the token is scored (predicted from the ones before)


class ImageReader(Protocol):
    """An image of a scored sequence (``evaluate.ImageSource``), read as the model's tower wants it."""

    def read(self, model: MiniMindForCausalLM) -> torch.Tensor:
        """(3, H, W) pixels, preprocessed for ``model``'s tower."""


def scored_logprobs(model: MiniMindForCausalLM, sequences: Sequence[Scored], batch_size: int = 8,
                    images: Optional[Sequence[Sequence[ImageReader]]] = None) -> list[tuple[float, bool]]:
    """Per sequence: (summed negative log-likelihood in nats of its scored tokens, whether every scored token is
    the model's greedy choice); ``images[i]``: sequence i's images in the order of its placeholder runs (read
    a batch at a time)."""
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]))  # similar lengths share a batch
    results: list[tuple[float, bool]] = [(0.0, True)] * len(sequences)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        ids, mask = _pad([sequences[i] for i in chunk], device)
        pixel_values = _batch_images(model, [images[i] for i in chunk], device) if images else None
        extra = {} if pixel_values is None else {"pixel_values": pixel_values}
        with torch.inference_mode():
            logits = model(ids[:, :-1], **extra).logits.float()  # (B, T-1, V): position t predicts token t+1
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T-1)
        scored = mask[:, 1:]
        sums = (nll * scored).sum(dim=1).tolist()
        missed = ((logits.argmax(dim=-1) != ids[:, 1:]) & (scored > 0)).any(dim=1).tolist()
        for i, value, miss in zip(chunk, sums, missed):
            results[i] = (value, not miss)
    return results


def _batch_images(model: MiniMindForCausalLM, rows: Sequence[Sequence[ImageReader]],
                  device: torch.device) -> Optional[torch.Tensor]:
    """pixel_values (B, N, 3, H, W) of the rows' images, zero-padded; None when no row has one."""
    per_row = [torch.stack([source.read(model) for source in row]) if row else None for row in rows]
    return stack_images(per_row, len(rows), device)


def _pad(batch: Sequence[Scored], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and float mask tensors (padding is never scored, and causality hides it)."""
    width = max(len(ids) for ids, _ in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width)
    for row, (seq, scored) in enumerate(batch):
        ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = torch.tensor(scored, dtype=torch.float32)
    return ids.to(device), mask.to(device)
