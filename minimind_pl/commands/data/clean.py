"""``python main.py data clean INPUT --output OUTPUT``: the data cleaning step before training.

Each line goes through the rules in this order; the first that removes it is the one counted:

1. ``invalid_json``: not UTF-8 or not JSON;
2. ``invalid_record``: not a valid record of the file's format (the training code's rule);
3. ``empty_after_cleaning``: valid before, invalid after its texts were normalised (e.g. a text of control
   characters);
4. ``too_short`` / ``too_long``: fewer than ``min_chars`` or more than ``max_chars`` characters of model text;
5. ``language``: too few letters in the chosen languages;
6. ``exact_duplicate``: the same model text as an earlier kept line;
7. ``near_duplicate``: an earlier kept line is at least ``near_threshold`` similar (MinHash signatures compared
   when LSH finds the pair: see :mod:`.dedup`).

Kept lines are written with their texts normalised, as JSON (``ensure_ascii=False``, keys in their order), in input order:
the output depends only on the input and the arguments (not on the number of processes).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from minimind_pl.data.block_map import map_blocks
from minimind_pl.data.formats import DataFormat, resolve_format
from minimind_pl.data.jsonl import parse_block
from minimind_pl.errors import UserError

from minimind_pl.files import atomic_file

from .paths import check_output, input_files
from .dedup import KeySet, MinHasher, NearDuplicateIndex, text_key
from .text_rules import LANGUAGES, letter_counts, normalize_text

RULES = ("invalid_json", "invalid_record", "empty_after_cleaning", "too_short", "too_long", "language",
         "exact_duplicate", "near_duplicate")
UNICODE_FORMS = ("NFC", "NFKC", "none")
MAX_EXAMPLES = 5  # removed lines quoted per rule in the report
JSON_LINE = json.JSONEncoder(ensure_ascii=False).encode  # json.dumps(obj, ensure_ascii=False), built once


@dataclass
class CleanedLine:
    """What a worker decided about one line: the rule that removed it, or the line to write."""

    line_no: int
    rule: Optional[str] = None
    reason: str = ""
    output: bytes = b""


@dataclass
class CleanedBlock:
    """A block's lines in file order and, for those the per-line rules kept (in order), their duplicate keys."""

    lines: list[CleanedLine]
    exact_keys: np.ndarray  # uint64 per kept line
    signatures: Optional[np.ndarray] = None  # (kept, num_perm) uint32 MinHash signatures
    band_keys: Optional[np.ndarray] = None  # (kept, bands) LSH band keys


@dataclass
class LineCleaner:
    """The per-line rules that need no other line, and the duplicate keys of the lines they keep (run in the worker
    processes)."""

    data_format: DataFormat
    unicode_form: Optional[str]
    min_chars: int
    max_chars: Optional[int]
    languages: tuple[str, ...]
    min_language_share: float
    hasher: Optional[MinHasher]

    def __call__(self, first_line: int, data: bytes) -> CleanedBlock:
        records, errors, _ = parse_block(first_line, data)
        lines = [CleanedLine(line_no, "invalid_json", reason) for line_no, reason in errors]
        texts: dict[int, str] = {}  # line number -> model text of the kept lines
        for line_no, obj in records:
            line, text = self.clean(line_no, obj)
            lines.append(line)
            if text is not None:
                texts[line_no] = text
        lines.sort(key=lambda line: line.line_no)
        kept = [texts[line.line_no] for line in lines if line.rule is None]
        block = CleanedBlock(lines, np.fromiter(map(text_key, kept), np.uint64, len(kept)))
        if self.hasher is not None:
            block.signatures = self.hasher.signatures(kept)
            block.band_keys = self.hasher.band_keys(block.signatures)
        return block

    def clean(self, line_no: int, obj: Any) -> tuple[CleanedLine, Optional[str]]:
        """Normalise one parsed record and apply the rules 2-5 (see the module doc): the line, and the model text
        when it is kept."""
        error = self.data_format.check(obj)
        if error:
            return CleanedLine(line_no, "invalid_record", error), None
        changed = []
        obj = self.data_format.map_texts(obj, lambda text: normalized(text, self.unicode_form, changed))
        error = self.data_format.check(obj) if changed else None  # unchanged: still valid
        if error:
            return CleanedLine(line_no, "empty_after_cleaning", error), None
        text = self.data_format.model_text(obj)
        rule = self.length_or_language(text)
        if rule:
            return CleanedLine(line_no, rule, f"{len(text)} characters"), None
        return CleanedLine(line_no, output=JSON_LINE(obj).encode("utf-8") + b"\n"), text

    def length_or_language(self, text: str) -> Optional[str]:
        """The length or language rule that removes ``text``, or None."""
        if len(text) < self.min_chars:
            return "too_short"
        if self.max_chars is not None and len(text) > self.max_chars:
            return "too_long"
        if self.languages:
            counts = dict(zip(LANGUAGES, letter_counts(text)))
            letters = sum(counts.values())
            if letters and sum(counts[lang] for lang in self.languages) < self.min_language_share * letters:
                return "language"
        return None


@dataclass
class CleanReport:
    """How many lines each rule removed, with a few examples (``file:line: reason``)."""

    data_format: str
    lines: int = 0
    kept: int = 0
    removed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RULES, 0))
    examples: dict[str, list[str]] = field(default_factory=dict)

    def count(self, path: Path, line: CleanedLine) -> None:
        """Count one decided line."""
        self.lines += 1
        if line.rule is None:
            self.kept += 1
            return
        self.removed[line.rule] += 1
        shown = self.examples.setdefault(line.rule, [])
        if len(shown) < MAX_EXAMPLES:
            shown.append(f"{path}:{line.line_no}: {line.reason}".rstrip(": "))

    def summary(self) -> str:
        """The report as printed at the end."""
        rows = [f"{self.lines:,} lines ({self.data_format}): {self.kept:,} kept, {self.lines - self.kept:,} removed"]
        rows += [f"  {rule:<22} {n:>10,}" for rule, n in self.removed.items()]
        for rule, shown in self.examples.items():
            rows += [f"  e.g. {rule}: {example}" for example in shown[:2]]
        return "\n".join(rows)


def normalized(text: str, unicode_form: Optional[str], changed: list) -> str:
    """``normalize_text(text)``, appending to ``changed`` when that changes it."""
    out = normalize_text(text, unicode_form)
    if out != text:
        changed.append(text)
    return out


def make_cleaner(data_format: DataFormat, unicode_form: str, min_chars: int, max_chars: Optional[int],
                 languages: Optional[list[str]], min_language_share: float,
                 near_threshold: Optional[float], num_perm: int, ngram: int) -> LineCleaner:
    """The per-line rules from the command's arguments, each checked."""
    if unicode_form not in UNICODE_FORMS:
        raise UserError(f"--unicode_form must be one of {', '.join(UNICODE_FORMS)}, got {unicode_form!r}")
    unknown = sorted(set(languages or ()) - set(LANGUAGES))
    if unknown:
        raise UserError(f"--languages takes {', '.join(LANGUAGES)}; unknown: {', '.join(unknown)}")
    hasher = MinHasher(near_threshold, num_perm, ngram) if near_threshold else None
    return LineCleaner(data_format, None if unicode_form == "none" else unicode_form, min_chars, max_chars,
                       tuple(languages or ()), min_language_share, hasher)


def clean_command(input: str, *, output: str, format: str = "auto", unicode_form: str = "NFC", min_chars: int = 1,
                  max_chars: Optional[int] = None, languages: Optional[list[str]] = None,
                  min_language_share: float = 0.5, dedup: bool = True, near_threshold: Optional[float] = 0.8,
                  num_perm: int = 128, ngram: int = 3, num_proc: Optional[int] = None,
                  progress: bool = True) -> dict[str, Any]:
    """Clean a jsonl dataset (pretrain, SFT, DPO or RL prompts) into a new file and report what each rule removed.

    Texts are normalised (Unicode form, control characters, line ends, trailing spaces, runs of empty lines);
    invalid, too short or long, other-language and duplicate lines are removed. The input is never modified.

    Args:
        input: the jsonl file to clean.
        output: the cleaned jsonl file to write (not the input).
        format: auto (from the first record), pretrain, sft, dpo, rl or vlm (image conversations: their images are
            kept as they are).
        unicode_form: NFC (same look), NFKC (also folds full-width punctuation and compatibility characters) or none.
        min_chars: remove lines with fewer characters of model text (what a model reads, without chat markup).
        max_chars: remove lines with more characters of model text (none: no limit).
        languages: keep only lines whose letters are mostly in these languages (zh, en, other); none: all.
        min_language_share: the share of letters that must be in ``languages`` (lines without letters are kept).
        dedup: remove exact duplicates (same model text after cleaning) and, with near_threshold, near duplicates.
        near_threshold: Jaccard similarity (of word n-grams, a Chinese character being a word) from which a line is a
            near duplicate of an earlier one, estimated from MinHash signatures of the pairs LSH finds; none: exact
            duplicates only. Needs datasketch (pip install -e ".[data]").
        num_perm: MinHash permutations (more: a sharper threshold, slower).
        ngram: words per n-gram for the similarity.
        num_proc: worker processes (default: every CPU).
        progress: show a progress bar.
    """
    source = input_files([input], "INPUT")[0]
    target = check_output(Path(output), [source])
    data_format = resolve_format(source, format)
    cleaner = make_cleaner(data_format, unicode_form, min_chars, max_chars, languages, min_language_share,
                           near_threshold if dedup else None, num_perm, ngram)
    report = CleanReport(data_format.name)
    exact = KeySet()
    near = NearDuplicateIndex(cleaner.hasher, target.resolve().parent) if cleaner.hasher is not None else None
    try:
        with atomic_file(target) as handle:
            for block in map_blocks(source, cleaner, num_proc, f"cleaning {source.name}", progress):
                if dedup:
                    mark_duplicates(block, exact, near)
                for line in block.lines:
                    if line.rule is None:
                        handle.write(line.output)
                    report.count(source, line)
    finally:
        if near is not None:
            near.close()
    print(report.summary())
    print(f"wrote {target}")
    return {"format": data_format.name, "lines": report.lines, "kept": report.kept, "removed": report.removed,
            "examples": report.examples}


def mark_duplicates(block: CleanedBlock, exact: KeySet, near: Optional[NearDuplicateIndex]) -> None:
    """Set the rule of each line the per-line rules kept that is an exact or near duplicate of an earlier kept line
    (of this block or an earlier one), in file order; remember the keys of the others."""
    kept = [line for line in block.lines if line.rule is None]
    exact_before = exact.lookup(block.exact_keys)
    if near is not None:
        near.begin_block(block.signatures, block.band_keys)
    added: dict[int, None] = {}
    for i, (line, key) in enumerate(zip(kept, block.exact_keys.tolist())):
        if exact_before[i] or key in added:
            line.rule = "exact_duplicate"
        elif near is not None and near.is_near(i):
            line.rule = "near_duplicate"
        else:
            added[key] = None
            if near is not None:
                near.keep(i)
    exact.add(np.fromiter(added, np.uint64, len(added)))
    if near is not None:
        near.end_block()
