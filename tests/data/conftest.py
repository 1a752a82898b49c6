"""Fixtures for the data tests: MiniMind's tokenizer and small jsonl files written on the fly."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import require


@pytest.fixture(scope="session")
def tok_dir(shared_dir: Path) -> str:
    """MiniMind's own tokenizer directory (read-only, shared)."""
    path = shared_dir / "minimind"
    require((path / "tokenizer.json").is_file(), f"MiniMind's tokenizer is missing from {path}")
    return str(path)


@pytest.fixture(scope="session")
def corpus(shared_dir: Path) -> Path:
    """The shared real-text corpus folder."""
    path = shared_dir / "corpus"
    require((path / "pretrain_real.jsonl").is_file(), f"the shared corpus is missing from {path}")
    return path


def _write_jsonl(path: Path, records: list) -> Path:
    with open(path, "wb") as f:
        for r in records:
            if isinstance(r, bytes):
                f.write(r + b"\n")
            elif isinstance(r, str):
                f.write(r.encode() + b"\n")
            else:
                f.write(json.dumps(r, ensure_ascii=False).encode() + b"\n")
    return path


@pytest.fixture
def write_jsonl():
    """``write_jsonl(path, records)``: write dicts (or raw str/bytes lines) as a jsonl file."""
    return _write_jsonl
