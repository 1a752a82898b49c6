"""Resuming with ``--ckpt_path``: RNG states make dropout runs exact; changed arguments take effect and are listed;
another architecture or stage is refused."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch

from helpers import RecordBatches, fit, tiny_run
from minimind_pl.cli import main
from minimind_pl.stages.resume import ResumeReport, collect_rng_states, restore_rng_states

CORPUS = "pretrain_real.jsonl"


def draws() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_rng_states_survive_a_safe_load(tmp_path):
    states = collect_rng_states()
    expected = draws()
    torch.save({"rng_states": states}, tmp_path / "rng.pt")
    draws()  # move every generator on
    restore_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True)["rng_states"])
    assert draws() == expected


def test_report_lists_training_changes_and_separates_the_architecture():
    saved = {"learning_rate": 5e-4, "betas": (0.9, 0.95), "init_weights": "a.ckpt",
             "config": {"hidden_size": 64, "dropout": 0.0}}
    current = {"learning_rate": 1e-4, "betas": [0.9, 0.95], "init_weights": None,
               "config": {"hidden_size": 96, "dropout": 0.1}}
    report = ResumeReport().compare(saved, current, "model")
    assert report.changes == ["model.config.dropout: 0.0 -> 0.1", "model.learning_rate: 0.0005 -> 0.0001"]
    assert "model.config.hidden_size: 64 -> 96" in report.architecture  # (and what derives from it: head_dim, ...)
    assert not any("dropout" in line or "learning_rate" in line for line in report.architecture)


def test_dropout_run_resumed_at_step_6_of_12_ends_bit_identical(tmp_path, shared_dir):
    """With dropout 0.1, 8-step accumulation (configs/minimind3/pretrain.yaml) and two loader workers."""
    shipped = ["--model.config.dropout", "0.1", "--trainer.accumulate_grad_batches", "8",
               "--data.num_workers", "2", "--trainer.enable_progress_bar", "false"]
    straight = fit(tiny_run(tmp_path / "a", shared_dir, "pretrain", CORPUS, 12, shipped), RecordBatches())
    fit(tiny_run(tmp_path / "b", shared_dir, "pretrain", CORPUS, 12, shipped), RecordBatches(stop_after=6))
    last = tmp_path / "b" / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 6
    resumed = fit(tiny_run(tmp_path / "b", shared_dir, "pretrain", CORPUS, 12, [*shipped, "--ckpt_path", str(last)]),
                  RecordBatches())
    assert resumed.trainer.global_step == 12
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def interrupted_run(tmp_path, shared_dir):
    """A pretrain run stopped after its step-4 checkpoint; returns that checkpoint's path."""
    fit(tiny_run(tmp_path, shared_dir, "pretrain", CORPUS, 8, ["--trainer.enable_progress_bar", "false"]),
        RecordBatches(stop_after=4))
    return tmp_path / "ckpt" / "last.ckpt"


class OptimizerAtStart(RecordBatches):
    """Remember the learning rates and betas the first resumed step runs with."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.seen:
            group = trainer.optimizers[0].param_groups[0]
            self.first = {"lr": group["lr"], "initial_lr": group["initial_lr"], "betas": group["betas"],
                          "dropout": pl_module.model.config.dropout}
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)


def test_changed_learning_rate_and_dropout_take_effect_and_are_listed(tmp_path, shared_dir, caplog, monkeypatch):
    last = interrupted_run(tmp_path, shared_dir)
    saved = torch.load(last, weights_only=True)
    assert saved["hyper_parameters"]["learning_rate"] == 3e-3
    recorder = OptimizerAtStart()
    loads = []  # every torch.load of the resumed run: the check and Lightning's restore share one
    torch_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: loads.append(args[0]) or torch_load(*args, **kwargs))
    with caplog.at_level(logging.INFO):
        resumed = fit(tiny_run(tmp_path, shared_dir, "pretrain", CORPUS, 8, [
            "--ckpt_path", str(last), "--model.learning_rate", "0.01", "--model.betas", "[0.8, 0.9]",
            "--model.config.dropout", "0.1", "--trainer.enable_progress_bar", "false"]), recorder)
    assert resumed.trainer.global_step == 8
    assert [str(path) for path in loads] == [str(last)]
    message = next(r.getMessage() for r in caplog.records if "Resuming from" in r.getMessage())
    for change in ("model.learning_rate: 0.003 -> 0.01", "model.config.dropout: 0.0 -> 0.1",
                   "model.betas: [0.9, 0.95] -> [0.8, 0.9]"):
        assert change in message
    schedule = resumed.model.learning_rate_factor
    assert recorder.first["initial_lr"] == 0.01 and recorder.first["betas"] == (0.8, 0.9)
    assert recorder.first["lr"] == pytest.approx(0.01 * schedule(4))  # step 5 of the new schedule, not 3e-3's
    assert recorder.first["dropout"] == 0.1


def test_another_architecture_or_stage_is_refused(tmp_path, shared_dir, capsys):
    last = interrupted_run(tmp_path, shared_dir)
    with pytest.raises(SystemExit) as done:
        main(tiny_run(tmp_path, shared_dir, "pretrain", CORPUS, 8, ["--ckpt_path", str(last),
                                                                   "--model.config.num_hidden_layers", "3"]))
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "model.config.num_hidden_layers: 2 -> 3" in err and "--model.init_weights" in err
    with pytest.raises(SystemExit) as done:
        main(tiny_run(tmp_path, shared_dir, "sft", "sft_real.jsonl", 8, ["--ckpt_path", str(last)]))
    assert done.value.code == 2
    assert "is a Pretrain checkpoint but this config trains SFT" in capsys.readouterr().err
