"""Checkpoint folders of the sharded strategies open like the file a single-device run writes."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp

from helpers import RecordBatches, fit, logits, random_adapted_model, random_model, tiny_run, write_stage_checkpoint
from minimind_pl.checkpoints import load_model, open_checkpoint
from minimind_pl.checkpoints.adapters import adapter_record
from minimind_pl.errors import UserError
from minimind_pl.lora import LoRAConfig, lora_state_dict


def fsdp_sharded_folder(checkpoint_file, folder):
    """The folder Lightning's FSDP strategy writes with ``state_dict_type="sharded"``: the weights (and optimizer
    states) as torch.distributed.checkpoint shards, everything else in ``meta.pt``."""
    raw = torch.load(checkpoint_file, map_location="cpu", weights_only=True)
    shards = {"model": raw.pop("state_dict")}
    shards.update({f"optimizer_{i}": state for i, state in enumerate(raw.pop("optimizer_states", []))})
    dcp.save(shards, checkpoint_id=folder, no_dist=True)
    torch.save(raw, folder / "meta.pt")
    return folder


def test_an_fsdp_sharded_folder_opens_as_its_stage_checkpoint(tmp_path, shared_dir):
    fit(tiny_run(tmp_path, shared_dir, "pretrain", "pretrain_real.jsonl", 2,
                 ["--trainer.enable_progress_bar", "false"]), RecordBatches())
    whole = tmp_path / "ckpt" / "last.ckpt"
    folder = fsdp_sharded_folder(whole, tmp_path / "sharded.ckpt")
    a, b = open_checkpoint(str(whole)), open_checkpoint(str(folder))
    assert a.weights.keys() == b.weights.keys() and all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
    assert (b.model_config, b.stage, b.tokenizer_dir, b.tokenizer_fingerprint) == (
        a.model_config, a.stage, a.tokenizer_dir, a.tokenizer_fingerprint)
    ids = torch.randint(3, 6400, (1, 12))
    torch.testing.assert_close(logits(load_model(folder, device="cpu"), ids), logits(load_model(whole, device="cpu"), ids))


def test_a_deepspeed_folder_without_deepspeed_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed.utils.zero_to_fp32", None)  # as where the extra is not installed
    folder = tmp_path / "ds.ckpt"
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "latest").write_text("checkpoint")
    with pytest.raises(UserError, match=r'DeepSpeed checkpoint folder.*pip install -e "\.\[deepspeed\]"'):
        open_checkpoint(str(folder))


def test_a_sharded_lora_folder_is_accepted_as_lora_and_opens_its_base(tmp_path, tokenizer_dir):
    base = write_stage_checkpoint(random_model(), tmp_path / "base.ckpt", tokenizer_dir)
    lora_config = LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "down_proj"))
    adapted = random_adapted_model(lora_config)
    whole = tmp_path / "lora.ckpt"  # the layout of a LoRA stage checkpoint: adapters only, settings, base
    torch.save({"state_dict": {f"model.{k}": v for k, v in lora_state_dict(adapted).items()},
                "model_config": adapted.config.to_dict(), "stage": "LoRA", **adapter_record(lora_config, str(base))},
               whole)
    folder = fsdp_sharded_folder(whole, tmp_path / "lora_sharded.ckpt")
    ids = torch.randint(3, 6400, (1, 12))
    expected = logits(load_model(base, device="cpu", lora=whole), ids)
    assert not torch.allclose(expected, logits(load_model(base, device="cpu"), ids))  # the adapters change the output
    torch.testing.assert_close(logits(load_model(base, device="cpu", lora=folder), ids), expected)
    torch.testing.assert_close(logits(load_model(folder, device="cpu"), ids), expected)  # its recorded base
    with pytest.raises(UserError, match="is a folder but not a checkpoint folder"):
        open_checkpoint(base, lora=tmp_path)
