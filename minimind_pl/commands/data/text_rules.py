"""The text rules of ``data clean`` and ``data stats``: Unicode normalisation, and letters counted by language.

What a format is (detection, record checks, the texts a model reads) lives in :mod:`minimind_pl.data.formats`.
"""
from __future__ import annotations

import re
import unicodedata
from typing import Optional

# Characters that carry no text: C0/C1 controls except tab and newline, the byte-order mark, zero-width space.
CONTROL_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufeff\u200b]")
TRAILING_SPACE = re.compile(r"[ \t]+(?=\n)")
BLANK_LINES = re.compile(r"\n{3,}")
CJK_RANGES = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # CJK unified ideographs (+ ext. A, compatibility)
CHINESE_CHARS = re.compile(f"[{CJK_RANGES}]")
ENGLISH_LETTERS = re.compile("[A-Za-z]")
LETTERS = re.compile(r"[^\W\d_]")  # a letter of any script
LANGUAGES = ("zh", "en", "other")


def normalize_text(text: str, unicode_form: Optional[str] = "NFC") -> str:
    """``text`` in one Unicode form, without control characters, with ``\\n`` line ends, no trailing spaces on a
    line, at most one empty line in a row, and no blank start or end.

    Args:
        text: the string.
        unicode_form: ``NFC`` (composes characters; the text looks the same), ``NFKC`` (also folds compatibility
            forms: full-width ``，`` becomes ``,``), or None to keep the characters as they are.
    """
    if unicode_form:
        text = unicodedata.normalize(unicode_form, text)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = CONTROL_CHARS.sub("", text)
    if " \n" in text or "\t\n" in text:  # the regular expressions only where they can match: much faster
        text = TRAILING_SPACE.sub("", text)
    if "\n\n\n" in text:
        text = BLANK_LINES.sub("\n\n", text)
    return text.strip()


def letter_counts(text: str) -> tuple[int, int, int]:
    """``(Chinese, English, other)`` letters of ``text`` (digits, punctuation and spaces are not letters)."""
    chinese, english = len(CHINESE_CHARS.findall(text)), len(ENGLISH_LETTERS.findall(text))
    return chinese, english, max(0, len(LETTERS.findall(text)) - chinese - english)
