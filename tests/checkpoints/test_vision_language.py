"""MiniMind-V weights: its .pth files of both generations load (config read off the shapes), the tower comes from
a folder and is never written, a recorded tower is checked by fingerprint, and HF export refuses a VLM."""

from __future__ import annotations

import pytest
import torch

from helpers import minimind_state_dict, tiny_tower_folder
from minimind_pl import load_model
from minimind_pl.commands.export import export_command
from minimind_pl.config import ModelConfig, minimind2_config
from minimind_pl.errors import UserError
from minimind_pl.model import MiniMindForCausalLM
from minimind_pl.vision.tower import load_vision_tower, tower_record
from minimind_pl.vision.vlm import MiniMindVLM

DEBUG = ModelConfig.from_preset("debug")
MINIMIND2 = ModelConfig.from_dict({**DEBUG.to_dict(), **minimind2_config(DEBUG.hidden_size, 2),
                                   "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": DEBUG.hidden_size // 8})


def minimind_v_pth(path, generation: str, tower_width: int = 32, seed: int = 0):
    """A MiniMind-V .pth as its trainers save it: the LM's fp16 state dict plus vision_proj.*, no vision_encoder.*
    (minimind-3v: vision_proj.mlp.{0: LayerNorm, 1: Linear, 3: Linear}; MiniMind2-V: vision_proj.vision_proj.0)."""
    config = DEBUG if generation == "minimind-3v" else MINIMIND2
    sd = minimind_state_dict(config, seed)
    c, g = config.hidden_size, torch.Generator().manual_seed(seed + 1)
    shapes = ({"mlp.0.weight": (tower_width,), "mlp.0.bias": (tower_width,), "mlp.1.weight": (c, tower_width),
               "mlp.1.bias": (c,), "mlp.3.weight": (c, c), "mlp.3.bias": (c,)} if generation == "minimind-3v"
              else {"vision_proj.0.weight": (c, tower_width), "vision_proj.0.bias": (c,)})
    sd.update({f"vision_proj.{k}": (0.1 * torch.randn(s, generator=g) + k.endswith("0.weight")).half()
               for k, s in shapes.items()})
    torch.save(sd, path)
    return sd


@pytest.mark.parametrize("generation,family,token_id,projector", [("minimind-3v", "siglip", 12, "mlp"),
                                                                  ("minimind2-v", "clip", 34, "linear")])
def test_minimind_v_pth_loads_with_its_tower(tmp_path, generation, family, token_id, projector):
    sd = minimind_v_pth(tmp_path / "sft_vlm_768.pth", generation)
    folder = tiny_tower_folder(tmp_path / "tower", family)
    model = load_model(tmp_path / "sft_vlm_768.pth", vision_encoder=folder, device="cpu")
    assert isinstance(model, MiniMindVLM) and model.tower is not None
    v = model.vision_config
    assert (v.projector, v.image_token_id, v.image_hidden_size, v.image_token_len) == (projector, token_id, 32, 16)
    assert model.config.qk_norm == (generation == "minimind-3v")
    loaded = model.state_dict()
    assert set(loaded) == set(sd) and all(torch.equal(loaded[k], sd[k].float()) for k in sd)
    ids = torch.tensor([[1, 5] + [token_id] * 16 + [7, 8]])
    pixels = torch.randn(1, 1, 3, 32, 32)
    with torch.no_grad():  # the image reaches the logits through the loaded projector and tower
        assert (model(ids, pixel_values=pixels).logits - model(ids).logits).abs().max() > 1e-3


def test_without_a_tower_a_vlm_reads_text_and_a_text_model_refuses_one(tmp_path):
    minimind_v_pth(tmp_path / "vlm.pth", "minimind-3v")
    model = load_model(tmp_path / "vlm.pth", device="cpu")
    assert isinstance(model, MiniMindVLM) and model.tower is None
    assert model.vision_config.image_token_len == 64  # the preset's, with no tower to count patches
    torch.save(minimind_state_dict(DEBUG), tmp_path / "text.pth")
    assert type(load_model(tmp_path / "text.pth", device="cpu")) is MiniMindForCausalLM
    with pytest.raises(UserError, match="is a text model"):
        load_model(tmp_path / "text.pth", vision_encoder=tiny_tower_folder(tmp_path / "tower"), device="cpu")


def test_a_tower_of_another_width_is_refused(tmp_path):
    minimind_v_pth(tmp_path / "vlm.pth", "minimind-3v", tower_width=32)
    folder = tiny_tower_folder(tmp_path / "tower", hidden_size=16)
    with pytest.raises(UserError, match="16-wide features, the projector reads 32"):
        load_model(tmp_path / "vlm.pth", vision_encoder=folder, device="cpu")


def test_export_minimind_writes_minimind_v_pth_and_hf_export_refuses(tmp_path):
    sd = minimind_v_pth(tmp_path / "vlm.pth", "minimind-3v")
    out = export_command(str(tmp_path / "vlm.pth"), str(tmp_path / "out.pth"))
    written = torch.load(out, weights_only=True)
    assert set(written) == set(sd) and all(torch.equal(written[k], sd[k]) for k in sd)
    for format in ("hf", "gguf"):
        with pytest.raises(UserError, match=f"no transformers or llama.cpp architecture.*no {format} export"):
            export_command(str(tmp_path / "vlm.pth"), str(tmp_path / format), format=format)


def stage_checkpoint(path, model: MiniMindVLM, tower) -> None:
    """What a VLM stage checkpoint will hold: the stage's ``model.`` prefix, the configs, the tower's record."""
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "model_config": model.config.to_dict(), "vision_config": model.vision_config.to_dict(),
                **tower_record(tower)}, path)


def test_a_stage_checkpoint_records_its_tower_and_refuses_another(tmp_path):
    minimind_v_pth(tmp_path / "vlm.pth", "minimind-3v")
    folder = tiny_tower_folder(tmp_path / "tower", seed=0)
    model = load_model(tmp_path / "vlm.pth", vision_encoder=folder, device="cpu")
    stage_checkpoint(tmp_path / "last.ckpt", model, model.tower)
    reloaded = load_model(tmp_path / "last.ckpt", device="cpu")  # the recorded folder
    assert reloaded.tower.fingerprint == model.tower.fingerprint and reloaded.vision_config == model.vision_config
    other = tiny_tower_folder(tmp_path / "other", seed=1)
    assert load_vision_tower(other).fingerprint != model.tower.fingerprint
    with pytest.raises(UserError, match="trained with another vision tower"):
        load_model(tmp_path / "last.ckpt", vision_encoder=other, device="cpu")
