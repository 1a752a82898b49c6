"""Shared pytest fixtures."""
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The read-only shared data folder beside the checkout (skips the test if it is absent)."""
    path = Path(__file__).resolve().parents[2] / "shared"
    if not path.is_dir():
        pytest.skip(f"shared data folder not found: {path}")
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(shared_dir: Path) -> Path:
    """MiniMind's own tokenizer folder (read-only, shared)."""
    return shared_dir / "minimind"
