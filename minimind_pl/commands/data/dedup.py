"""Exact and near-duplicate detection that stays small: 64-bit keys in sorted arrays, MinHash LSH with a check.

A line is an exact duplicate when the 64-bit BLAKE2b hash of its model text (after cleaning) was seen on an
earlier kept line. It is a near duplicate when the MinHash signature of its text agrees with an earlier kept line's
on at least ``threshold`` of the permutations (the estimated Jaccard similarity of their word n-grams, where each
Chinese character is a word); only lines sharing an LSH band with it are compared. Bands and rows are chosen for
the ``threshold`` as MinHash LSH does, minimising the area of false positives below the threshold plus false
negatives above it.

Signatures are datasketch's ``MinHash(scheme="affine32")`` (the same values, tested), computed for a whole block
of lines in a few array operations instead of one ``update_batch`` per line. The index is ours: band keys and line
numbers packed into 8 bytes in sorted numpy arrays (:class:`SortedRuns`), and the kept signatures in a temporary
file beside the output (datasketch's own ``MinHashLSH`` keeps each band of each key as Python objects, kilobytes a
line: a million-line file would not fit in 1 GB).
"""
from __future__ import annotations

import bisect
import functools
import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from minimind_pl.errors import UserError

from .text_rules import CJK_RANGES

MIX = np.uint64(0x9E3779B97F4A7C15)  # an odd 64-bit constant: folds values into one key (wrapping multiply)
DATA_EXTRA_HINT = 'pip install -e ".[data]"'
MIX_INVERSE = np.uint64(pow(int(MIX), -1, 1 << 64))
# The words of the similarity: each CJK character alone (Chinese has no spaces), and runs of other letters and digits.
CJK = CJK_RANGES
WORD = re.compile(f"[{CJK}]|[^\\W_{CJK}]+")
LOW32 = np.uint64(0xFFFFFFFF)
SHINGLES_PER_STEP = 16384  # shingles permuted at once: (num_perm, 16384) uint32, 8 MB
CHARS_PER_GROUP = 1 << 18  # characters of text hashed into shingles at once


def require_extra(module: str, what: str) -> Any:
    """Import an optional dependency of the data tools, or a UserError saying how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise UserError(f"{what} needs the `{module}` package, an optional extra: {DATA_EXTRA_HINT}") from exc


def text_key(text: str) -> int:
    """A 64-bit hash of ``text`` (the exact-duplicate key)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


@functools.lru_cache(maxsize=16)
def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """``(bands, rows)`` with ``bands * rows <= num_perm`` whose collision curve ``1 - (1 - s**rows)**bands``
    best separates Jaccard similarities below ``threshold`` from those above (equal weights)."""
    if not 0.0 < threshold < 1.0:
        raise UserError(f"--near_threshold must be between 0 and 1 (exclusive), got {threshold}")
    pairs = np.array([(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)])
    similarity = (np.arange(2000) + 0.5) / 2000
    collide = 1.0 - (1.0 - similarity[None, :] ** pairs[:, 1:2]) ** pairs[:, 0:1]
    error = np.where(similarity < threshold, collide, 1.0 - collide).mean(axis=1)
    best = min(zip(error.tolist(), pairs[:, 0].tolist(), pairs[:, 1].tolist()))  # ties: the fewest bands
    return best[1], best[2]


@functools.lru_cache(maxsize=1)
def basic_plane_classes() -> tuple[np.ndarray, np.ndarray]:
    """For each code point below 0x10000: is it a word character (a letter or digit, as ``[^\\W_]``), is it CJK."""
    word = np.fromiter((chr(code).isalnum() for code in range(0x10000)), bool, 0x10000)
    cjk = np.zeros(0x10000, bool)
    for low, high in re.findall("(.)-(.)", CJK):
        cjk[ord(low): ord(high) + 1] = True
    return word, cjk


def word_spans(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The words of ``texts`` (as :data:`WORD` finds them) joined by one space: the code points (uint64), each word's
    start and end in them, and each word's text."""
    points = np.frombuffer("\n".join(texts).encode("utf-32-le", "surrogatepass"), np.uint32)
    word, cjk = basic_plane_classes()
    basic = np.minimum(points, 0xFFFF)
    in_word, in_cjk = word[basic], cjk[basic]
    astral = np.flatnonzero(points > 0xFFFF)
    if astral.size:  # other planes (rare): ask Python
        in_word[astral] = [chr(code).isalnum() for code in points[astral].tolist()]
        in_cjk[astral] = False
    joins = in_word & ~in_cjk  # letters that join their neighbours of the same kind into one word
    starts = in_word & ~(joins & np.concatenate([[False], joins[:-1]]))
    ends = in_word & ~(joins & np.concatenate([joins[1:], [False]]))
    kept = np.flatnonzero(in_word)
    word_number = np.cumsum(starts[kept]) - 1  # the word of each kept character
    position = np.arange(kept.size) + word_number  # one space before each word but the first
    joined = np.full(kept.size + max(0, int(word_number[-1]) if kept.size else 0), ord(" "), np.uint64)
    joined[position] = points[kept]
    word_starts, word_ends = position[starts[kept]], position[ends[kept]] + 1
    text_bounds = np.cumsum([len(text) + 1 for text in texts])  # each text's end (+ the newline) in ``points``
    text_of_word = np.searchsorted(text_bounds, kept[starts[kept]], side="right")
    return joined, word_starts, word_ends, text_of_word


def fmix32(values: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser (an avalanching bijection), which datasketch's affine32 scheme applies to each
    value before its permutations."""
    values = values ^ (values >> np.uint32(16))
    values *= np.uint32(0x85EBCA6B)
    values ^= values >> np.uint32(13)
    values *= np.uint32(0xC2B2AE35)
    return values ^ (values >> np.uint32(16))


class MinHasher:
    """MinHash signatures and LSH band keys of many texts at once, over ``ngram``-grams of words (see :data:`WORD`).

    A signature is exactly datasketch's ``MinHash(num_perm, seed, scheme="affine32")`` updated with the 32-bit
    hashes of the text's n-grams (:meth:`shingles`): per permutation ``min(a * fmix32(h) + b mod 2**32)``.

    Args:
        threshold: Jaccard similarity from which two texts count as near duplicates.
        num_perm: MinHash permutations.
        ngram: words per shingle.
        seed: seed of the permutations.
    """

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, ngram: int = 3, seed: int = 1) -> None:
        datasketch = require_extra("datasketch", "near-duplicate removal (--near_threshold)")
        if ngram < 1 or num_perm < 2:
            raise UserError(f"--ngram must be >= 1 and --num_perm >= 2, got {ngram} and {num_perm}")
        self.bands, self.rows = lsh_bands(threshold, num_perm)
        self.threshold, self.ngram, self.num_perm, self.seed = threshold, ngram, num_perm, seed
        permutations = datasketch.MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations
        self.a, self.b = (np.ascontiguousarray(p, np.uint32)[:, None] for p in permutations)  # (num_perm, 1)
        self.row_powers = np.cumprod(np.full(self.rows, MIX, np.uint64))
        self._powers: Optional[tuple[np.ndarray, np.ndarray]] = None
        self.band_ids = np.arange(1, self.bands + 1, dtype=np.uint64)

    def shingles(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """32-bit hashes of the word n-grams of each text (lower-cased; a text of fewer words is one shingle, a text
        without words the shingle " "), all texts' concatenated, and the index of each text's first hash.

        The words of all texts are found at once (:func:`word_spans`) and joined by one space; the hash of the
        characters from position i to j is ``(prefix[j] - prefix[i]) * MIX**-i`` with ``prefix`` the running sum of
        ``char * MIX**position`` (wrapping at 2**64), so every n-gram is hashed in a few array operations, the same
        wherever it stands.
        """
        points, starts, ends, text_of_word = word_spans([text.lower() for text in texts])
        counts = np.bincount(text_of_word, minlength=len(texts))
        powers, inverse = self.powers(points.size + 1)  # MIX**i and MIX**-i
        prefix = np.concatenate([np.zeros(1, np.uint64), np.cumsum(points * powers[: points.size], dtype=np.uint64)])
        width = np.minimum(counts, self.ngram)
        grams = np.maximum(counts - width + 1, 1)  # n-grams per text (a text without words: one)
        first_gram = np.concatenate([[0], np.cumsum(grams)[:-1]])
        text_of = np.repeat(np.arange(len(texts)), grams)
        first_word = np.concatenate([[0], np.cumsum(counts)[:-1]])
        first = first_word[text_of] + np.arange(text_of.size) - first_gram[text_of]  # each n-gram's first word
        has_words = counts[text_of] > 0
        first, last = first[has_words], (first + width[text_of] - 1)[has_words]
        hashes = np.full(text_of.size, ord(" "), np.uint64)  # the hash of " " (a text without words)
        hashes[has_words] = (prefix[ends[last]] - prefix[starts[first]]) * inverse[starts[first]]
        return ((hashes ^ (hashes >> np.uint64(32))) & LOW32).astype(np.uint32), first_gram

    def powers(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """``MIX**i`` and ``MIX**-i`` for i < ``size`` (wrapping at 2**64), kept and grown as texts get longer."""
        if self._powers is None or self._powers[0].size < size:
            size = max(size, 4096, 2 * (0 if self._powers is None else self._powers[0].size))
            self._powers = (np.cumprod(np.full(size, MIX, np.uint64)) * MIX_INVERSE,
                            np.cumprod(np.full(size, MIX_INVERSE, np.uint64)) * MIX)
        return self._powers

    def signatures(self, texts: Sequence[str]) -> np.ndarray:
        """The (len(texts), num_perm) uint32 MinHash signatures of ``texts``."""
        out = np.empty((len(texts), self.num_perm), np.uint32)
        start = 0
        while start < len(texts):  # groups of texts of about CHARS_PER_GROUP characters: bounded arrays
            stop, chars = start + 1, len(texts[start])
            while stop < len(texts) and chars + len(texts[stop]) <= CHARS_PER_GROUP:
                chars += len(texts[stop])
                stop += 1
            out[start:stop] = self.permuted_minima(*self.shingles(texts[start:stop]))
            start = stop
        return out

    def permuted_minima(self, hashes: np.ndarray, first_gram: np.ndarray) -> np.ndarray:
        """Per text (its hashes start at ``first_gram``), the minimum of each permutation of its hashes."""
        out = np.full((first_gram.size, self.num_perm), np.iinfo(np.uint32).max, np.uint32)
        mixed = fmix32(hashes)
        text_of = np.repeat(np.arange(first_gram.size), np.diff(np.append(first_gram, hashes.size)))
        buffer = np.empty((self.num_perm, min(SHINGLES_PER_STEP, hashes.size)), np.uint32)  # reused: no page faults
        for start in range(0, hashes.size, SHINGLES_PER_STEP):
            step = slice(start, start + SHINGLES_PER_STEP)
            permuted = buffer[:, : mixed[step].size]
            np.multiply(self.a, mixed[None, step], out=permuted)  # (num_perm, step): wraps at 2**32, as datasketch's
            permuted += self.b
            texts = text_of[step]
            cuts = np.flatnonzero(np.diff(texts, prepend=-1))  # where each text's hashes start in this step
            rows = texts[cuts]
            out[rows] = np.minimum(out[rows], np.minimum.reduceat(permuted, cuts, axis=1).T)
        return out

    def band_keys(self, signatures: np.ndarray) -> np.ndarray:
        """One 32-bit key (as uint64) per band of each signature: (len(signatures), bands)."""
        rows = signatures[:, : self.bands * self.rows].astype(np.uint64).reshape(-1, self.bands, self.rows)
        keys = (rows * self.row_powers).sum(axis=2, dtype=np.uint64) + self.band_ids  # the band's number: bands differ
        return (keys ^ (keys >> np.uint64(32))) & LOW32


class SortedRuns:
    """A growing set of uint64 values in sorted numpy arrays ("runs"), merged like a binary counter up to
    ``max_run`` values each, so lookups stay logarithmic, memory is about 8 bytes a value and a merge never needs
    more than twice a run's size on top.

    Args:
        max_run: the largest run a merge makes (8M values, 64 MB).
    """

    def __init__(self, max_run: int = 1 << 23) -> None:
        self.runs: list[np.ndarray] = []
        self.max_run = max_run

    def __len__(self) -> int:
        return sum(run.size for run in self.runs)

    def push(self, values: np.ndarray) -> None:
        """Add ``values`` (uint64, none of them in the set yet)."""
        if not values.size:
            return
        run = np.sort(values)
        # values are never added twice, so a merge is a concatenation sorted in place (no unique pass, no copies)
        while self.runs and self.runs[-1].size <= 2 * run.size and self.runs[-1].size + run.size <= self.max_run:
            run = np.concatenate([self.runs.pop(), run])
            run.sort()
        self.runs.append(run)

    def contains(self, values: np.ndarray) -> np.ndarray:
        """Whether each of ``values`` (uint64) is in the set (a bool array)."""
        order = np.argsort(values)  # sorted needles: each binary search starts where the last one ended
        needles = values[order]
        found = np.zeros(values.shape, bool)
        for run in self.runs:
            at = np.minimum(np.searchsorted(run, needles), run.size - 1)
            found[order] |= run[at] == needles
        return found

    def with_prefix(self, prefixes: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """``(i, the values whose upper 32 bits are prefixes[i])`` for each i that has some."""
        order = np.argsort(prefixes)
        low = prefixes[order] << np.uint64(32)
        out = []
        for run in self.runs:
            first = np.minimum(np.searchsorted(run, low), run.size - 1)
            hits = np.flatnonzero((run[first] >> np.uint64(32)) == (low >> np.uint64(32)))
            last = np.searchsorted(run, low[hits] | LOW32, side="right")
            out += [(i, run[a:b]) for i, a, b in zip(order[hits].tolist(), first[hits].tolist(), last.tolist())]
        return out


class KeySet:
    """A growing set of uint64 keys: recent ones in a Python set, the others in :class:`SortedRuns`.

    Args:
        flush_at: keys held in the Python set before they move into a sorted run.
        max_run: the largest run (see :class:`SortedRuns`).
    """

    def __init__(self, flush_at: int = 1 << 16, max_run: int = 1 << 23) -> None:
        self.recent: set[int] = set()
        self.sorted = SortedRuns(max_run)
        self.flush_at = flush_at

    @property
    def runs(self) -> list[np.ndarray]:
        return self.sorted.runs

    def __len__(self) -> int:
        return len(self.recent) + len(self.sorted)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Whether each of ``keys`` (uint64) was added (a bool array)."""
        found = self.sorted.contains(keys)
        if self.recent:
            found |= np.fromiter((key in self.recent for key in keys.tolist()), bool, keys.size)
        return found

    def add(self, keys: np.ndarray) -> None:
        """Add ``keys`` (uint64) that are not in the set yet (callers look them up first)."""
        self.recent.update(keys.tolist())
        if len(self.recent) >= self.flush_at:
            self.sorted.push(np.fromiter(self.recent, np.uint64, len(self.recent)))
            self.recent.clear()

    def mark(self, keys: np.ndarray) -> np.ndarray:
        """Which of ``keys`` were added before or repeat an earlier one of ``keys`` (a bool array); adds the others."""
        seen = self.lookup(keys)
        new: dict[int, None] = {}
        for i, key in enumerate(keys.tolist()):
            if not seen[i]:
                seen[i] = key in new
                new[key] = None
        self.add(np.fromiter(new, np.uint64, len(new)))
        return seen


class SignatureStore:
    """The signatures of the kept lines, row ``i`` for the ``i``-th kept line: the newest in memory, the others in
    an unnamed temporary file (read back with ``pread`` only when a line is compared with them, so they cost page
    cache, not the process's memory).

    Args:
        num_perm: values per signature.
        folder: where the temporary file goes (the output's folder: it has room for the output).
        buffer_rows: rows kept in memory before they are written to the file.
    """

    def __init__(self, num_perm: int, folder: Optional[Path] = None, buffer_rows: int = 1 << 16) -> None:
        self.num_perm, self.row_bytes = num_perm, 4 * num_perm
        self.folder, self.buffer_rows = folder, buffer_rows
        self.chunks: list[np.ndarray] = []  # in memory: rows on_disk.. in blocks
        self.chunk_starts: list[int] = []
        self.on_disk = self.rows = 0
        self.file: Any = None

    def __len__(self) -> int:
        return self.rows

    def extend(self, signatures: np.ndarray) -> int:
        """Store the rows of ``signatures``; return the row of the first."""
        first = self.rows
        if len(signatures):
            self.chunks.append(signatures)
            self.chunk_starts.append(first)
            self.rows += len(signatures)
        if self.rows - self.on_disk >= self.buffer_rows:
            if self.file is None:
                self.file = tempfile.TemporaryFile(dir=self.folder, prefix=".minhash-")
            for chunk in self.chunks:
                self.file.write(np.ascontiguousarray(chunk, np.uint32).tobytes())
            self.file.flush()
            self.on_disk = self.rows
            self.chunks, self.chunk_starts = [], []
        return first

    def take(self, rows: Sequence[int]) -> np.ndarray:
        """The signatures stored as ``rows``: (len(rows), num_perm)."""
        out = np.empty((len(rows), self.num_perm), np.uint32)
        for i, row in enumerate(rows):
            if row >= self.on_disk:
                chunk = bisect.bisect_right(self.chunk_starts, row) - 1
                out[i] = self.chunks[chunk][row - self.chunk_starts[chunk]]
            else:
                out[i] = np.frombuffer(os.pread(self.file.fileno(), self.row_bytes, row * self.row_bytes), np.uint32)
        return out

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class NearDuplicateIndex:
    """The kept lines' LSH band keys and signatures: decides, block by block and line by line in file order, whether
    a line is a near duplicate of a kept one.

    Band keys live as ``key << 32 | row`` (8 bytes) in :class:`SortedRuns`; a line sharing a band key with a kept line
    (of an earlier block, or earlier in its own) is compared with it, and is a near duplicate only if their
    signatures agree on at least ``threshold`` of the permutations (a band collision alone also happens to less
    similar lines). All lookups of a block are array operations; Python work is per candidate pair.

    Args:
        hasher: the MinHasher the signatures come from (its threshold and sizes).
        folder: where the signatures' temporary file goes.
    """

    def __init__(self, hasher: MinHasher, folder: Optional[Path] = None) -> None:
        self.min_agreeing = hasher.threshold * hasher.num_perm
        self.signatures = SignatureStore(hasher.num_perm, folder)
        self.sorted = SortedRuns()
        self.begin_block(np.zeros((0, hasher.num_perm), np.uint32), np.zeros((0, hasher.bands), np.uint64))

    def begin_block(self, signatures: np.ndarray, band_keys: np.ndarray) -> None:
        """Take the next block's lines (their signatures and band keys) and find their candidates."""
        self.block_signatures, self.block_keys = signatures, band_keys
        self.kept = np.zeros(len(signatures), bool)
        bands = band_keys.shape[1]
        self.earlier: dict[int, list[int]] = {}  # line -> rows of kept lines of earlier blocks sharing a band
        for i, found in self.sorted.with_prefix(band_keys.reshape(-1)):
            self.earlier.setdefault(i // bands, []).extend((found & LOW32).tolist())
        self.in_block: dict[int, list[int]] = {}  # line -> earlier lines of this block sharing a band
        flat = band_keys.reshape(-1)
        order = np.argsort(flat, kind="stable")  # equal keys stay in line order
        bounds = np.flatnonzero(np.diff(flat[order])) + 1
        starts, ends = np.concatenate([[0], bounds]), np.concatenate([bounds, [flat.size]])
        for start, end in zip(starts.tolist(), ends.tolist()):
            if end - start > 1:  # lines sharing this band key: each is compared with those before it
                lines = (order[start:end] // bands).tolist()
                for k in range(1, len(lines)):
                    self.in_block.setdefault(lines[k], []).extend(lines[:k])

    def is_near(self, i: int) -> bool:
        """Whether line ``i`` of the block agrees with a kept line on at least ``threshold`` of the permutations."""
        signature = self.block_signatures[i]
        rows = self.earlier.get(i)
        if rows and self.agrees(self.signatures.take(sorted(set(rows))), signature):
            return True
        earlier_lines = [j for j in self.in_block.get(i, ()) if self.kept[j]]
        return bool(earlier_lines) and self.agrees(self.block_signatures[earlier_lines], signature)

    def agrees(self, candidates: np.ndarray, signature: np.ndarray) -> bool:
        return bool(((candidates == signature).sum(axis=1) >= self.min_agreeing).any())

    def keep(self, i: int) -> None:
        """Remember line ``i`` of the block as kept."""
        self.kept[i] = True

    def end_block(self) -> None:
        """Store the kept lines' signatures and band keys."""
        kept = np.flatnonzero(self.kept)
        first = self.signatures.extend(self.block_signatures[kept])
        rows = np.arange(first, first + kept.size, dtype=np.uint64)
        if kept.size:
            self.sorted.push(((self.block_keys[kept] << np.uint64(32)) | rows[:, None]).reshape(-1))

    def close(self) -> None:
        self.signatures.close()
