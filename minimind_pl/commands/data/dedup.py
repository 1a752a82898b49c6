"""Exact and near-duplicate detection that stays small: 64-bit keys in sorted arrays, MinHash LSH band keys.

A line is an exact duplicate when the 64-bit BLAKE2b hash of its model text (after cleaning) was seen on an
earlier kept line, and a near duplicate when one of its LSH band keys was: its MinHash signature (datasketch,
over the n-grams of words of the lower-cased text, where each Chinese character is a word) agrees with an earlier kept line's on every row of some
band. Bands and rows are chosen for the Jaccard ``threshold`` as MinHash LSH does, minimising the area of false
positives below the threshold plus false negatives above it.

The keys seen live in :class:`KeySet`, 8 bytes a key in sorted numpy arrays (datasketch's own ``MinHashLSH``
keeps each band of each key as Python objects, kilobytes a line: a million-line file would not fit in 1 GB).
"""
from __future__ import annotations

import hashlib
import re
from typing import Any, Optional

import numpy as np

from minimind_pl.errors import UserError

MIX = np.uint64(0x9E3779B97F4A7C15)  # an odd 64-bit constant: folds values into one key (wrapping multiply)
DATA_EXTRA_HINT = 'pip install -e ".[data]"'
MIX_INVERSE = np.uint64(pow(int(MIX), -1, 1 << 64))
# The words of the similarity: each CJK character alone (Chinese has no spaces), and runs of other letters and digits.
CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
WORD = re.compile(f"[{CJK}]|[^\\W_{CJK}]+")


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


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """``(bands, rows)`` with ``bands * rows <= num_perm`` whose collision curve ``1 - (1 - s**rows)**bands``
    best separates Jaccard similarities below ``threshold`` from those above (equal weights)."""
    if not 0.0 < threshold < 1.0:
        raise UserError(f"--near_threshold must be between 0 and 1 (exclusive), got {threshold}")
    similarity = (np.arange(2000) + 0.5) / 2000
    best = (np.inf, 1, 1)
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            collide = 1.0 - (1.0 - similarity ** rows) ** bands
            error = np.where(similarity < threshold, collide, 1.0 - collide).mean()
            best = min(best, (error, bands, rows))
    return best[1], best[2]


class NearDuplicateKeys:
    """The LSH band keys of a text: MinHash (datasketch) over its ``ngram``-grams of words (see :data:`WORDS`).

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
        self.ngram, self.num_perm, self.seed = ngram, num_perm, seed
        self.minhash = datasketch.MinHash(num_perm=num_perm, seed=seed, hashfunc=_same)  # cleared for each text
        self.row_powers = np.cumprod(np.full(self.rows, MIX, np.uint64))
        self._powers: Optional[tuple[np.ndarray, np.ndarray]] = None
        self.band_ids = np.arange(1, self.bands + 1, dtype=np.uint64)

    def shingles(self, text: str) -> np.ndarray:
        """32-bit hashes of the word n-grams of ``text`` (lower-cased; a shorter text is one shingle).

        The words are joined by one space; the hash of the characters from position i to j is
        ``(prefix[j] - prefix[i]) * MIX**-i`` with ``prefix`` the running sum of ``char * MIX**position`` (wrapping
        at 2**64), so every n-gram is hashed in a few array operations, the same wherever it stands.
        """
        words = WORD.findall(text.lower()) or [" "]
        points = np.frombuffer(" ".join(words).encode("utf-32-le"), np.uint32).astype(np.uint64)
        powers, inverse = self.powers(points.size + 1)  # MIX**i and MIX**-i
        prefix = np.concatenate([np.zeros(1, np.uint64), np.cumsum(points * powers[: points.size], dtype=np.uint64)])
        lengths = np.fromiter(map(len, words), np.int64, len(words))
        starts = np.concatenate([[0], np.cumsum(lengths[:-1] + 1)])  # each word's first character
        ends = starts + lengths
        width = min(self.ngram, len(words))
        first, last = starts[: len(words) - width + 1], ends[width - 1:]
        hashes = (prefix[last] - prefix[first]) * inverse[first]
        return np.unique((hashes ^ (hashes >> np.uint64(32))) & np.uint64(0xFFFFFFFF))

    def powers(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """``MIX**i`` and ``MIX**-i`` for i < ``size`` (wrapping at 2**64), kept and grown as texts get longer."""
        if self._powers is None or self._powers[0].size < size:
            size = max(size, 4096, 2 * (0 if self._powers is None else self._powers[0].size))
            self._powers = (np.cumprod(np.full(size, MIX, np.uint64)) * MIX_INVERSE,
                            np.cumprod(np.full(size, MIX_INVERSE, np.uint64)) * MIX)
        return self._powers

    def keys(self, text: str) -> np.ndarray:
        """One uint64 key per band of the MinHash signature of ``text``."""
        minhash = self.minhash
        minhash.clear()
        minhash.update_batch(self.shingles(text).tolist())
        rows = minhash.hashvalues[: self.bands * self.rows].astype(np.uint64).reshape(self.bands, self.rows)
        return (rows * self.row_powers).sum(axis=1, dtype=np.uint64) + self.band_ids  # the band's number: bands differ


def _same(value: int) -> int:
    """The shingle hashes are hashed already: datasketch's hash function is the identity."""
    return value


class KeySet:
    """A growing set of uint64 keys: recent ones in a Python set, the others in sorted numpy arrays ("runs"), merged
    like a binary counter up to ``max_run`` keys each, so lookups stay logarithmic, memory is about 8 bytes a key
    and a merge never needs more than twice a run's size on top.

    Args:
        flush_at: keys held in the Python set before they move into a sorted array.
        max_run: the largest run a merge makes (8M keys, 64 MB).
    """

    def __init__(self, flush_at: int = 1 << 16, max_run: int = 1 << 23) -> None:
        self.recent: set[int] = set()
        self.runs: list[np.ndarray] = []
        self.flush_at, self.max_run = flush_at, max_run

    def __len__(self) -> int:
        return len(self.recent) + sum(run.size for run in self.runs)

    def contains_any(self, keys: np.ndarray) -> bool:
        """Whether any of ``keys`` (uint64) was added."""
        if any(key in self.recent for key in keys.tolist()):
            return True
        for run in self.runs:
            found = np.minimum(np.searchsorted(run, keys), run.size - 1)
            if np.any(run[found] == keys):
                return True
        return False

    def add(self, keys: np.ndarray) -> None:
        """Add ``keys`` (uint64) that are not in the set yet (callers look them up first)."""
        self.recent.update(keys.tolist())
        if len(self.recent) < self.flush_at:
            return
        run = np.sort(np.fromiter(self.recent, np.uint64, len(self.recent)))
        self.recent.clear()
        # keys are never added twice, so a merge is a concatenation sorted in place (no unique pass, no copies)
        while self.runs and self.runs[-1].size <= 2 * run.size and self.runs[-1].size + run.size <= self.max_run:
            run = np.concatenate([self.runs.pop(), run])
            run.sort()
        self.runs.append(run)
