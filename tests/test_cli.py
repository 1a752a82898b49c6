"""End to end through ``python main.py ...``: runs learn, log, and resume exactly (shipped configs: test_configs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from minimind_pl.cli import main, run_lightning, usage
from minimind_pl.stages import Stage

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = [
    "--model.config.hidden_size", "64", "--model.config.num_hidden_layers", "2",
    "--model.config.num_attention_heads", "4", "--model.config.num_key_value_heads", "2",
    "--model.config.max_position_embeddings", "256", "--model.config.vocab_size", "6400",
]


def tiny_run(tmp_path: Path, shared_dir: Path, stage: str, data: str, max_steps: int, extra=()) -> list[str]:
    """Arguments of a tiny CPU fit on a shared corpus file, writing everything under ``tmp_path``."""
    config = REPO / "configs" / "minimind3" / f"{stage}.yaml"
    callbacks = ('[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": '
                 f'{{"dirpath": "{tmp_path / "ckpt"}", "save_last": true, "every_n_train_steps": 2}}}}]')
    return ["fit", "--config", str(config), *TINY_MODEL,
            "--model.init_weights", "null", "--model.learning_rate", "3e-3",
            "--data.train_path", str(shared_dir / "corpus" / data), "--data.val_path", "null",
            "--data.val_fraction", "0.05", "--data.tokenizer", str(shared_dir / "minimind"),
            "--data.seq_len", "64", "--data.batch_size", "4", "--data.num_workers", "0",
            "--data.cache_dir", str(tmp_path / "cache"),
            "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.devices", "1",
            "--trainer.accumulate_grad_batches", "1", "--trainer.max_epochs", "100",
            "--trainer.max_steps", str(max_steps), "--trainer.log_every_n_steps", "2",
            "--trainer.val_check_interval", str(max_steps), "--trainer.limit_val_batches", "2",
            "--trainer.enable_model_summary", "false",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
            "--trainer.callbacks", callbacks, *extra]


def test_help_lists_every_command(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for command in ("fit", "validate", "demo", "tokenizer", "chat"):
        assert f"  {command} " in out
    assert usage() in out


class RecordBatches(Callback):
    """Remember a fingerprint of every training batch, in order; optionally stop the run early."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.seen: list[int] = []
        self.stop_after = stop_after

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append(int(batch["input_ids"].sum()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.stop_after is not None and trainer.global_step >= self.stop_after:
            trainer.should_stop = True  # an interruption: the run ends after its step-4 checkpoint


def fit(args: list[str], recorder: RecordBatches):
    """Run a training command with a batch recorder beside the configured callbacks."""
    return run_lightning(args, extra_callbacks=[recorder])


def test_pretrain_loss_falls_and_logs_to_tensorboard(tmp_path, shared_dir):
    cli = main(tiny_run(tmp_path, shared_dir, "pretrain", "pretrain_real.jsonl", max_steps=30))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(cli.trainer.logger.log_dir))).Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "val/loss", "val/ppl"):
        assert tag in scalars, f"{tag} missing from {sorted(scalars)}"
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
