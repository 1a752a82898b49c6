"""``python main.py data stats FILE... [--tokenizer DIR]``: what a dataset holds before training on it.

Per file (jsonl, or MiniMind-V's Parquet): lines (rows), documents, blank and invalid lines (the training code's rule; with a tokenizer, the stage's
encoder is that rule, and the lines it refuses are also counted apart), exact duplicates (same model text),
characters and their length percentiles, the share of Chinese / English / other letters, and with a tokenizer the
tokens training would see (the stage's own encoder: chat template, bos/eos, both sides of a DPO pair) with the
share of real tokens when each document is padded to ``seq_len`` (MiniMind) versus packed. For a format with images
(``vlm``): images in all, per row (mean, max), rows with images, and with a tokenizer the share of the tokens that are
image tokens.
"""
from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from minimind_pl.data.block_map import block_records, map_blocks
from minimind_pl.data.formats import DataFormat, resolve_format
from minimind_pl.errors import UserError

from .paths import input_files
from .dedup import KeySet, require_extra, text_key
from .text_rules import LANGUAGES, letter_counts

PERCENTILES = (50, 90, 99)


@dataclass
class BlockStats:
    """The statistics of one block of lines (summed over blocks by :class:`FileStats`)."""

    lines: int = 0
    blank: int = 0
    invalid: int = 0
    rejected: int = 0  # of the invalid: records the tokenizing encoder refused
    first_invalid: Optional[tuple[int, str]] = None  # (line, reason) of the block's first invalid line
    chars: list = field(default_factory=list)
    tokens: list = field(default_factory=list)  # per training document (two per DPO pair)
    letters: list = field(default_factory=lambda: [0, 0, 0])
    keys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))  # exact-duplicate key per document
    images: list = field(default_factory=list)  # per valid record, for a format with images
    image_tokens: int = 0


@dataclass
class LineStats:
    """Measures the lines of a block (run in the worker processes)."""

    data_format: DataFormat
    encoder: Any = None  # the stage's RecordEncoder, or None without a tokenizer

    def __call__(self, first_line: int, data: bytes) -> BlockStats:
        records, errors, n_lines = block_records(first_line, data)
        stats = BlockStats(lines=n_lines, invalid=len(errors), first_invalid=errors[0] if errors else None)
        stats.blank = n_lines - len(records) - len(errors)
        keys = []
        data_format = self.data_format
        for (line_no, obj), verdict in zip(records, self.verdicts(records)):
            if isinstance(verdict, str):  # each record is validated once: by the encoder when tokenizing
                stats.invalid += 1
                stats.rejected += self.encoder is not None
                if stats.first_invalid is None or line_no < stats.first_invalid[0]:
                    stats.first_invalid = (line_no, verdict)
                continue
            documents = (verdict or ())[:data_format.counted_documents]  # RL: the prompt, not the gt
            stats.tokens += [len(document[0]) for document in documents]
            if data_format.count_images is not None:
                stats.images.append(data_format.count_images(obj))
                image_id = getattr(self.encoder, "image_token_id", None)
                stats.image_tokens += sum(int((np.asarray(d[0]) == image_id).sum()) for d in documents)
            text = data_format.model_text(obj)
            stats.chars.append(len(text))
            keys.append(text_key(text))
            stats.letters = [a + b for a, b in zip(stats.letters, letter_counts(text))]
        stats.keys = np.array(keys, np.uint64)
        return stats

    def verdicts(self, records: list) -> list:
        """Per record, why it is invalid (a string), or its training documents (a list of ``(ids, mask)``; None
        without a tokenizer)."""
        if self.encoder is None:
            return [self.data_format.check(obj) for _, obj in records]
        return self.encoder.encode_records(records) if records else []


def make_encoder(tokenizer: Optional[str], data_format: DataFormat) -> Any:
    """The encoder training uses for ``data_format`` (its DataModule's, without a length limit), or None without
    a tokenizer."""
    if tokenizer is None:
        return None
    from minimind_pl.tokenizer import Tokenizer

    return data_format.encoder(Tokenizer.from_file(tokenizer))


class FileStats:
    """The statistics of a whole file, summed block by block (lengths kept as 4 bytes per document)."""

    def __init__(self, path: Path, data_format: str, with_images: bool = False) -> None:
        self.path, self.data_format, self.with_images = path, data_format, with_images
        self.lines = self.blank = self.invalid = self.rejected = self.duplicates = 0
        self.first_invalid: Optional[tuple[int, str]] = None
        self.tokenized = False
        self.chars, self.tokens = array("I"), array("I")
        self.letters = [0, 0, 0]
        self.seen = KeySet()
        self.images = array("I")  # images per valid record, for a format with images
        self.image_tokens = 0

    def add(self, block: BlockStats) -> None:
        """Sum one block in (duplicates are counted against every earlier block)."""
        self.lines += block.lines
        self.blank += block.blank
        self.invalid += block.invalid
        self.rejected += block.rejected
        self.first_invalid = self.first_invalid or block.first_invalid
        self.chars.extend(block.chars)
        self.tokens.extend(block.tokens)
        self.letters = [a + b for a, b in zip(self.letters, block.letters)]
        self.duplicates += int(self.seen.mark(block.keys).sum())
        self.images.extend(block.images)
        self.image_tokens += block.image_tokens

    def invalid_details(self) -> dict[str, Any]:
        """How many invalid lines the tokenizing encoder refused, and the first invalid line with its reason."""
        out: dict[str, Any] = {"refused_by_encoder": self.rejected} if self.tokenized else {}
        if self.first_invalid:
            out["first_invalid"] = f"line {self.first_invalid[0]}: {self.first_invalid[1]}"
        return out

    def summary(self, seq_len: int) -> dict[str, Any]:
        """The statistics as a dict (the printed report and the command's return value)."""
        out: dict[str, Any] = {"file": str(self.path), "format": self.data_format, "lines": self.lines,
                               "documents": len(self.chars), "blank_lines": self.blank,
                               "invalid_lines": self.invalid, **self.invalid_details(),
                               "exact_duplicates": self.duplicates,
                               "characters": int(sum(self.chars))}
        out.update(percentiles("chars", self.chars))
        letters = sum(self.letters) or 1
        out.update({f"share_{lang}": round(n / letters, 4) for lang, n in zip(LANGUAGES, self.letters)})
        if self.tokenized:
            out["tokens"] = 0
        if self.tokens:
            out["tokens"] = int(sum(self.tokens))
            out.update(percentiles("tokens", self.tokens))
            out.update(padding_shares(np.asarray(self.tokens, np.int64), seq_len))
        if self.with_images:
            out.update(self.image_summary())
        return out

    def image_summary(self) -> dict[str, Any]:
        """Images in all, per row, rows with images, and (tokenized) the image tokens' share of all tokens."""
        per_row = np.asarray(self.images, np.int64)
        mean = float(per_row.mean()) if per_row.size else 0.0
        out: dict[str, Any] = {"images": int(per_row.sum()), "images_per_row_mean": round(mean, 4),
                               "images_per_row_max": int(per_row.max(initial=0)),
                               "rows_with_images": int((per_row > 0).sum())}
        if self.tokens:
            out["image_token_share"] = round(self.image_tokens / max(1, sum(self.tokens)), 4)
        return out


def percentiles(name: str, lengths: array) -> dict[str, int]:
    """The ``PERCENTILES`` and the maximum of ``lengths``."""
    if not lengths:
        return {}
    values = np.percentile(np.asarray(lengths), PERCENTILES, method="lower")
    return {**{f"{name}_p{p}": int(v) for p, v in zip(PERCENTILES, values)}, f"{name}_max": int(max(lengths))}


def padding_shares(lengths: np.ndarray, seq_len: int) -> dict[str, float]:
    """Real tokens per token of a batch row: each document padded to ``seq_len`` (cut if longer, MiniMind) versus
    documents packed into full rows."""
    total = int(lengths.sum())
    padded = float(np.minimum(lengths, seq_len).sum()) / (lengths.size * seq_len)
    packed = total / (math.ceil(total / seq_len) * seq_len)
    return {"seq_len": seq_len, "real_share_padded": round(padded, 4), "real_share_packed": round(packed, 4),
            "docs_cut_at_seq_len": int((lengths > seq_len).sum())}


def stats_command(files: list[str], tokenizer: Optional[str] = None, seq_len: int = 340, format: str = "auto",
                  plot: Optional[str] = None, num_proc: Optional[int] = None,
                  progress: bool = True) -> list[dict[str, Any]]:
    """Print what jsonl datasets hold: documents, characters, tokens, lengths, languages, duplicates, bad lines,
    and for image conversations their images.

    Args:
        files: the jsonl files (pretrain, SFT, DPO, RL prompts or image conversations) or MiniMind-V Parquet files.
        tokenizer: a tokenizer folder: also count the tokens training sees, and the padding waste.
        seq_len: the row length for the padding-versus-packing shares (MiniMind's pretrain: 340).
        format: auto (from each file's first record; a Parquet file is vlm), pretrain, sft, dpo, rl or vlm.
        plot: write a PNG histogram of the document lengths here (needs matplotlib: pip install -e ".[data]").
        num_proc: worker processes (default: every CPU).
        progress: show a progress bar.
    """
    if seq_len < 1:
        raise UserError(f"--seq_len must be >= 1, got {seq_len}")
    results, measured = [], []
    for path in input_files(files, "FILE", parquet=True):
        data_format = resolve_format(path, format)
        stats = FileStats(path, data_format.name, with_images=data_format.count_images is not None)
        measure = LineStats(data_format, make_encoder(tokenizer, data_format))
        stats.tokenized = measure.encoder is not None
        for block in map_blocks(path, measure, num_proc, f"reading {path.name}", progress):
            stats.add(block)
        summary = stats.summary(seq_len)
        print("\n".join([str(path)] + [f"  {k:<20} {v:,}" if isinstance(v, int) else f"  {k:<20} {v}"
                                       for k, v in summary.items() if k != "file"]))
        results.append(summary)
        measured.append(stats)
    if plot:
        plot_lengths(measured, Path(plot))
    return results


def plot_lengths(measured: list[FileStats], target: Path) -> None:
    """A PNG with a histogram of each file's document lengths (tokens when counted, else characters)."""
    require_extra("matplotlib", "--plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5))
    unit = "tokens" if all(s.tokens for s in measured) else "characters"
    for stats in measured:
        axis.hist(np.asarray(stats.tokens if unit == "tokens" else stats.chars), bins=60, alpha=0.6,
                  label=stats.path.name)
    axis.set(xlabel=f"document length ({unit})", ylabel="documents", title="document lengths")
    axis.legend()
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=100, bbox_inches="tight")
    plt.close(figure)
    print(f"wrote {target}")
