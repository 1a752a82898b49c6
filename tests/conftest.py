"""Shared pytest fixtures."""
import os
from pathlib import Path

import pytest

from helpers import require


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The read-only shared data folder beside the checkout, or ``$MINIMIND_SHARED`` (mutation runs copy the tests
    one folder deeper); ``require``: skipped locally, a failure in CI."""
    path = Path(os.environ.get("MINIMIND_SHARED") or Path(__file__).resolve().parents[2] / "shared")
    require(path.is_dir(), f"the shared data folder is missing: {path}")
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(shared_dir: Path) -> Path:
    """MiniMind's own tokenizer folder (read-only, shared)."""
    return shared_dir / "minimind"
