"""Shared pytest fixtures."""
from pathlib import Path

import pytest

from helpers import require


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The read-only shared data folder beside the checkout (``require``: skipped locally, a failure in CI)."""
    path = Path(__file__).resolve().parents[2] / "shared"
    require(path.is_dir(), f"the shared data folder is missing: {path}")
    return path
