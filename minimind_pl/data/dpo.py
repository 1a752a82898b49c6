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
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..chat_format import empty_answer
from ..errors import UserError
from ..tokenizer import Tokenizer
from .base import JsonlDataModule
from .cache import RecordEncoder, ensure_cache
from .packing import IGNORE_INDEX, DocumentStream

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
