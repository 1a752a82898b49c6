"""End to end through ``python main.py ...``: runs learn, log, and resume exactly (shipped configs: test_configs.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO, RecordBatches, fit, random_model, tiny_run, write_stage_checkpoint

from minimind_pl.cli import main, usage
from minimind_pl.stages import Stage

def test_help_lists_every_command(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for command in ("fit", "validate", "demo", "tokenizer", "chat"):
        assert f"  {command} " in out
    assert usage() in out


# Runs ``main.py``'s arguments in a fresh interpreter and says last whether Lightning was imported.
LOADS_LIGHTNING = """
import sys
from minimind_pl.cli import main
try:
    main(sys.argv[1:])
except SystemExit as stop:
    assert not stop.code, stop.code
print("\\nlightning imported:", "lightning" in sys.modules)
"""


@pytest.mark.parametrize("args", [
    ["--help"], ["chat", "--help"], ["serve", "--help"], ["export", "--help"],
    ["generate", "--help"],
    ["eval", "--help"],
    ["tokenizer", "--help"],
    ["data", "stats", "--help"],
], ids=lambda args: " ".join(args))
def test_commands_that_do_not_train_start_without_lightning(args):
    """Importing Lightning takes seconds: only the training commands may (the help of each command imports it)."""
    out = subprocess.run([sys.executable, "-c", LOADS_LIGHTNING, *args], cwd=REPO, capture_output=True, text=True,
                         check=True, timeout=300).stdout
    assert out.splitlines()[-1] == "lightning imported: False"


def test_chat_answers_its_first_prompt_without_lightning(tmp_path, shared_dir):
    ckpt = write_stage_checkpoint(random_model(), tmp_path / "tiny.ckpt", shared_dir / "minimind", stage="SFT")
    run = subprocess.run([sys.executable, "-c", LOADS_LIGHTNING, "chat", "--ckpt", str(ckpt), "--max_new_tokens",
                          "2", "--device", "cpu"], input="你好\n", cwd=REPO, capture_output=True, text=True,
                         check=True, timeout=300)
    assert "model>" in run.stdout and run.stdout.splitlines()[-1] == "lightning imported: False"


def test_training_commands_still_import_from_cli():
    """``from minimind_pl.cli import run_lightning`` (and MiniMindCLI) keeps working: it loads training_cli."""
    from minimind_pl.cli import MiniMindCLI, run_lightning, with_base_configs
    from minimind_pl import training_cli

    assert (MiniMindCLI, run_lightning, with_base_configs) == (
        training_cli.MiniMindCLI, training_cli.run_lightning, training_cli.with_base_configs)


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


MINIMIND2 = ["--model.config.qk_norm", "false", "--model.config.rms_norm_eps", "1e-5",
             "--model.config.num_attention_heads", "8", "--model.config.num_key_value_heads", "2",
             "--model.config.intermediate_size", "192"]  # MiniMind2's attention at 64 hidden (8 heads of 8)


def test_minimind2_moe_pretrain_runs_with_shared_expert_and_sequence_balance(tmp_path, shared_dir):
    moe = ["--model.config.use_moe", "true", "--model.config.num_experts", "4", "--model.config.num_experts_per_tok",
           "2", "--model.config.n_shared_experts", "1", "--model.config.aux_loss_alpha", "0.01",
           "--model.config.seq_aux", "true"]
    cli = main(tiny_run(tmp_path, shared_dir, "pretrain", "pretrain_real.jsonl", max_steps=3, extra=[*MINIMIND2, *moe]))
    model = cli.model.model
    assert cli.trainer.global_step == 3 and len(model.model.layers[0].mlp.shared_experts) == 1
    assert not any("q_norm" in name for name in model.state_dict())
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(cli.trainer.logger.log_dir))).Reload()
    aux = [e.value for e in events.Scalars("train/aux_loss")]
    losses = [e.value for e in events.Scalars("train/loss")]
    assert aux and all(0 < a < 1 for a in aux) and all(torch.isfinite(torch.tensor(losses)))
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["model_config"]
    assert (saved["aux_loss_alpha"], saved["router_aux_loss_coef"], saved["seq_aux"]) == (0.01, 0.005, True)


def test_minimind2_sft_starts_from_a_minimind2_pth(tmp_path, shared_dir):
    """--model.init_weights takes MiniMind2's out/*.pth (config read off the shapes) for a qk_norm=false SFT run."""
    from helpers import minimind_state_dict
    from minimind_pl.config import ModelConfig

    config = ModelConfig.from_preset("minimind2-small", hidden_size=64, num_hidden_layers=2, intermediate_size=192)
    start = minimind_state_dict(config, seed=3)
    torch.save(start, tmp_path / "pretrain_64.pth")
    args = tiny_run(tmp_path, shared_dir, "sft", "sft_real.jsonl", max_steps=2, extra=MINIMIND2)
    args[args.index("--model.init_weights") + 1] = str(tmp_path / "pretrain_64.pth")
    cli = main(args)
    assert cli.trainer.global_step == 2 and not cli.model.config.qk_norm
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])
    trained = cli.model.model.state_dict()["model.layers.0.mlp.up_proj.weight"]
    assert not torch.equal(trained, start["model.layers.0.mlp.up_proj.weight"].float())  # it learned
    assert (trained - start["model.layers.0.mlp.up_proj.weight"].float()).abs().max() < 0.05  # from those weights


@pytest.mark.parametrize("command", ["chat", "eval", "generate", "serve"])
def test_inference_rope_scaling_switch_reaches_the_model(tmp_path, shared_dir, monkeypatch, command):
    """``--inference_rope_scaling true`` builds the model with YaRN (MiniMind's settings), whatever the checkpoint
    recorded; without it the recorded setting stays. YaRN applies beyond 2048 positions, so the model is longer."""
    from helpers import random_model, with_yarn, write_stage_checkpoint

    from minimind_pl.checkpoints.loading import Checkpoint

    model = random_model(max_position_embeddings=32768)
    ckpt = write_stage_checkpoint(model, tmp_path / "tiny.ckpt", shared_dir / "minimind", stage="SFT")
    built = []
    build = Checkpoint.build_model
    monkeypatch.setattr(Checkpoint, "build_model",
                        lambda self, *a, **k: built.append(build(self, *a, **k)) or built[-1])
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "你好"}\n', encoding="utf-8")
    args = {"chat": ["--prompt", "你好", "--max_new_tokens", "2"], "eval": ["--data", str(prompts)],
            "generate": ["--data", str(prompts), "--out", str(tmp_path / "out.jsonl"), "--max_new_tokens", "2"],
            "serve": ["--port", "0"]}[command]
    if command == "serve":  # bind nothing: the model is what is checked
        from minimind_pl.commands.serve import app

        monkeypatch.setattr(app, "make_server", lambda *a, **k: type("Stub", (), {
            "server_address": ("127.0.0.1", 0), "serve_forever": lambda s: None, "server_close": lambda s: None})())
    if command == "eval":  # eval reads text lines
        prompts.write_text('{"text": "你好，世界"}\n', encoding="utf-8")
    for run, switch in enumerate((["--inference_rope_scaling", "true"], [])):
        if command == "generate":  # a new answer file each time (an answered prompt is not generated again)
            args[3] = str(tmp_path / f"out{run}.jsonl")
        main([command, "--ckpt", str(ckpt), "--device", "cpu", *args, *switch])
    x = torch.arange(3000)[None] % 6000
    scaled, plain = (m.model.rotary(x)[0] for m in built)
    assert built[0].config.inference_rope_scaling and not built[1].config.inference_rope_scaling
    assert torch.equal(scaled, with_yarn(model).model.rotary(x)[0]) and not torch.allclose(scaled, plain)


def test_repeatable_list_arguments_become_jsonargparse_appends():
    from minimind_pl.cli import repeated_as_appended

    assert repeated_as_appended(["--image", "a.png", "--image=b c.jpg", "--images", "x", "--prompt", "--image"],
                                ("image",)) == ["--image+", "a.png", "--image+", "b c.jpg", "--images", "x",
                                                "--prompt", "--image+"]
