"""The SigLIP stage: the tower it trains loads back as a Hugging Face vision folder, and a short fit on the synthetic
image world retrieves captions far better than chance."""

from __future__ import annotations

import time

import lightning as L
import pytest
import torch

from helpers import require_module
from minimind_pl.config import ModelConfig
from minimind_pl.demo.vision_world import write_vision_world
from minimind_pl.errors import UserError
from minimind_pl.data import ImageCaptionDataModule
from minimind_pl.stages.siglip import SigLIP, retrieval_accuracy, retrieval_hits
from minimind_pl.vision.tower import tower_image_spec
from minimind_pl.vision.preprocess import ImageSpec
from minimind_pl.vision.tower import load_vision_tower

TEXT_TOWER = ModelConfig(vocab_size=6400, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=64)


def tiny_stage(tokenizer_dir, **kwargs) -> SigLIP:
    settings = dict(config=TEXT_TOWER, tokenizer=str(tokenizer_dir), image_size=64, patch_size=16,
                    tower_hidden_size=32, tower_layers=1, tower_heads=2, tower_intermediate_size=64, embed_dim=32)
    return SigLIP(**{**settings, **kwargs})


def test_retrieval_hits_by_hand():
    """By cosine, image 0 is closest to text 1, image 1 to text 0, image 2 to text 2. When texts 0 and 1 are the
    same caption, all three images find their own; when every text differs, only image 2 does."""
    images = torch.tensor([[1.0, 0.2, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    texts = torch.tensor([[0.0, 1.0, 0.1], [0.9, 0.1, 0.0], [0.1, 0.0, 1.0]])
    same = torch.tensor([[True, True, False], [True, True, False], [False, False, True]])
    assert retrieval_hits(images, texts, same).tolist() == [True, True, True]
    distinct = torch.eye(3, dtype=torch.bool)
    assert retrieval_hits(images, texts, distinct).tolist() == [False, False, True]


def test_the_trained_tower_loads_back_as_a_siglip_vision_folder(tmp_path, tokenizer_dir):
    """Written with save_tower: our loader and transformers' SiglipVisionModel read the same features the stage's
    tower computes, and the folder's preprocessing is the one the stage trained with."""
    stage = tiny_stage(tokenizer_dir)
    with torch.no_grad():
        for p in stage.vision.parameters():
            p.add_(0.1 * torch.randn_like(p))  # away from the init, so a lost or renamed tensor shows
    folder = stage.save_tower(tmp_path / "tower")
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = stage.vision(pixels)
    tower = load_vision_tower(folder)
    assert tower(pixels).shape == (2, 16, 32)
    assert (tower(pixels) - expected).abs().max().item() <= 1e-6
    assert ImageSpec.from_folder(folder) == tower_image_spec(64)
    transformers = require_module("transformers")
    reference = transformers.SiglipVisionModel.from_pretrained(folder).eval()
    with torch.no_grad():
        hf = reference(pixel_values=pixels).last_hidden_state
    assert (hf - expected).abs().max().item() <= 1e-5


def test_images_of_another_size_are_refused(tokenizer_dir):
    with pytest.raises(UserError, match="--data.image_size"):
        tiny_stage(tokenizer_dir).image_embedding(torch.zeros(1, 3, 32, 32))


def test_a_short_fit_retrieves_captions_far_above_chance(tmp_path, tokenizer_dir):
    """Images -> captions on held-back pictures of the world (validation captions: 120 pictures, chance about 1%)."""
    files = write_vision_world(tmp_path / "world", seed=0,
                               sizes={"caption": 640, "caption_val": 120, "sft": 4, "sft_val": 4})
    torch.manual_seed(0)
    stage = tiny_stage(tokenizer_dir, learning_rate=1e-3, warmup_ratio=0.1)
    data = ImageCaptionDataModule(str(files["caption"]), str(tokenizer_dir), val_path=str(files["caption_val"]),
                                  batch_size=32)
    trainer = L.Trainer(max_epochs=12, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, gradient_clip_val=1.0)
    start = time.perf_counter()
    trainer.fit(stage, data)
    accuracy, chance = retrieval_accuracy(stage, data.datasets["val"])
    print(f"retrieval {accuracy:.0%} (chance {chance:.1%}) after {trainer.global_step} steps, "
          f"{time.perf_counter() - start:.0f} s")
    assert chance < 0.02
    assert accuracy > 8 * chance  # measured: 17% of 120 after 240 steps (15 s on a shared 2-core CPU)
