"""Rows for training: documents from token caches, packed into fixed-length rows or padded one per row.

A :class:`DocumentStream` is an ordered selection of documents from one or more caches, read as
one long token stream. :class:`PackedDataset` cuts that stream into rows of ``seq_len`` tokens
(a window of ``seq_len + 1`` tokens per row: ``input = w[:-1]``, ``labels = w[1:]``), so no compute
is spent on padding (only the very last row of the stream is padded). Each row carries per-token
``doc_ids`` (0, 1, 2, ... along the row) and ``position_ids`` that restart at 0 at every document
start, so attention never crosses a document boundary. A document longer than the rest of a row
continues at the start of the next row; its positions there restart at 0 too (RoPE only sees
relative offsets inside a row, so this equals counting on, and positions never exceed ``seq_len``).
A label whose target lies in the next document (the token after a document's last one) is -100.

:class:`PaddedDataset` is MiniMind's layout, for comparison: one document per row, truncated to
the row and padded with ``pad_id`` (labels -100 on padding).

Samples are dicts of numpy arrays; :func:`collate` stacks them into the batch contract of
docs/DESIGN.md (``input_ids``, ``labels``, optional ``position_ids``/``doc_ids``, ``real_tokens``).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .cache import TokenCache

IGNORE_INDEX = -100


class DocumentStream:
    """Documents of several caches (all or a selection of each), in order, as one token stream.

    Args:
        caches: the token caches.
        selections: per cache, None (all documents, in file order) or an int array of document indices.
    """

    def __init__(self, caches: Sequence[TokenCache], selections: Optional[Sequence[Optional[np.ndarray]]] = None):
        self.caches = list(caches)
        selections = list(selections) if selections is not None else [None] * len(self.caches)
        if len(selections) != len(self.caches):
            raise ValueError("one selection per cache")
        self._starts: list[Optional[np.ndarray]] = []
        self._cums: list[Optional[np.ndarray]] = []
        self._selections = [None if sel is None else np.asarray(sel, dtype=np.int64) for sel in selections]
        part_tokens, part_docs = [], []
        for cache, sel in zip(self.caches, selections):
            if sel is None:
                self._starts.append(None)
                self._cums.append(None)
                part_tokens.append(cache.n_tokens)
                part_docs.append(cache.n_docs)
            else:
                sel = np.asarray(sel, dtype=np.int64)
                offsets = cache.offsets
                starts = np.asarray(offsets[sel], dtype=np.int64)
                lengths = np.asarray(offsets[sel + 1], dtype=np.int64) - starts
                cum = np.zeros(len(sel) + 1, np.int64)
                np.cumsum(lengths, out=cum[1:])
                self._starts.append(starts)
                self._cums.append(cum)
                part_tokens.append(int(cum[-1]))
                part_docs.append(len(sel))
        self.part_base = np.zeros(len(self.caches) + 1, np.int64)
        np.cumsum(part_tokens, out=self.part_base[1:])
        self.doc_base = np.zeros(len(self.caches) + 1, np.int64)
        np.cumsum(part_docs, out=self.doc_base[1:])

    @property
    def n_tokens(self) -> int:
        """Total tokens in the stream."""
        return int(self.part_base[-1])

    @property
    def n_docs(self) -> int:
        """Total documents in the stream."""
        return int(self.doc_base[-1])

    @property
    def has_mask(self) -> bool:
        """Whether the caches carry a loss mask."""
        return bool(self.caches) and self.caches[0].mask is not None

    def _part(self, p: int) -> tuple[np.ndarray, Optional[np.ndarray], np.ndarray, np.ndarray, bool]:
        """(tokens, mask, doc starts in the file, stream offsets of the docs, contiguous?) of part ``p``."""
        cache = self.caches[p]
        if self._starts[p] is None:
            return cache.tokens, cache.mask, cache.offsets, cache.offsets, True
        return cache.tokens, cache.mask, self._starts[p], self._cums[p], False

    def first_token_masks(self) -> np.ndarray:
        """The mask value of every document's first token, in stream order (uint8, 0 for an empty document).

        An encoder can keep a per-document flag there (DPO marks truncated pairs with a mask bit).
        """
        if not self.has_mask:
            raise ValueError("these caches carry no mask")
        values = []
        for p in range(len(self.caches)):
            _, mask, starts, cum, contiguous = self._part(p)
            starts = np.asarray(starts[:-1] if contiguous else starts, dtype=np.int64)
            nonempty = np.diff(np.asarray(cum, dtype=np.int64)) > 0
            part = np.zeros(starts.size, np.uint8)
            part[nonempty] = mask[starts[nonempty]]
            values.append(part)
        return np.concatenate(values) if values else np.zeros(0, np.uint8)

    def _where(self, i: int) -> tuple[int, int]:
        """(part, index within the part's documents) of the ``i``-th document of the stream."""
        p = int(np.searchsorted(self.doc_base, i, side="right")) - 1
        return p, i - int(self.doc_base[p])

    def doc(self, i: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """Token ids (and mask) of the ``i``-th document of the stream."""
        p, k = self._where(i)
        tokens, mask, starts, cum, _ = self._part(p)
        a = int(starts[k])
        b = a + int(cum[k + 1]) - int(cum[k])
        return np.asarray(tokens[a:b]), (np.asarray(mask[a:b]) if mask is not None else None)

    def documents_of(self, p: int) -> np.ndarray:
        """Indices (in its cache) of the documents the stream takes from cache ``p``, in stream order."""
        selection = self._selections[p]
        return np.arange(self.caches[p].n_docs) if selection is None else selection

    def locate(self, i: int) -> tuple[TokenCache, int]:
        """The cache holding the ``i``-th document of the stream, and the document's index in it."""
        p, k = self._where(i)
        return self.caches[p], (k if self._starts[p] is None else int(self._selections[p][k]))

    def pieces(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """The documents in stream tokens ``[start, end)``: ``(document, its first token there, tokens)`` each,
        in order (the pieces :meth:`window` concatenates, empty documents left out)."""
        out = []
        p = int(np.searchsorted(self.part_base, start, side="right")) - 1
        while p < len(self.caches) and int(self.part_base[p]) < end:
            cum = self._part(p)[3]
            base = int(self.part_base[p])
            lo, hi = max(start, base) - base, min(end, int(self.part_base[p + 1])) - base
            first = int(np.searchsorted(cum, lo, side="right")) - 1
            for k in range(first, int(np.searchsorted(cum, hi, side="left"))):
                a, b = max(int(cum[k]), lo), min(int(cum[k + 1]), hi)
                if b > a:
                    out.append((int(self.doc_base[p]) + k, a - int(cum[k]), b - a))
            p += 1
        return out

    def window(self, start: int, end: int) -> tuple[np.ndarray, Optional[np.ndarray], np.ndarray]:
        """Stream tokens ``[start, end)``.

        Returns:
            ``(tokens int64, mask uint8 or None, segment_lengths)``: the pieces of documents that
            make up the window, in order (each piece is one document, or the part of it inside the window).
        """
        toks, masks, seg_lens = [], [], []
        p = int(np.searchsorted(self.part_base, start, side="right")) - 1
        pos = start
        while pos < end:
            tokens, mask, starts, cum, contiguous = self._part(p)
            base = int(self.part_base[p])
            lo, hi = pos - base, min(end, int(self.part_base[p + 1])) - base
            if hi > lo:
                k0 = int(np.searchsorted(cum, lo, side="right")) - 1
                k1 = int(np.searchsorted(cum, hi, side="left"))
                c0 = np.asarray(cum[k0:k1], dtype=np.int64)
                c1 = np.asarray(cum[k0 + 1:k1 + 1], dtype=np.int64)
                seg_s, seg_e = np.maximum(c0, lo), np.minimum(c1, hi)
                seg_lens.append(seg_e - seg_s)
                if contiguous:
                    toks.append(np.asarray(tokens[lo:hi]))
                    if mask is not None:
                        masks.append(np.asarray(mask[lo:hi]))
                else:
                    file_s = np.asarray(starts[k0:k1], dtype=np.int64) + (seg_s - c0)
                    for a, n in zip(file_s.tolist(), (seg_e - seg_s).tolist()):
                        toks.append(np.asarray(tokens[a:a + n]))
                        if mask is not None:
                            masks.append(np.asarray(mask[a:a + n]))
            pos = base + hi
            p += 1
        tok = np.concatenate(toks).astype(np.int64) if toks else np.zeros(0, np.int64)
        msk = (np.concatenate(masks) if masks else np.zeros(0, np.uint8)) if self.has_mask else None
        segs = np.concatenate(seg_lens) if seg_lens else np.zeros(0, np.int64)
        return tok, msk, segs


class PackedDataset(Dataset):
    """Fixed rows of ``seq_len`` tokens cut from a :class:`DocumentStream` (see the module doc).

    Args:
        stream: the documents.
        seq_len: tokens per row (inputs; each row reads ``seq_len + 1`` tokens for its labels).
        pad_id: id used for the padding of the stream's last row.
        cross_document_attention: if True, rows carry no ``doc_ids``/``position_ids`` (plain causal
            attention over the whole row); labels still never predict across a document boundary.
    """

    def __init__(self, stream: DocumentStream, seq_len: int, pad_id: int, cross_document_attention: bool = False):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.stream = stream
        self.seq_len = int(seq_len)
        self.pad_id = int(pad_id)
        self.cross_document_attention = cross_document_attention
        n = stream.n_tokens
        self.num_rows = math.ceil((n - 1) / self.seq_len) if n >= 2 else 0

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_rows:
            raise IndexError(index)
        L = self.seq_len
        start = index * L
        end = min(start + L + 1, self.stream.n_tokens)
        tok, mask, segs = self.stream.window(start, end)
        n = tok.size
        w = np.full(L + 1, self.pad_id, np.int64)
        w[:n] = tok
        doc = np.full(L + 1, -1, np.int64)
        doc[:n] = np.repeat(np.arange(segs.size, dtype=np.int64), segs)
        target = np.zeros(L + 1, bool)
        target[:n] = True if mask is None else mask.astype(bool)
        same_doc = (doc[1:] == doc[:-1]) & (doc[1:] >= 0)
        labels = np.where(same_doc & target[1:], w[1:], IGNORE_INDEX)
        sample = {"input_ids": w[:L], "labels": labels, "real_tokens": min(n, L)}
        if not self.cross_document_attention:
            seg_start = np.zeros(segs.size, np.int64)
            np.cumsum(segs[:-1], out=seg_start[1:])
            pos = np.zeros(L + 1, np.int64)
            pos[:n] = np.arange(n, dtype=np.int64) - np.repeat(seg_start, segs)
            if n < L + 1:  # padding of the stream's last row: one more "document" of its own
                doc[n:] = segs.size
                pos[n:] = np.arange(L + 1 - n, dtype=np.int64)
            sample["doc_ids"] = doc[:L]
            sample["position_ids"] = pos[:L]
        return sample

    def row_pieces(self, index: int) -> list[tuple[int, int, int]]:
        """The documents among row ``index``'s inputs: ``(stream document, its first token in the row, tokens)``
        each, in row order; a piece's first input position is the sum of the lengths before it."""
        start = index * self.seq_len
        return self.stream.pieces(start, min(start + self.seq_len, self.stream.n_tokens))


class PaddedDataset(Dataset):
    """One document per row, truncated to ``seq_len + 1`` tokens and padded (MiniMind's layout).

    Args:
        stream: the documents.
        seq_len: tokens per row (inputs).
        pad_id: padding id (labels are -100 there).
        keep_eos_id: if set, a truncated document still ends with this id (MiniMind's pretraining
            keeps ``eos`` after truncating the text); None cuts plainly (MiniMind's SFT).
    """

    def __init__(self, stream: DocumentStream, seq_len: int, pad_id: int, keep_eos_id: Optional[int] = None):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.stream = stream
        self.seq_len = int(seq_len)
        self.pad_id = int(pad_id)
        self.keep_eos_id = keep_eos_id

    def __len__(self) -> int:
        return self.stream.n_docs

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        L = self.seq_len
        tok, mask = self.stream.doc(index)
        tok = tok.astype(np.int64)
        target = np.ones(tok.size, bool) if mask is None else mask.astype(bool)
        if tok.size > L + 1:
            tok, target = tok[:L + 1].copy(), target[:L + 1].copy()
            if self.keep_eos_id is not None:
                tok[-1] = self.keep_eos_id
        n = tok.size
        w = np.full(L + 1, self.pad_id, np.int64)
        w[:n] = tok
        valid = np.zeros(L + 1, bool)
        valid[:n] = target
        labels = np.where(valid[1:], w[1:], IGNORE_INDEX)
        return {"input_ids": w[:L], "labels": labels, "real_tokens": min(n, L)}

    def row_pieces(self, index: int) -> list[tuple[int, int, int]]:
        """Row ``index``'s document among its inputs, as :meth:`PackedDataset.row_pieces` gives them (one, from
        its first token, cut at ``seq_len``)."""
        length = min(self.stream.doc(index)[0].size, self.seq_len)
        return [(index, 0, length)] if length else []


def collate(samples: Sequence[dict]) -> dict:
    """Stack samples into a batch: long tensors (B, T) and ``real_tokens`` as a 0-d long tensor."""
    batch = {}
    for key in samples[0]:
        if key == "real_tokens":
            continue
        batch[key] = torch.from_numpy(np.stack([s[key] for s in samples])).long()
    batch["real_tokens"] = torch.tensor(sum(int(s["real_tokens"]) for s in samples), dtype=torch.long)
    return batch
