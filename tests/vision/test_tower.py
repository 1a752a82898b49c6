"""Our vision tower equals transformers' SiglipVisionModel / CLIPVisionModel on the same folder."""

from __future__ import annotations

import pytest
import torch

from helpers import require_module, tiny_tower_folder
from minimind_pl.errors import UserError
from minimind_pl.vision.tower import load_vision_tower, tower_weights, weights_fingerprint


def reference_features(folder, family: str, whole_model: bool, pixels: torch.Tensor) -> torch.Tensor:
    """What MiniMind-V takes: SigLIP's last_hidden_state (minimind-3v), CLIP's without the class token
    (MiniMind2-V: ``vision_model(pixel_values).last_hidden_state[:, 1:, :]``)."""
    transformers = require_module("transformers")
    model_class = transformers.SiglipVisionModel if family == "siglip" else transformers.CLIPVisionModel
    model = model_class.from_pretrained(folder).eval()
    with torch.no_grad():
        hidden = model(pixel_values=pixels).last_hidden_state
    return hidden if family == "siglip" else hidden[:, 1:]


@pytest.mark.parametrize("whole_model", [False, True], ids=["vision-folder", "whole-model-folder"])
@pytest.mark.parametrize("family", ["siglip", "clip"])
def test_tower_features_equal_transformers(tmp_path, family, whole_model):
    folder = tiny_tower_folder(tmp_path, family, whole_model=whole_model)
    pixels = torch.randn(3, 3, 32, 32)
    ours = load_vision_tower(folder)(pixels)
    expected = reference_features(folder, family, whole_model, pixels)
    assert ours.shape == expected.shape == (3, 16, 32)
    assert (ours - expected).abs().max().item() <= 1e-5


def test_the_tower_is_frozen_and_stays_in_eval_mode(tmp_path):
    tower = load_vision_tower(tiny_tower_folder(tmp_path, "siglip"))
    tower.train()
    assert not tower.training and all(not p.requires_grad for p in tower.parameters())
    pixels = torch.randn(1, 3, 32, 32, requires_grad=True)
    assert not tower(pixels).requires_grad  # no graph through the tower


def test_the_fingerprint_names_the_weights_not_the_file(tmp_path):
    a = tiny_tower_folder(tmp_path / "a", "siglip", seed=0)
    same = tiny_tower_folder(tmp_path / "same", "siglip", seed=0)
    other = tiny_tower_folder(tmp_path / "other", "siglip", seed=1)
    fingerprints = [load_vision_tower(f).fingerprint for f in (a, same, other)]
    assert fingerprints[0] == fingerprints[1] != fingerprints[2]
    weights = tower_weights(a)
    key = next(iter(weights))
    changed = dict(weights, **{key: weights[key].clone().index_put_((torch.tensor(0),), torch.tensor(7.0))})
    assert weights_fingerprint(changed) != fingerprints[0]


def test_folders_that_are_not_towers_are_named(tmp_path):
    with pytest.raises(UserError, match="config.json is missing"):
        load_vision_tower(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "qwen3"}')
    with pytest.raises(UserError, match="model_type 'qwen3' is not a vision tower"):
        load_vision_tower(tmp_path)
