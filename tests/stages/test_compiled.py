"""The compiled training path (``--model.compile true``): the same losses as the plain path, no recompiles while
documents move, and checkpoints and tools that see the plain model."""

from __future__ import annotations

from unittest import mock

import torch
import torch._dynamo

from helpers import RecordBatches, fit, tiny_run
from minimind_pl.checkpoints import open_checkpoint
from minimind_pl.stages.compiled import compile_decision, flex_decision

CORPUS = "pretrain_real.jsonl"
QUIET = ["--trainer.enable_progress_bar", "false"]


class RecordLosses(RecordBatches):
    """The training loss of every step, and whether the step ran through the compiled path."""

    def __init__(self) -> None:
        super().__init__()
        self.losses: list[float] = []
        self.compiled: list[bool] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        self.compiled.append(pl_module.compiled is not None)


def run(tmp_path, shared_dir, compile: bool) -> tuple[RecordLosses, object]:
    recorder = RecordLosses()
    args = tiny_run(tmp_path, shared_dir, "pretrain", CORPUS, 4, [*QUIET, "--model.compile", str(compile).lower()])
    return recorder, fit(args, recorder)


def test_compiled_training_gives_the_plain_losses_without_recompiling(tmp_path, shared_dir):
    plain, _ = run(tmp_path / "plain", shared_dir, compile=False)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):  # packed rows whose documents move: one graph
        compiled, cli = run(tmp_path / "compiled", shared_dir, compile=True)
    assert compiled.compiled == [True] * 4 and plain.compiled == [False] * 4
    assert compiled.seen == plain.seen  # the same batches
    torch.testing.assert_close(torch.tensor(compiled.losses), torch.tensor(plain.losses), rtol=1e-4, atol=1e-5)
    assert cli.model.compiled is None  # dropped after fit: tools and a later fit see the plain model
    checkpoint = open_checkpoint(str(tmp_path / "compiled" / "ckpt" / "last.ckpt"))
    assert not any("_orig_mod" in key for key in checkpoint.weights)
    model = checkpoint.build_model()
    assert model.state_dict().keys() == cli.model.model.state_dict().keys()


def test_defaults_compile_and_use_flex_attention_on_cuda_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with mock.patch("minimind_pl.stages.compiled.has_triton", return_value=True):
        assert compile_decision(None, cuda) and not compile_decision(None, cpu)
    with mock.patch("minimind_pl.stages.compiled.has_triton", return_value=False):
        assert not compile_decision(None, cuda)
    assert compile_decision(True, cpu) and not compile_decision(False, cuda)
    assert flex_decision(None, cuda, dropout=0.0) and not flex_decision(None, cuda, dropout=0.1)
    assert not flex_decision(None, cpu, dropout=0.0) and flex_decision(True, cpu, dropout=0.0)
