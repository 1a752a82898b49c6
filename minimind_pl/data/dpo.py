"""DPODataModule: MiniMind's ``dpo.jsonl`` preference pairs (``{"chosen": [msgs], "rejected": [msgs]}``).

Each line holds one conversation twice: the same prompt messages, then a final assistant answer that
is preferred (``chosen``) or not (``rejected``). A pair is tokenized once into the shared token cache
(:mod:`minimind_pl.data.cache`) as two consecutive documents, chosen then rejected:

- the prompt is what the chat template renders before the final answer, as at inference
  (``add_generation_prompt=True``); precisely, the longest common prefix of that generation prompt and
  both full renderings, so a ``<think>`` block in an answer belongs to the answer;
- the answer is the rest of the rendering up to and including ``<|im_end|>``; only its tokens are
  targets (the loss covers the final assistant answer, nothing else);
- prompt and answer are tokenized separately (the tokens the model would generate after the prompt).

Bad pairs (prompts that differ, an empty answer (blank or reasoning only; tool calls count, as in SFT), a
last message that is not the assistant's, a pair too long for ``seq_len`` with ``overlong="error"``) raise
an error naming file and line, or are skipped and counted with ``skip_invalid``. With ``overlong="truncate"`` the prompt loses its oldest tokens
first (the same cut on both sides, so the prompts stay identical) and the answers are cut only if
they alone do not fit; such pairs are counted (``stats["truncated_pairs"]``).

Batches hold ``chosen_input_ids``, ``chosen_labels``, ``rejected_input_ids``, ``rejected_labels``
(B, T) long with labels already shifted (-100 = no loss), ``index`` (B,) long (the pair's index in its
dataset, for precomputed reference log-probs) and ``real_tokens`` (0-d long): T is the longest
sequence of the batch (chosen or rejected), not a fixed length.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import UserError
from ..tokenizer import Tokenizer
from .base import JsonlDataModule
from .cache import ensure_cache
from .formats.dpo import MASK_TARGET, MASK_TRUNCATED, OVERLONG_MODES, SIDES, DPOEncoder
from .packing import IGNORE_INDEX, DocumentStream


class DPODataset(Dataset):
    """Preference pairs read from a :class:`DocumentStream` of (chosen, rejected) document pairs.

    Args:
        stream: documents in pairs: ``2 i`` is pair ``i``'s chosen, ``2 i + 1`` its rejected.
    """

    def __init__(self, stream: DocumentStream) -> None:
        if stream.n_docs % 2:
            raise ValueError("a DPO stream must hold whole pairs (an even number of documents)")
        self.stream = stream

    def __len__(self) -> int:
        return self.stream.n_docs // 2

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        sample: dict = {"index": index}
        for k, side in enumerate(SIDES):
            ids, mask = self.stream.doc(2 * index + k)
            sample[side] = (ids.astype(np.int64), mask)
        return sample

    def truncated_pairs(self) -> int:
        """How many pairs were cut to fit ``seq_len`` (a mask bit on the first token of each chosen document)."""
        chosen_firsts = self.stream.first_token_masks()[0::2]
        return int(np.count_nonzero(chosen_firsts & MASK_TRUNCATED))


def collate_pairs(samples: Sequence[dict], pad_id: int) -> dict:
    """Pad chosen and rejected sequences to the longest one of the batch; shift the labels.

    Returns the batch described in the module doc.
    """
    length = max(s[side][0].size for s in samples for side in SIDES) - 1
    batch: dict = {}
    real = 0
    for side in SIDES:
        inputs = np.full((len(samples), length), pad_id, np.int64)
        labels = np.full((len(samples), length), IGNORE_INDEX, np.int64)
        for row, sample in enumerate(samples):
            ids, mask = sample[side]
            n = ids.size - 1
            inputs[row, :n] = ids[:-1]
            labels[row, :n] = np.where(mask[1:] & MASK_TARGET, ids[1:], IGNORE_INDEX)
            real += n
        batch[f"{side}_input_ids"] = torch.from_numpy(inputs)
        batch[f"{side}_labels"] = torch.from_numpy(labels)
    batch["index"] = torch.tensor([s["index"] for s in samples], dtype=torch.long)
    batch["real_tokens"] = torch.tensor(real, dtype=torch.long)
    return batch


class _PairCollate:
    """Picklable ``collate_fn`` (DataLoader workers) binding the padding id."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, samples: Sequence[dict]) -> dict:
        return collate_pairs(samples, self.pad_id)


class DPODataModule(JsonlDataModule):
    """Preference pairs for DPO (MiniMind's ``dpo.jsonl``): see the module doc for the batch format.

    Its other arguments are those of :class:`JsonlDataModule`, counted in pairs (``val_fraction`` holds
    out pairs, ``skip_invalid`` also skips pairs whose prompts differ or whose answers are empty), except
    ``packing`` and ``cross_document_attention``: pairs are never packed, so they cannot be set.

    Args:
        train_path: jsonl file(s) of ``{"chosen": [messages], "rejected": [messages]}`` lines.
        seq_len: the most input tokens of a chosen or rejected sequence (MiniMind's DPO: 1024); batches
            are padded to their longest sequence only.
        batch_size: pairs per batch on each device (each pair is two sequences).
        overlong: what a pair longer than ``seq_len`` gets: ``"truncate"`` (the prompt's oldest tokens
            first, the answers only if they alone do not fit; counted) or ``"error"`` (stop, naming file and line).
        kwargs: the other keyword arguments of :class:`JsonlDataModule`.
    """

    def __init__(
        self,
        train_path: Union[str, list[str]],
        seq_len: int = 1024,
        batch_size: int = 4,
        overlong: str = "truncate",
        **kwargs: Any,
    ) -> None:
        if overlong not in OVERLONG_MODES:
            raise UserError(f"--data.overlong must be one of {', '.join(OVERLONG_MODES)}, got {overlong!r}")
        fixed = [name for name in ("packing", "cross_document_attention") if name in kwargs]
        if fixed:
            raise UserError(f"DPODataModule takes no {' or '.join(fixed)}: a pair is padded to its batch's "
                            "longest sequence, never packed; remove it from the config")
        # Arguments given by name here are left out of the arguments jsonargparse offers (--help, YAML).
        super().__init__(train_path, seq_len, batch_size, packing=False, cross_document_attention=False, **kwargs)
        self.overlong = overlong

    def make_encoder(self) -> DPOEncoder:
        """Pairs rendered with the chat template, fitted into ``seq_len + 1`` tokens."""
        return DPOEncoder(self.tokenizer, self.seq_len + 1, self.overlong)

    def make_dataset(self, stream: DocumentStream) -> DPODataset:
        """The pairs of one split, by index."""
        return DPODataset(stream)

    @property
    def collate_fn(self) -> _PairCollate:
        """Pads each batch to its longest sequence (:func:`collate_pairs`)."""
        return _PairCollate(self.tokenizer.pad_id)

    def describe(self, stream: DocumentStream, dataset: DPODataset) -> dict:
        """Pairs, tokens and how many pairs were truncated to fit ``seq_len``."""
        return {"pairs": len(dataset), "tokens": stream.n_tokens, "truncated_pairs": dataset.truncated_pairs()}

    def reference_dataloader(self, split: str) -> DataLoader:
        """Every pair of ``split`` ("train" or "val") once, in index order, on this process.

        The DPO stage reads it to precompute the reference log-probs (``precompute_reference``).
        """
        return self.ordered_dataloader(split)


def pair_loader(path: Union[str, Path], tokenizer: Union[str, Tokenizer], seq_len: int = 1024,
                batch_size: int = 8, cache_dir: Optional[str] = None) -> DataLoader:
    """Ordered batches of every pair in one jsonl file (for evaluation, e.g. preference accuracy).

    Args:
        path: a ``dpo.jsonl``-format file.
        tokenizer: tokenizer directory or :class:`Tokenizer`.
        seq_len: pairs longer than this are truncated (prompt first).
        batch_size: pairs per batch.
        cache_dir: folder for the token cache (default: beside the file).
    """
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_file(tokenizer)
    cache = ensure_cache(path, DPOEncoder(tok, seq_len + 1), cache_dir=cache_dir, progress=False, verbose=False)
    return DataLoader(DPODataset(DocumentStream([cache])), batch_size=batch_size, shuffle=False,
                      collate_fn=_PairCollate(tok.pad_id))
