"""open_checkpoint / load_model: every format gives the same model, and each file is read exactly once."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

import minimind_pl.checkpoints.loading as loading
from minimind_pl import load_model
from minimind_pl.checkpoints import open_checkpoint, save_hf_directory, save_lora, save_minimind
from minimind_pl.lora import LoRAConfig, merge_lora
from minimind_pl.tokenizer import Tokenizer

from helpers import logits, random_adapted_model, random_model, write_stage_checkpoint

IDS = torch.tensor([[1, 40, 41, 42, 43, 2]])


@pytest.fixture
def lora_run(tmp_path, tokenizer_dir):
    """A base stage checkpoint and a LoRA adapter file (non-zero B, alpha != rank) that records it."""
    base = random_model()
    base_path = write_stage_checkpoint(base, tmp_path / "sft.ckpt", tokenizer_dir)
    adapted = random_adapted_model(LoRAConfig(rank=4, alpha=12.0, targets=("q_proj", "down_proj")))
    adapter_path = save_lora(adapted, tmp_path / "adapter.pt", base=str(base_path))
    return base_path, adapter_path, adapted


def count_reads(monkeypatch) -> Counter:
    """Count ``read_torch_file`` calls per file name."""
    reads: Counter = Counter()
    real = loading.read_torch_file

    def counting(path, *args, **kwargs):
        reads[Path(path).name] += 1
        return real(path, *args, **kwargs)

    monkeypatch.setattr(loading, "read_torch_file", counting)
    monkeypatch.setattr("minimind_pl.checkpoints.adapters.read_torch_file", counting)
    return reads


def test_lora_run_opens_each_file_once_with_weights_config_tokenizer_and_adapter(lora_run, tokenizer_dir, monkeypatch):
    base_path, adapter_path, adapted = lora_run
    reads = count_reads(monkeypatch)
    checkpoint = open_checkpoint(adapter_path)  # the adapter finds its base by itself
    assert reads == Counter({"adapter.pt": 1, "sft.ckpt": 1})
    assert checkpoint.model_config == adapted.config.to_dict()
    assert checkpoint.tokenizer_dir == str(tokenizer_dir)
    assert checkpoint.adapter.config.alpha == 12.0 and checkpoint.adapter_path == str(adapter_path)
    torch.testing.assert_close(logits(checkpoint.build_model(), IDS), logits(adapted, IDS), atol=1e-5, rtol=0)
    merged = checkpoint.build_model(merge=True)
    torch.testing.assert_close(logits(merged, IDS), logits(adapted, IDS), atol=1e-5, rtol=0)
    assert set(merged.state_dict()) == set(random_model().state_dict())  # no adapter names left


def test_base_plus_lora_argument_equals_the_adapter_alone(lora_run, monkeypatch):
    base_path, adapter_path, adapted = lora_run
    reads = count_reads(monkeypatch)
    model = load_model(str(base_path), device="cpu", lora=str(adapter_path))
    assert reads == Counter({"adapter.pt": 1, "sft.ckpt": 1})
    assert not model.training
    torch.testing.assert_close(logits(model, IDS), logits(adapted, IDS), atol=1e-5, rtol=0)


def test_every_format_loads_the_same_model(tmp_path, tokenizer_dir):
    model = random_model()
    stage = write_stage_checkpoint(model, tmp_path / "pretrain.ckpt", tokenizer_dir)
    pth = save_minimind(model.state_dict(), tmp_path / "full.pth", torch.float32)
    hf = save_hf_directory(model.state_dict(), model.config, Tokenizer.from_file(tokenizer_dir), tmp_path / "hf",
                           "float32")
    expected = logits(model, IDS)
    for path, preset in ((stage, None), (pth, "debug"), (hf, None)):
        loaded = load_model(str(path), preset=preset, device="cpu")
        torch.testing.assert_close(logits(loaded, IDS), expected, atol=1e-6, rtol=0)
    assert open_checkpoint(stage).stage == "Pretrain" and open_checkpoint(hf).tokenizer_dir == str(hf)
    assert open_checkpoint(pth).model_config is None  # a .pth records no config


def test_lora_given_twice_and_missing_tokenizer_are_clear_errors(lora_run, tmp_path):
    _, adapter_path, _ = lora_run
    with pytest.raises(ValueError, match="itself a LoRA checkpoint"):
        open_checkpoint(adapter_path, lora=adapter_path)
    pth = save_minimind(random_model().state_dict(), tmp_path / "out" / "x.pth")
    with pytest.raises(ValueError, match="no tokenizer is recorded") as error:
        open_checkpoint(pth).tokenizer()
    assert str(tmp_path / "out") in str(error.value) and str(tmp_path / "model") in str(error.value)  # where it looked
    with pytest.raises(FileNotFoundError, match="not found"):
        open_checkpoint(tmp_path / "missing.ckpt")


def test_a_minimind_pth_finds_the_tokenizer_in_model_beside_out(tmp_path, tokenizer_dir):
    """MiniMind's repository keeps ``out/full_sft_512.pth`` and its tokenizer in ``model/``: ``chat --ckpt
    out/full_sft_512.pth`` works there as the README shows it, without --tokenizer; a tokenizer in the
    checkpoint's own folder comes first."""
    pth = save_minimind(random_model().state_dict(), tmp_path / "out" / "full_sft_512.pth")
    shutil.copytree(tokenizer_dir, tmp_path / "model")
    found = open_checkpoint(pth).tokenizer()
    assert found.vocabulary_fingerprint == Tokenizer.from_file(tokenizer_dir).vocabulary_fingerprint
    assert open_checkpoint(pth).tokenizer_beside() == str(tmp_path / "model")
    shutil.copytree(tokenizer_dir, tmp_path / "out", dirs_exist_ok=True)
    assert open_checkpoint(pth).tokenizer_beside() == str(tmp_path / "out")


@pytest.mark.parametrize("place", ["model/minimind_tokenizer", "out/model", "out/model/minimind_tokenizer"])
def test_a_minimind_pth_finds_the_tokenizer_where_older_minimind_kept_it(tmp_path, tokenizer_dir, place):
    """MiniMind's releases before MiniMind-3 kept the tokenizer in ``model/minimind_tokenizer/``; a downloaded
    ``model/`` folder may also sit beside the weights inside ``out/``."""
    pth = save_minimind(random_model().state_dict(), tmp_path / "out" / "full_sft_512.pth")
    shutil.copytree(tokenizer_dir, tmp_path / place)
    assert open_checkpoint(pth).tokenizer_beside() == str(tmp_path / place)


def test_merge_lora_of_the_built_model_matches_build_with_merge(lora_run):
    _, adapter_path, _ = lora_run
    checkpoint = open_checkpoint(adapter_path)
    torch.testing.assert_close(logits(merge_lora(checkpoint.build_model()), IDS),
                               logits(checkpoint.build_model(merge=True), IDS))
