"""Non-finite losses and gradients: the step is skipped and counted; a run that keeps diverging stops with a
message and exit code 1; no checkpoint with NaN weights is written over a good one."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import RecordBatches, fit, tiny_run
from minimind_pl.cli import main
from minimind_pl.errors import TrainingStopped
from minimind_pl.checkpoints.files import nonfinite_tensors
from minimind_pl.stages.nonfinite import NonFiniteSteps

CORPUS = "pretrain_real.jsonl"
QUIET = ["--trainer.enable_progress_bar", "false"]


def test_counts_skipped_steps_and_the_current_run_of_them():
    steps = NonFiniteSteps()
    verdicts = []
    for step, (loss, norm) in enumerate([(1.0, 1.0), (math.nan, 1.0), (1.0, math.inf), (1.0, 2.0), (1.0, math.nan)], 1):
        steps.note_loss(torch.tensor(loss))
        verdicts.append(float(steps.verdict(torch.tensor(norm), step)))
        if step == 3:
            assert steps.host_counts() == (2, 2, 3)
    assert verdicts == [0.0, 1.0, 1.0, 0.0, 1.0]
    assert steps.host_counts() == (1, 3, 5)


def test_names_the_tensors_that_are_not_finite():
    tensors = {"a": torch.ones(2), "b": torch.tensor([1.0, math.nan]), "ids": torch.arange(3), "c": torch.tensor(math.inf)}
    assert nonfinite_tensors(tensors.items()) == ["b", "c"]
    assert nonfinite_tensors({"a": torch.ones(2)}.items()) == []


class PoisonGradients(RecordBatches):
    """Make one optimizer step's gradients NaN (as a bad batch would) and record the weights around it."""

    def __init__(self, at_step: int) -> None:
        super().__init__()
        self.at_step, self.weights = at_step, {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step + 1 == self.at_step:
            next(p for p in pl_module.parameters() if p.grad is not None).grad[0] = math.nan

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.weights[trainer.global_step] = {k: v.clone() for k, v in pl_module.model.state_dict().items()}


def test_a_nan_step_is_skipped_without_changing_the_weights_and_the_run_goes_on(tmp_path, shared_dir):
    recorder = PoisonGradients(at_step=3)
    cli = fit(tiny_run(tmp_path, shared_dir, "pretrain", CORPUS, 6, QUIET), recorder)
    assert cli.trainer.global_step == 6
    before, after, later = recorder.weights[2], recorder.weights[3], recorder.weights[4]
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not all(torch.equal(after[k], later[k]) for k in after)
    assert all(torch.isfinite(v).all() for v in recorder.weights[6].values())
    optimizer_state = cli.trainer.optimizers[0].state
    assert {int(s["step"]) for s in optimizer_state.values()} == {5}  # 6 steps, 1 skipped
    assert float(cli.trainer.logged_metrics["train/skipped_steps"]) == 1.0


def test_a_diverging_run_stops_naming_the_steps_and_the_last_checkpoint(tmp_path, shared_dir, capsys):
    with pytest.raises(SystemExit) as done:
        main(tiny_run(tmp_path, shared_dir, "pretrain", CORPUS, 60, [*QUIET, "--model.learning_rate", "1000",
                                                                     "--model.nonfinite_step_limit", "3"]))
    assert done.value.code == 1
    err = capsys.readouterr().err
    assert "training diverged" in err and "3 in a row" in err
    last = tmp_path / "ckpt" / "last.ckpt"
    assert f"--ckpt_path {last}" in err
    saved = list((tmp_path / "ckpt").glob("*.ckpt"))
    assert last in saved
    for path in saved:
        state = torch.load(path, weights_only=True)["state_dict"]
        assert nonfinite_tensors(state.items()) == [], path


class PoisonWeights(RecordBatches):
    """Write NaN into a weight after optimizer step ``at_step`` (what an overflowing update would leave)."""

    def __init__(self, at_step: int) -> None:
        super().__init__()
        self.at_step = at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            with torch.no_grad():
                pl_module.model.lm_head.weight[0, 0] = math.nan


def test_nan_weights_are_never_saved_over_a_good_checkpoint(tmp_path, shared_dir):
    with pytest.raises(TrainingStopped, match="weights became NaN/inf by step 4") as stopped:
        fit(tiny_run(tmp_path, shared_dir, "pretrain", CORPUS, 8, QUIET), PoisonWeights(at_step=3))
    assert stopped.value.exit_code == 1
    last = tmp_path / "ckpt" / "last.ckpt"
    assert f"Last good checkpoint: {last}" in str(stopped.value)
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 2  # the step-4 save was refused; step 2's checkpoint is kept
    assert nonfinite_tensors(saved["state_dict"].items()) == []
