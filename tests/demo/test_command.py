"""``python main.py demo`` end to end, shortened to one epoch per stage (the real demo's numbers are in README)."""

from minimind_pl.cli import main


def test_demo_runs_every_stage_and_prints_a_scorecard(tmp_path, capsys):
    checkpoints = main(["demo", "--out_dir", str(tmp_path / "data"), "--ckpt_dir", str(tmp_path / "ckpt"),
                        "--max_epochs", "1"])
    out = capsys.readouterr().out
    assert "=== scorecard ===" in out
    assert "held-out fact accuracy after sft" in out
    assert "validation perplexity after pretrain" in out
    for stage in ("pretrain", "sft"):
        assert (tmp_path / "ckpt" / stage / "last.ckpt").exists()
        assert checkpoints[stage].endswith("last.ckpt")
