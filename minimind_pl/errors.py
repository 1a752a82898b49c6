"""Errors that ``python main.py`` reports as a short message (what, where, how to fix) instead of a traceback.

Library code raises them; ``minimind_pl.cli.main`` prints ``error: <message>`` and exits with ``exit_code``.
Setting the environment variable ``MINIMIND_DEBUG=1`` shows the traceback as well.
"""

from __future__ import annotations

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
