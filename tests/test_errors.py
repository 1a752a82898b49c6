"""User mistakes end in one ``error:`` line (what, where, how to fix) and a non-zero exit, without a traceback;
``MINIMIND_DEBUG=1`` shows it. Errors raised while LightningCLI builds a stage or DataModule are not buried under
jsonargparse's "Does not validate against any of the Union subtypes"."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import random_model, run_python, tiny_run, write_stage_checkpoint
from minimind_pl.cli import main
from minimind_pl.errors import UserError, reported_cause

CORPUS = "pretrain_real.jsonl"


def fails(args: list[str], capsys) -> str:
    """Run ``python main.py <args>`` in this process; it must exit 2. Returns stderr."""
    with pytest.raises(SystemExit) as done:
        main(args)
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Union subtypes" not in err
    return err


def test_the_cause_is_found_under_the_errors_that_wrap_it():
    try:
        try:
            raise UserError("the real problem")
        except UserError as inner:
            raise ValueError("Does not validate against any of the Union subtypes") from inner
    except ValueError as outer:
        assert str(reported_cause(outer)) == "the real problem"
    assert reported_cause(RuntimeError("a bug")) is None
    try:
        try:
            raise UserError("handled")
        except UserError:
            raise RuntimeError("a bug while handling it")  # an implicit context: the bug must show
    except RuntimeError as bug:
        assert reported_cause(bug) is None


def test_a_missing_tokenizer_folder_is_one_line_in_a_real_process(tmp_path, shared_dir):
    args = ["main.py", *tiny_run(tmp_path, shared_dir, "pretrain", CORPUS, 2, ["--data.tokenizer", str(tmp_path / "nope")])]
    done = run_python(args)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "Union subtypes" not in done.stderr
    assert f"error: tokenizer directory not found: {tmp_path / 'nope'}" in done.stderr
    debug = run_python(args, env={"MINIMIND_DEBUG": "1"})
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_a_tokenizer_larger_than_the_vocabulary(tmp_path, shared_dir, capsys):
    err = fails(tiny_run(tmp_path, shared_dir, "pretrain", CORPUS, 2, ["--model.config.vocab_size", "512"]), capsys)
    assert "has 6400 tokens but the model's vocab_size is 512; set --model.config.vocab_size 6400" in err


def test_rows_longer_than_the_context(tmp_path, shared_dir, capsys):
    err = fails(tiny_run(tmp_path, shared_dir, "pretrain", CORPUS, 2, ["--data.seq_len", "512"]), capsys)
    assert "seq_len 512 exceeds the model's max_position_embeddings 256" in err and "--data.seq_len" in err


def test_a_tokenizer_folder_without_its_config(tmp_path, shared_dir, capsys):
    broken = tmp_path / "tok"
    broken.mkdir()
    (broken / "tokenizer.json").write_bytes((shared_dir / "minimind" / "tokenizer.json").read_bytes())
    err = fails(tiny_run(tmp_path, shared_dir, "pretrain", CORPUS, 2, ["--data.tokenizer", str(broken)]), capsys)
    assert f"tokenizer file not found: {broken / 'tokenizer_config.json'}" in err


def test_starting_weights_missing_or_of_another_architecture(tmp_path, shared_dir, capsys):
    err = fails(tiny_run(tmp_path, shared_dir, "sft", "sft_real.jsonl", 2,
                         ["--model.init_weights", str(tmp_path / "missing.ckpt")]), capsys)
    assert f"not found: {tmp_path / 'missing.ckpt'}" in err
    other = write_stage_checkpoint(random_model(hidden_size=96, num_attention_heads=4, num_key_value_heads=2),
                                   tmp_path / "other.ckpt", shared_dir / "minimind")
    err = fails(tiny_run(tmp_path, shared_dir, "sft", "sft_real.jsonl", 2, ["--model.init_weights", str(other)]), capsys)
    assert "was trained with another architecture" in err and "hidden_size: 96 != 64" in err and "--model.config." in err


def test_tools_given_a_missing_or_wrong_checkpoint(tmp_path, shared_dir, capsys):
    err = fails(["chat", "--ckpt", str(tmp_path / "missing.ckpt"), "--prompt", "hi"], capsys)
    assert f"not found: {tmp_path / 'missing.ckpt'}" in err
    err = fails(["eval", "--ckpt", str(shared_dir / "corpus" / CORPUS), "--data", str(shared_dir / "corpus" / CORPUS)],
                capsys)
    assert "cannot read checkpoint" in err


def test_a_checkpoint_with_nan_weights_says_so(tmp_path, shared_dir, capsys):
    model = random_model()
    with torch.no_grad():
        model.model.embed_tokens.weight[3, 0] = math.nan  # tied: the head is NaN too
    path = write_stage_checkpoint(model, tmp_path / "diverged.ckpt", shared_dir / "minimind")
    err = fails(["chat", "--ckpt", str(path), "--prompt", "hi"], capsys)
    assert "holds NaN/inf weights (model.embed_tokens.weight" in err and "diverged" in err
    assert "tie_word_embeddings" not in err


def test_a_lora_adapter_on_the_wrong_base(tmp_path, shared_dir, capsys):
    from minimind_pl.checkpoints import save_lora
    from minimind_pl.lora import LoRAConfig, apply_lora

    adapted = random_model()
    apply_lora(adapted, LoRAConfig(rank=2, targets=("q_proj",)))
    adapter = save_lora(adapted, tmp_path / "adapter.pt", base=None)
    other = write_stage_checkpoint(random_model(hidden_size=96, num_attention_heads=4, num_key_value_heads=2),
                                   tmp_path / "other.ckpt", shared_dir / "minimind")
    err = fails(["chat", "--ckpt", str(other), "--lora", str(adapter), "--prompt", "hi"], capsys)
    assert "LoRA adapter" in err and ("another base model" in err or "does not fit" in err)
