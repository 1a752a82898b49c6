"""PromptDataModule: prompts for the RL stages (MiniMind's ``rlaif.jsonl``, or ``{"prompt": ...}`` lines).

A line is either a conversation whose last assistant turn is empty (MiniMind's RLAIF format: the model writes
that turn) or ends with a user turn, or ``{"prompt": "..."}`` (asked as one user turn). It may carry a ground
truth ``gt`` (a string or a number) that verifiable rewards check (``rewards.AnswerMatch``).

Each line is rendered once with the chat template and a generation prompt, with MiniMind's augmentations drawn
from a per-line seed: a random system prompt with probability ``system_prompt_ratio`` (MiniMind's
``pre_processing_chat``: 0.2), and a ``<think>`` block left open with probability ``thinking_ratio``. The draws are
the same in every epoch (MiniMind draws again each time it reads a prompt). A prompt longer than ``seq_len`` tokens
keeps its last ``seq_len`` tokens (as MiniMind's GRPO; its PPO keeps the first). The token cache
(:mod:`minimind_pl.data.cache`) holds two documents per line: the prompt's tokens, and ``bos`` followed by the
tokens of ``gt`` (``bos`` alone without one), decoded back to text when a batch is made.

Batches hold ``prompt_ids`` (B, P) long, left-padded, ``prompt_lengths`` (B,) long, ``index`` (B,) long (the
line's number in its split) and ``gt`` (a list of B strings or None).
"""

from __future__ import annotations

from typing import Any, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import UserError
from .base import JsonlDataModule
from .formats.prompts import PromptEncoder
from .packing import DocumentStream


class PromptDataset(Dataset):
    """Prompts (and ground truths) read from a :class:`DocumentStream` of document pairs.

    Args:
        stream: documents in pairs: ``2 i`` is prompt ``i``, ``2 i + 1`` its ``bos`` + ground truth.
        tokenizer: decodes the ground truths.
    """

    def __init__(self, stream: DocumentStream, tokenizer: Any) -> None:
        if stream.n_docs % 2:
            raise ValueError("a prompt stream must hold whole records (an even number of documents)")
        self.stream, self.tokenizer = stream, tokenizer

    def __len__(self) -> int:
        return self.stream.n_docs // 2

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        prompt, _ = self.stream.doc(2 * index)
        gt, _ = self.stream.doc(2 * index + 1)
        return {"index": index, "prompt": prompt.astype(np.int64),
                "gt": self.tokenizer.decode(gt[1:].tolist()) if gt.size > 1 else None}


def collate_prompts(samples: Sequence[dict], pad_id: int) -> dict:
    """Left-pad the prompts of a batch (the batch format of the module doc)."""
    lengths = [s["prompt"].size for s in samples]
    ids = np.full((len(samples), max(lengths)), pad_id, np.int64)
    for row, sample in enumerate(samples):
        ids[row, ids.shape[1] - lengths[row]:] = sample["prompt"]
    return {"prompt_ids": torch.from_numpy(ids), "prompt_lengths": torch.tensor(lengths, dtype=torch.long),
            "index": torch.tensor([s["index"] for s in samples], dtype=torch.long), "gt": [s["gt"] for s in samples]}


class _PromptCollate:
    """Picklable ``collate_fn`` (DataLoader workers) binding the padding id."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, samples: Sequence[dict]) -> dict:
        return collate_prompts(samples, self.pad_id)


def prompt_lists(batch: dict) -> list[list[int]]:
    """The prompts of a batch as token-id lists, padding removed."""
    ids, lengths = batch["prompt_ids"].tolist(), batch["prompt_lengths"].tolist()
    return [row[len(row) - n:] for row, n in zip(ids, lengths)]


class PromptDataModule(JsonlDataModule):
    """Prompts for GRPO and PPO (MiniMind's ``rlaif.jsonl``): see the module doc for the lines and batches.

    Its other arguments are those of :class:`JsonlDataModule`, counted in prompts, except ``packing`` and
    ``cross_document_attention``: prompts are never packed.

    Args:
        train_path: jsonl file(s) of prompts.
        seq_len: the most prompt tokens (MiniMind: 768); longer prompts keep their end.
        batch_size: prompts per batch on each device (MiniMind: 2); each is answered ``num_generations`` times.
        thinking_ratio: share of prompts rendered with an open ``<think>`` block (MiniMind: 0.9), drawn per line
            from ``seed``.
        system_prompt_ratio: share of prompts given a random system prompt first (MiniMind: 0.2), drawn per line
            from ``seed``; lines with tools or their own system turn keep theirs.
        kwargs: the other keyword arguments of :class:`JsonlDataModule`.
    """

    def __init__(self, train_path: Union[str, list[str]], seq_len: int = 768, batch_size: int = 2,
                 thinking_ratio: float = 0.0, system_prompt_ratio: float = 0.0, **kwargs: Any) -> None:
        fixed = [name for name in ("packing", "cross_document_attention") if name in kwargs]
        if fixed:
            raise UserError(f"PromptDataModule takes no {' or '.join(fixed)}: prompts are never packed; remove it")
        super().__init__(train_path, seq_len, batch_size, packing=False, cross_document_attention=False, **kwargs)
        self.thinking_ratio, self.system_prompt_ratio = thinking_ratio, system_prompt_ratio

    def make_encoder(self) -> PromptEncoder:
        """Prompts rendered with the chat template, cut to ``seq_len`` tokens."""
        return PromptEncoder(self.tokenizer, self.seq_len, self.thinking_ratio, self.seed, self.system_prompt_ratio)

    def make_dataset(self, stream: DocumentStream) -> PromptDataset:
        """The prompts of one split, by index."""
        return PromptDataset(stream, self.tokenizer)

    @property
    def collate_fn(self) -> _PromptCollate:
        """Left-pads each batch (:func:`collate_prompts`)."""
        return _PromptCollate(self.tokenizer.pad_id)

    def describe(self, stream: DocumentStream, dataset: PromptDataset) -> dict:
        """How many prompts the split has."""
        return {"prompts": len(dataset)}
