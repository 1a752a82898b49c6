"""MiniMind-V's transformers folders load: the LM and projector from the folder, the tower from vision_encoder=DIR,
else from the folder's own vision_encoder.* tensors, else none (text only, images refused).

The folders are written here as MiniMind-V's scripts/convert_vlm.py writes them (both generations): MiniMindVLM's
save_pretrained after ``del lm_model.vision_encoder``, in bf16, ``safe_serialization=False`` (pytorch_model.bin,
the tied lm_head left out by transformers), config.json = VLMConfig's attributes (model_type ``minimind-v``;
minimind-3v: ``image_special_token`` one token, ``image_ids: [12]``, ``image_token_len``; MiniMind2-V: the whole
run, ``"@" * n`` and ``[34] * n``, on MiniMind2's config names). A folder saved without that ``del`` also holds the
tower as ``vision_encoder.vision_model.*`` (a SiglipVisionModel; MiniMind2-V's whole CLIPModel adds its text side).
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from helpers import require_module, tiny_tower_folder
from minimind_pl import load_model
from minimind_pl.checkpoints.huggingface import MOE_ONLY_FIELDS, read_hf_weights
from minimind_pl.config import ModelConfig, minimind2_config
from minimind_pl.vision.config import VisionConfig
from minimind_pl.vision.tower import load_vision_tower
from minimind_pl.vision.vlm import MiniMindVLM

DEBUG = ModelConfig.from_preset("debug")
MINIMIND2 = ModelConfig.from_dict({**DEBUG.to_dict(), **minimind2_config(DEBUG.hidden_size, 2),
                                   "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": DEBUG.hidden_size // 8})
TOWER_WIDTH = 256  # 4 heads of 64, as ViT-B's: a tower read off its tensors assumes 64-wide heads
PATCHES = 16  # tiny_tower_folder: 32×32 images, 8×8 patches
GENERATIONS = {"minimind-3v": ("siglip", DEBUG, "mlp", "<|image_pad|>", 12),
               "minimind2-v": ("clip", MINIMIND2, "linear", "@", 34)}
AUTO_MAP = {"AutoConfig": "model_vlm.VLMConfig", "AutoModelForCausalLM": "model_vlm.MiniMindVLM"}


def reference_vlm(tmp_path, generation: str, seed: int = 0) -> MiniMindVLM:
    """A random MiniMindVLM of that generation on a tiny tower, every weight exact in bf16 (the converter's dtype)."""
    family, config, projector, token, token_id = GENERATIONS[generation]
    folder = tiny_tower_folder(tmp_path / f"tower{seed}", family, whole_model=family == "clip", seed=seed,
                               hidden_size=TOWER_WIDTH)
    weights = read_hf_weights(folder)  # made bf16-exact in its folder too
    save_file({k: v.bfloat16().float() for k, v in weights.items()}, str(folder / "model.safetensors"))
    tower = load_vision_tower(folder)
    vision = VisionConfig(image_token=token, image_token_id=token_id, image_token_len=PATCHES,
                          image_hidden_size=TOWER_WIDTH, projector=projector)
    torch.manual_seed(seed)
    model = MiniMindVLM(config, vision, tower)
    with torch.no_grad():
        for name, p in model.named_parameters():  # norms (and the projector's LayerNorm) around one
            ones = "norm" in name or name == "vision_proj.mlp.0.weight"
            p.copy_((ones + 0.1 * torch.randn_like(p)).bfloat16().float())
    return model.eval()


def vlm_config_json(model: MiniMindVLM) -> dict:
    """config.json as VLMConfig.save_pretrained writes it: minimind-3v on MiniMind-3's names, MiniMind2-V on
    MiniMind2's (n_routed_experts, aux_loss_alpha, ...)."""
    c, v = model.config, model.vision_config
    common = {"architectures": ["MiniMindVLM"], "auto_map": AUTO_MAP, "model_type": "minimind-v", "dropout": 0.0,
              "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": c.hidden_size,
              "intermediate_size": c.intermediate_size, "max_position_embeddings": c.max_position_embeddings,
              "num_attention_heads": c.num_attention_heads, "num_hidden_layers": c.num_hidden_layers,
              "num_key_value_heads": c.num_key_value_heads, "vocab_size": c.vocab_size, "rms_norm_eps": c.rms_norm_eps,
              "rope_theta": c.rope_theta, "inference_rope_scaling": False, "rope_scaling": None, "flash_attn": True,
              "use_moe": False, "dtype": "bfloat16"}
    if v.projector == "mlp":  # minimind-3v (model_vlm.py today)
        return {**common, "head_dim": c.head_dim, "tie_word_embeddings": True, "num_experts": 4,
                "num_experts_per_tok": 1, "moe_intermediate_size": c.intermediate_size, "norm_topk_prob": True,
                "router_aux_loss_coef": 5e-4, "image_special_token": v.image_token, "image_ids": [v.image_token_id],
                "image_hidden_size": v.image_hidden_size, "image_token_len": v.image_token_len}
    return {**common, "num_experts_per_tok": 2, "n_routed_experts": 4, "n_shared_experts": 1,  # MiniMind2-V
            "scoring_func": "softmax", "aux_loss_alpha": 0.1, "seq_aux": True, "norm_topk_prob": True,
            "image_special_token": v.image_token * v.image_token_len, "image_ids": [v.image_token_id] * v.image_token_len}


def write_vlm_folder(folder, model: MiniMindVLM, tower_of: MiniMindVLM | None = None):
    """The converter's folder of ``model``; with ``tower_of``, saved with that model's tower too (no ``del``)."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(vlm_config_json(model), indent=2), encoding="utf-8")
    weights = {k: v.bfloat16() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: dropped
    if tower_of is not None:
        tower = tower_of.tower.vision_model.state_dict()
        weights.update({f"vision_encoder.vision_model.{k}": v.bfloat16() for k, v in tower.items()})
        if model.vision_config.projector == "linear":  # CLIPModel: its text side and logit scale come along
            weights.update({"vision_encoder.text_model.embeddings.token_embedding.weight": torch.randn(99, 8),
                            "vision_encoder.logit_scale": torch.tensor(2.6592)})
    torch.save(weights, folder / "pytorch_model.bin")
    return folder


def dense_fields(config: ModelConfig) -> dict:
    """The config without the MoE-only fields, which a dense model does not use (and MiniMind2's config.json does
    not hold them all)."""
    return {k: v for k, v in config.to_dict().items() if k not in MOE_ONLY_FIELDS}


def assert_same_logits(loaded, reference, *inputs):
    with torch.no_grad():
        torch.testing.assert_close(loaded(*inputs).logits, reference(*inputs).logits, rtol=0, atol=1e-6)


def rows(generation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows with an image run each (the second cut short, as truncation leaves it) and their pixels."""
    token_id = GENERATIONS[generation][4]
    ids = torch.tensor([[1, 5] + [token_id] * PATCHES + [7, 8, 9], [1] * 11 + [token_id] * 10])
    return ids, torch.randn(2, 1, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("generation", sorted(GENERATIONS))
@pytest.mark.parametrize("tower_from", ["vision_encoder", "folder_tensors", "none"])
def test_minimind_v_folder_logits_equal_the_model_it_was_built_from(tmp_path, generation, tower_from):
    reference = reference_vlm(tmp_path, generation)
    stranger = reference_vlm(tmp_path, generation, seed=1) if tower_from == "vision_encoder" else None
    tower_of = {"vision_encoder": stranger, "folder_tensors": reference, "none": None}[tower_from]
    folder = write_vlm_folder(tmp_path / generation, reference, tower_of)  # a given folder beats the file's tower
    given = reference.tower.folder if tower_from == "vision_encoder" else None
    model = load_model(folder, vision_encoder=given, device="cpu")

    assert isinstance(model, MiniMindVLM)
    assert dense_fields(model.config) == dense_fields(reference.config)
    assert model.vision_config == reference.vision_config
    ids, pixels = rows(generation)
    assert_same_logits(model, reference, ids)
    if tower_from == "none":
        assert model.tower is None
        with pytest.raises(ValueError, match="vision_encoder=DIR"):
            model(ids, pixel_values=pixels)
        return
    assert_same_logits(model, reference, ids, pixels)
    with torch.no_grad():  # the images do reach the logits
        assert (model(ids, pixel_values=pixels).logits - model(ids).logits).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["siglip", "clip"])
def test_a_tower_read_off_its_tensors_preprocesses_as_transformers_defaults(tmp_path, family):
    """No preprocessor_config.json beside the tensors: the family's transformers image processor defaults."""
    transformers = require_module("transformers")
    generation = "minimind-3v" if family == "siglip" else "minimind2-v"
    reference = reference_vlm(tmp_path, generation)
    model = load_model(write_vlm_folder(tmp_path / "vlm", reference, reference), device="cpu")
    processor = (transformers.SiglipImageProcessor(size={"height": 32, "width": 32}) if family == "siglip" else
                 transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}))
    image = Image.fromarray(torch.randint(0, 256, (40, 57, 3), dtype=torch.uint8).numpy())
    expected = torch.as_tensor(processor(images=image, return_tensors="np")["pixel_values"][0])
    torch.testing.assert_close(model.tower.image_spec(image), expected, rtol=0, atol=1e-5)
