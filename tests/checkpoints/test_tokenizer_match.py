"""Checkpoints record the vocabulary fingerprint of their tokenizer: a model is never silently paired with a
tokenizer whose ids mean other text (a tokenizer retrained into the same folder, another --tokenizer)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from helpers import RecordBatches, fit, tiny_run
from minimind_pl.cli import main
from minimind_pl.data.formats import jsonl_texts
from minimind_pl.tokenizer import Tokenizer, train_tokenizer


def test_the_fingerprint_follows_the_ids_not_the_formatting_or_the_chat_template(tmp_path, tokenizer_dir):
    original = Tokenizer.from_file(tokenizer_dir)
    copy = tmp_path / "copy"
    copy.mkdir()
    data = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    (copy / "tokenizer.json").write_text(json.dumps(data, indent=4), encoding="utf-8")
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = "{{ messages }}"
    (copy / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    assert Tokenizer.from_file(copy).vocabulary_fingerprint == original.vocabulary_fingerprint
    data["model"]["vocab"] = {k: (v + 1) % len(data["model"]["vocab"]) for k, v in data["model"]["vocab"].items()}
    (copy / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    assert Tokenizer.from_file(copy).vocabulary_fingerprint != original.vocabulary_fingerprint


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shared_dir):
    """A 2-step pretrain run on a tokenizer of its own; returns (run folder, its last.ckpt, its tokenizer folder)."""
    root = tmp_path_factory.mktemp("fingerprint")
    tokenizer = root / "tokenizer"
    train_tokenizer(jsonl_texts([shared_dir / "corpus" / "pretrain_real.jsonl"]), 400, tokenizer, show_progress=False)
    fit(tiny_run(root, shared_dir, "pretrain", "pretrain_real.jsonl", 2,
                 ["--data.tokenizer", str(tokenizer), "--model.config.vocab_size", "400",
                  "--trainer.enable_progress_bar", "false"]), RecordBatches())
    last = root / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=True)["tokenizer_fingerprint"] == Tokenizer.from_file(tokenizer).vocabulary_fingerprint
    return root, last, tokenizer


@pytest.fixture
def retrained(tmp_path, shared_dir, trained):
    """Retrain the run's tokenizer in place for one test, then put the original back."""
    root, last, tokenizer = trained
    shutil.copytree(tokenizer, tmp_path / "original")
    train_tokenizer(jsonl_texts([shared_dir / "corpus" / "sft_real.jsonl"]), 400, tokenizer, show_progress=False)
    yield last, tokenizer
    shutil.rmtree(tokenizer)
    shutil.copytree(tmp_path / "original", tokenizer)


def test_tools_refuse_a_tokenizer_retrained_in_place_unless_allowed(retrained, capsys):
    last, tokenizer = retrained
    with pytest.raises(SystemExit) as done:
        main(["chat", "--ckpt", str(last), "--prompt", "hi", "--max_new_tokens", "2"])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert f"{last} was trained with another tokenizer than the one in {tokenizer}" in err
    assert "--allow_tokenizer_mismatch true" in err
    with pytest.warns(UserWarning, match="another tokenizer"):
        main(["chat", "--ckpt", str(last), "--prompt", "hi", "--max_new_tokens", "2",
              "--allow_tokenizer_mismatch", "true"])


def test_the_recorded_tokenizer_still_loads_and_another_is_refused(trained, tokenizer_dir, capsys):
    _, last, _ = trained
    main(["chat", "--ckpt", str(last), "--prompt", "hi", "--max_new_tokens", "2"])
    with pytest.raises(SystemExit):
        main(["eval", "--ckpt", str(last), "--tokenizer", str(tokenizer_dir),
              "--data", str(tokenizer_dir.parent / "corpus" / "pretrain_real_val.jsonl")])
    assert "was trained with another tokenizer" in capsys.readouterr().err


def test_starting_weights_from_another_tokenizer_are_refused(tmp_path, shared_dir, trained, capsys):
    _, last, _ = trained
    with pytest.raises(SystemExit) as done:  # tiny_run trains on MiniMind's tokenizer
        main(tiny_run(tmp_path, shared_dir, "sft", "sft_real.jsonl", 2, ["--model.init_weights", str(last)]))
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert f"--model.init_weights {last} was trained with another tokenizer" in err
    assert "--model.allow_tokenizer_mismatch true" in err


def test_resuming_with_a_tokenizer_retrained_in_place_is_refused(retrained, tmp_path, shared_dir, capsys):
    last, tokenizer = retrained
    with pytest.raises(SystemExit) as done:
        main(tiny_run(last.parent.parent, shared_dir, "pretrain", "pretrain_real.jsonl", 4, [
            "--data.tokenizer", str(tokenizer), "--model.config.vocab_size", "400", "--ckpt_path", str(last),
            "--data.cache_dir", str(tmp_path / "cache"), "--trainer.enable_progress_bar", "false"]))
    assert done.value.code == 2
    assert "the checkpoint to resume (--ckpt_path) was trained with another tokenizer" in capsys.readouterr().err
