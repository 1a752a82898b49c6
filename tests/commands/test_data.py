"""``python main.py data prepare``: a config's token caches built ahead of a run, found ready by ``fit``."""

from __future__ import annotations

import pytest

from helpers import RecordBatches, fit, tiny_run
from minimind_pl.cli import dispatch, main
from minimind_pl.errors import UserError


def cache_folders(tmp_path):
    return {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir() if p.name.endswith(".cache")}


def test_prepare_builds_the_caches_fit_then_uses(tmp_path, shared_dir, capsys):
    args = tiny_run(tmp_path, shared_dir, "sft", "sft_real.jsonl", 2, ["--trainer.enable_progress_bar", "false"])
    stats = main(["data", "prepare", *args[1:]])  # fit's arguments, without the subcommand
    assert stats["train"]["documents"] > 0 and stats["val"]["documents"] > 0
    assert "token caches ready" in capsys.readouterr().out
    prepared = cache_folders(tmp_path)
    assert len(prepared) == 1
    fit(args, RecordBatches())
    assert cache_folders(tmp_path) == prepared  # fit found them: nothing rebuilt, nothing added


def test_prepare_needs_a_config_and_knows_its_subcommands():
    with pytest.raises(UserError, match="needs the training config"):
        dispatch(["data", "prepare", "--data.batch_size", "2"])
    with pytest.raises(UserError, match="unknown data subcommand"):
        dispatch(["data", "shuffle"])
