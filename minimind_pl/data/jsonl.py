"""Reading jsonl lines: the one parser of a line (UTF-8, JSON) that the token cache and the commands share."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from minimind_pl.errors import UserError, check_input_file


def parse_line(raw: bytes, line_no: int) -> tuple[Any, Optional[str]]:
    """``(parsed JSON, None)`` of one non-blank jsonl line, or ``(None, why it is invalid)``.

    Args:
        raw: the line's bytes (without its newline).
        line_no: its 1-based number (a UTF-8 byte-order mark is allowed on line 1).
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"invalid UTF-8 (byte {exc.start} of the line)"
    if line_no == 1:
        text = text.lstrip("\ufeff")
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON ({exc.msg}, column {exc.colno})"


def parse_block(first_line: int, data: bytes) -> tuple[list, list, int]:
    """Split a block of complete lines, decode and JSON-parse them: (records, errors, n_lines)."""
    records, errors = [], []
    lines = data.split(b"\n")
    for i, raw in enumerate(lines):
        line_no = first_line + i
        if not raw.strip():
            continue  # blank lines are not documents
        record, error = parse_line(raw, line_no)
        if error:
            errors.append((line_no, error))
        else:
            records.append((line_no, record))
    return records, errors, len(lines)


def read_jsonl(path: Union[str, Path], argument: Optional[str] = None,
               limit: Optional[int] = None) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed JSON)`` of each non-blank line of a jsonl file the user named.

    A missing, unreadable or directory ``path`` and an invalid line raise :class:`UserError` (``PATH:LINE: ...``).

    Args:
        path: the jsonl file.
        argument: the argument it came from (``--data``), for the messages.
        limit: stop after this many records.
    """
    path = check_input_file(path, argument)
    count = 0
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            if limit is not None and count >= limit:
                return
            record, error = parse_line(raw.rstrip(b"\r\n"), line_no)
            if error:
                raise UserError(f"{path}:{line_no}: {error}; fix the line")
            yield line_no, record
            count += 1
