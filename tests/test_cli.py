"""End to end through ``python main.py ...``: runs learn, log, and resume exactly (shipped configs: test_configs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import RecordBatches, fit, tiny_run

from minimind_pl.cli import main, usage
from minimind_pl.stages import Stage

def test_help_lists_every_command(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for command in ("fit", "validate", "demo", "tokenizer", "chat"):
        assert f"  {command} " in out
    assert usage() in out


def test_pretrain_loss_falls_and_logs_to_tensorboard(tmp_path, shared_dir):
    peak = 0.05  # TFLOP/s, given: on the CPU nothing is measured
    cli = main(tiny_run(tmp_path, shared_dir, "pretrain", "pretrain_real.jsonl", max_steps=30,
                        extra=["--model.peak_tflops", str(peak)]))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(cli.trainer.logger.log_dir))).Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "train/mfu", "val/loss", "val/ppl"):
        assert tag in scalars, f"{tag} missing from {sorted(scalars)}"
    rates, mfus = ([e.value for e in events.Scalars(tag)] for tag in ("train/tokens_per_sec", "train/mfu"))
    expected = [rate * cli.model.flops_per_token() / (peak * 1e12) for rate in rates]
    assert mfus == pytest.approx(expected, rel=1e-5) and 0 < mfus[-1] < 1
    losses = [e.value for e in events.Scalars("train/loss")]
    assert losses[-1] < losses[0] - 1.0, losses
    assert events.Tags()["tensors"], "generated samples are logged as text"


def test_sft_run_learns_the_answers(tmp_path, shared_dir):
    cli = main(tiny_run(tmp_path, shared_dir, "sft", "sft_real.jsonl", max_steps=20))
    assert isinstance(cli.model, Stage)
    assert float(cli.trainer.callback_metrics["val/loss"]) < 8.0  # log(6400) = 8.76 at random init
    assert (tmp_path / "ckpt" / "last.ckpt").exists()


def test_resume_runs_exactly_the_remaining_steps_to_the_same_weights(tmp_path, shared_dir):
    whole = RecordBatches()
    straight = fit(tiny_run(tmp_path / "a", shared_dir, "pretrain", "pretrain_real.jsonl", 6), whole)
    first = RecordBatches(stop_after=4)
    fit(tiny_run(tmp_path / "b", shared_dir, "pretrain", "pretrain_real.jsonl", 6), first)
    rest = RecordBatches()
    resumed = fit(tiny_run(tmp_path / "b", shared_dir, "pretrain", "pretrain_real.jsonl", 6,
                           ["--ckpt_path", str(tmp_path / "b" / "ckpt" / "last.ckpt")]), rest)
    assert resumed.trainer.global_step == 6
    assert first.seen + rest.seen == whole.seen  # the resumed run continues with the next batch
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_bad_data_stops_before_training_with_file_and_line(tmp_path, shared_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "also fine"}\nnot json\n', encoding="utf-8")
    args = tiny_run(tmp_path, shared_dir, "pretrain", "pretrain_real.jsonl", 2)
    args[args.index("--data.train_path") + 1] = str(bad)
    with pytest.raises(SystemExit) as done:
        main(args)
    assert done.value.code == 2
    assert "bad.jsonl, line 3" in capsys.readouterr().err
