"""``data split`` (a validation split by documents) and ``data mix`` (several files into one by weights), seeded.

A document is a non-blank line, so a DPO pair or a conversation always stays whole. Lines are copied byte for
byte (not parsed: ``data clean`` is the place that checks them), and both commands read their files twice (to
count the lines, then to copy them), so memory holds only the chosen line numbers, not the lines.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from minimind_pl.errors import UserError

from minimind_pl.files import atomic_file

from .paths import check_output, input_files


def documents(path: Path) -> Iterator[bytes]:
    """The non-blank lines of ``path``, each ending in a newline."""
    with open(path, "rb") as handle:
        for raw in handle:
            if raw.strip():
                yield raw if raw.endswith(b"\n") else raw + b"\n"


def count_documents(path: Path) -> int:
    """How many non-blank lines ``path`` has."""
    return sum(1 for _ in documents(path))


def split_command(input: str, val_docs: Optional[int] = None, val_fraction: float = 0.01, seed: int = 42,
                  train_output: Optional[str] = None, val_output: Optional[str] = None) -> dict[str, int]:
    """Split a jsonl dataset into training and validation files by documents (lines), chosen at random (seeded).

    Both outputs keep the input's order. The input is never modified.

    Args:
        input: the jsonl file.
        val_docs: documents for validation (default: val_fraction of them, at least 1).
        val_fraction: the share of documents for validation when val_docs is not given.
        seed: seed of the choice (same input and seed: the same split).
        train_output: the training file (default: INPUT with the suffix _train.jsonl).
        val_output: the validation file (default: INPUT with the suffix _val.jsonl).
    """
    source = input_files([input], "INPUT")[0]
    train_path = check_output(Path(train_output or source.with_name(f"{source.stem}_train.jsonl")), [source],
                              "--train_output")
    val_path = check_output(Path(val_output or source.with_name(f"{source.stem}_val.jsonl")), [source], "--val_output")
    if train_path.resolve() == val_path.resolve():
        raise UserError("--train_output and --val_output name the same file; name two files")
    total = count_documents(source)
    wanted = val_docs if val_docs is not None else max(1, round(val_fraction * total))
    if not 0 < wanted < total:
        raise UserError(f"{source} has {total} documents: cannot hold out {wanted} for validation "
                        "(--val_docs / --val_fraction must leave documents on both sides)")
    chosen = np.zeros(total, bool)  # a byte a document, not a Python set of line numbers
    chosen[np.random.default_rng(seed).choice(total, wanted, replace=False)] = True
    with atomic_file(train_path) as train, atomic_file(val_path) as val:
        for index, line in enumerate(documents(source)):
            (val if chosen[index] else train).write(line)
    print(f"{source}: {total - wanted:,} documents -> {train_path}, {wanted:,} -> {val_path}")
    return {"train": total - wanted, "val": wanted}


def mix_command(inputs: list[str], output: str, weights: Optional[list[float]] = None,
                seed: int = 42) -> dict[str, int]:
    """Mix jsonl files into one by weights: each file's documents are taken ``weight`` times (2: every document
    twice; 0.5: a random half), and the files are interleaved at random (seeded), each keeping its own order.

    Args:
        inputs: the jsonl files.
        output: the mixed jsonl file (not one of the inputs).
        weights: one per input, >= 0 (default: 1 each, i.e. every document once).
        seed: seed of the choice and of the interleaving.
    """
    sources = input_files(inputs, "--inputs")
    target = check_output(Path(output), sources)
    weights = [1.0] * len(sources) if weights is None else [float(w) for w in weights]
    if len(weights) != len(sources) or any(not math.isfinite(w) or w < 0 for w in weights):
        raise UserError(f"--weights needs one number >= 0 per input ({len(sources)}), got {weights}")
    rng = np.random.default_rng(seed)
    streams = [weighted_documents(path, weight, rng) for path, weight in zip(sources, weights)]
    remaining = np.array([count for count, _ in streams], np.float64)
    if remaining.sum() == 0:
        raise UserError("the weights choose no document; give at least one input a weight > 0")
    with atomic_file(target) as handle:
        while remaining.sum() > 0:  # the next document comes from a file chosen in proportion to what it has left
            pick = int(rng.choice(len(streams), p=remaining / remaining.sum()))
            handle.write(next(streams[pick][1]))
            remaining[pick] -= 1
    counts = {str(path): count for path, (count, _) in zip(sources, streams)}
    print("\n".join(f"  {n:>10,}  {path}" for path, n in counts.items()) + f"\nwrote {target}")
    return counts


def weighted_documents(path: Path, weight: float, rng: np.random.Generator) -> tuple[int, Iterator[bytes]]:
    """``(count, documents)``: ``int(weight)`` full passes over ``path`` and a random subset (seeded) of the
    fractional part, kept in file order."""
    total = count_documents(path)
    passes, extra = int(weight), round((weight - int(weight)) * total)
    subset = np.zeros(total, bool)  # a byte a document, not a Python set of line numbers
    if extra:
        subset[rng.choice(total, extra, replace=False)] = True

    def generate() -> Iterator[bytes]:
        for _ in range(passes):
            yield from documents(path)
        yield from (line for index, line in enumerate(documents(path)) if subset[index])

    return passes * total + extra, generate()
