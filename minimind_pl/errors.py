"""Errors that ``python main.py`` reports as a short message (what, where, how to fix) instead of a traceback.

Library code raises them; ``minimind_pl.cli.main`` prints ``error: <message>`` and exits with ``exit_code``.
Setting the environment variable ``MINIMIND_DEBUG=1`` shows the traceback as well. ``check_input_file`` is the
one check of a file the user named (missing, a directory, unreadable), for every command and data module.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

DEBUG_ENV = "MINIMIND_DEBUG"


class ReportedError(Exception):
    """An error the command line reports by its message alone, exiting with ``exit_code``."""

    exit_code = 1


class UserError(ReportedError, ValueError):
    """A mistake in the user's input (arguments, files, data, checkpoints): the message says what, where, and how
    to fix it. A ``ValueError`` too, so callers that catch bad values keep working."""

    exit_code = 2


class TrainingStopped(ReportedError):
    """A run stopped on purpose before its end (diverged, interrupted); the message says what to do next."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


#: What ``python main.py`` reports in one line: the project's errors, and missing or unreadable files.
REPORTED_ERRORS = (ReportedError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def reported_cause(error: BaseException) -> BaseException | None:
    """The first error in ``error``'s chain (itself, then its explicit causes) that is reported in one line, if any.

    Libraries that call our code wrap its errors (jsonargparse, instantiating a stage or DataModule, raises
    "Does not validate against any of the Union subtypes" from them); the original says what to fix.
    """
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, REPORTED_ERRORS):
            return error
        seen.add(id(error))
        error = error.__cause__  # explicit causes only: an error raised while handling another is its own bug
    return None


def check_input_file(path: str | Path, argument: Optional[str] = None, expected: str = "a .jsonl file") -> Path:
    """``path`` if it is a file this process can read; otherwise a :class:`UserError` saying what is wrong
    (missing, a directory, unreadable), where it came from, and how to fix it.

    Every command and data module that reads a file the user named checks it here first.

    Args:
        path: the file the user named.
        argument: the argument it came from, spelled as on the command line (``--data.train_path``).
        expected: what the file should be, for the messages.
    """
    path = Path(path)
    named = f"{path} (from {argument})" if argument else str(path)
    try:
        is_dir = path.is_dir()
        exists = is_dir or path.exists()
    except PermissionError as err:  # a folder on the way cannot be searched
        raise UserError(f"cannot read {named}: permission denied on a folder of its path ({err.strerror}); "
                        "make the folders readable, or use a copy in a readable place") from err
    if not exists:
        raise UserError(f"not found: {named}; check the path (a relative path starts from {Path.cwd()})")
    if is_dir:
        inside = sorted(p.name for p in path.glob("*.jsonl"))[:3]
        hint = f" such as {path / inside[0]}" if inside else ""
        raise UserError(f"{named} is a directory, but {expected} is expected; name a file inside it{hint}")
    try:
        with open(path, "rb"):
            pass
    except PermissionError as err:
        raise UserError(f"cannot read {named}: permission denied; make it readable (chmod a+r {path}) "
                        "or use a copy in a readable place") from err
    except OSError as err:
        raise UserError(f"cannot read {named}: {err.strerror or err}") from err
    return path


def refuse_mismatch(message: str, fix: str, allow: bool, flag: str) -> None:
    """A checkpoint used with another part than it was trained with (tokenizer, vision tower): a UserError saying
    ``message``, ``fix`` and that ``flag`` goes on anyway; with ``allow`` (that flag given) a warning."""
    if not allow:
        raise UserError(f"{message}. {fix}, or pass {flag} to use this one anyway.")
    warnings.warn(f"{message}; going on because of {flag}.")
