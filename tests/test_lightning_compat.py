"""Every private Lightning name the package uses (``lightning_compat``) still exists and means what we rely on.

A failure names the installed Lightning version: the name moved or changed meaning in that release, and
``lightning_compat`` (or the version range in setup.cfg) must follow.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import SingleDeviceStrategy

from minimind_pl.lightning_compat import (LIGHTNING_VERSION, ResumingLightningCLI, configured_checkpoint_io,
                                          every_n_train_steps, has_trainer, is_local_path, should_accumulate)

BROKEN = f"Lightning {LIGHTNING_VERSION}:"


class Linear(L.LightningModule):
    """The smallest trainable module: one linear layer on random rows."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(5, 4), batch_size=1)


class RecordSteps(Callback):
    """After every batch: what ``should_accumulate`` answered, whether the optimizer stepped, ``has_trainer``."""

    def __init__(self) -> None:
        self.accumulating: list[bool] = []
        self.stepped: list[bool] = []
        self.attached: list[bool] = []
        self._step_before = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step_before = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.accumulating.append(should_accumulate(trainer))
        self.stepped.append(trainer.global_step > self._step_before)
        self.attached.append(has_trainer(pl_module))


@pytest.fixture(scope="module")
def tiny_fit(tmp_path_factory) -> tuple[RecordSteps, Path]:
    """5 batches of one row, gradients accumulated over 2 (steps after batches 2, 4 and the last one, 5),
    a checkpoint every 2 optimizer steps."""
    folder = tmp_path_factory.mktemp("compat")
    recorder = RecordSteps()
    checkpoints = ModelCheckpoint(dirpath=folder, every_n_train_steps=2, save_top_k=-1, filename="{step}")
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, accumulate_grad_batches=2, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder, checkpoints])
    trainer.fit(Linear())
    return recorder, folder


def test_should_accumulate_inside_a_window_and_not_after_the_step(tiny_fit):
    recorder, _ = tiny_fit
    assert recorder.stepped == [False, True, False, True, True], f"{BROKEN} the tiny fit stepped unexpectedly"
    assert recorder.accumulating == [not s for s in recorder.stepped], (
        f"{BROKEN} fit_loop._should_accumulate() no longer says whether the batch that just ended was inside an "
        f"accumulation window (got {recorder.accumulating} for steps {recorder.stepped})")


def test_every_n_train_steps_is_the_interval_modelcheckpoint_saves_at(tiny_fit):
    _, folder = tiny_fit
    assert every_n_train_steps(ModelCheckpoint(every_n_train_steps=2)) == 2, (
        f"{BROKEN} ModelCheckpoint no longer keeps every_n_train_steps as _every_n_train_steps")
    assert every_n_train_steps(ModelCheckpoint()) == 0
    assert sorted(p.name for p in folder.glob("*.ckpt")) == ["step=2.ckpt"], f"{BROKEN} saving by steps changed"


def test_has_trainer_before_and_during_a_fit(tiny_fit):
    recorder, _ = tiny_fit
    assert not has_trainer(Linear()), f"{BROKEN} LightningModule._trainer is set without a Trainer"
    assert all(recorder.attached), f"{BROKEN} LightningModule._trainer is not the Trainer during fit"


def test_is_local_path():
    assert is_local_path("/tmp/last.ckpt") and is_local_path(Path("ckpt/last.ckpt"))
    assert not is_local_path("s3://bucket/last.ckpt"), f"{BROKEN} _is_local_file_protocol changed meaning"


def test_configured_checkpoint_io_is_the_one_a_strategy_was_given():
    io = TorchCheckpointIO()
    assert configured_checkpoint_io(SingleDeviceStrategy("cpu", checkpoint_io=io)) is io, (
        f"{BROKEN} a strategy no longer keeps its checkpoint_io argument as _checkpoint_io")
    assert configured_checkpoint_io(SingleDeviceStrategy("cpu")) is None, (
        f"{BROKEN} _checkpoint_io is set although no CheckpointIO was given")
    assert configured_checkpoint_io("ddp") is None


def method_calls(function, name: str) -> bool:
    """Whether the source of ``function`` calls ``self.<name>(...)``."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    return any(isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == name
               for node in ast.walk(tree))


def test_the_lightningcli_steps_we_replace_exist_and_are_called():
    trainer_step = inspect.signature(LightningCLI._instantiate_trainer)
    assert list(trainer_step.parameters) == ["self", "config", "callbacks"], (
        f"{BROKEN} LightningCLI._instantiate_trainer{trainer_step} is not the method ResumingLightningCLI overrides")
    assert method_calls(LightningCLI.instantiate_trainer, "_instantiate_trainer"), (
        f"{BROKEN} LightningCLI.instantiate_trainer no longer builds the Trainer through _instantiate_trainer")
    assert method_calls(LightningCLI.__init__, "before_instantiate_classes"), (
        f"{BROKEN} LightningCLI no longer calls before_instantiate_classes, where the resume check runs")


def test_lightningcli_reads_checkpoint_arguments_only_where_we_switch_it_off():
    """LightningCLI 2.5+ replaces the model's arguments with a checkpoint's in ``_parse_ckpt_path`` (2.4 does
    not); a resumed run must keep its own, so no other method may do that."""
    source = Path(inspect.getsourcefile(LightningCLI)).read_text(encoding="utf-8")
    readers = {node.name for node in ast.walk(ast.parse(source)) if isinstance(node, ast.FunctionDef)
               and "hyper_parameters" in ast.get_source_segment(source, node)}
    assert readers <= {"_parse_ckpt_path"}, (
        f"{BROKEN} LightningCLI reads checkpoint arguments in {sorted(readers)}: ResumingLightningCLI must switch "
        "that off too")
    if hasattr(LightningCLI, "_parse_ckpt_path"):
        assert list(inspect.signature(LightningCLI._parse_ckpt_path).parameters) == ["self"]
        assert method_calls(LightningCLI.__init__, "_parse_ckpt_path"), (
            f"{BROKEN} LightningCLI defines _parse_ckpt_path but no longer calls it where it did")
    assert ResumingLightningCLI._parse_ckpt_path is not getattr(LightningCLI, "_parse_ckpt_path", None)
