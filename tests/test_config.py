"""Tests for minimind_pl.config: defaults, presets, parameter counts, validation."""

import math

import pytest
import torch

from minimind_pl.config import PRESETS, ModelConfig
from minimind_pl.model import MiniMindForCausalLM


def unique_param_count(config: ModelConfig) -> int:
    """Parameters of the built model, shared (tied) tensors counted once; built on the meta device."""
    with torch.device("meta"):
        model = MiniMindForCausalLM(config)
    return sum(p.numel() for p in model.parameters())  # parameters() already de-duplicates


def test_defaults_are_minimind3() -> None:
    config = ModelConfig()
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (768, 8, 8)
    assert config.num_key_value_heads == 4 and config.vocab_size == 6400
    assert config.head_dim == 96
    assert config.intermediate_size == math.ceil(768 * math.pi / 64) * 64 == 2432
    assert config.moe_intermediate_size == 2432
    assert config.rope_theta == 1e6 and config.rms_norm_eps == 1e-6 and config.tie_word_embeddings
    assert config.rope_scaling is None
    assert ModelConfig.from_preset("minimind-3") == config


def test_rope_scaling_dict() -> None:
    scaling = ModelConfig(inference_rope_scaling=True).rope_scaling
    assert scaling == {"beta_fast": 32, "beta_slow": 1, "factor": 16, "original_max_position_embeddings": 2048,
                       "attention_factor": 1.0, "type": "yarn"}


@pytest.mark.parametrize("name, total_m, active_m", [
    ("minimind-3", 64, 64), ("minimind-3-moe", 198, 64), ("minimind2-small", 26, 26), ("minimind2", 104, 104),
    ("minimind2-moe", 145, 92),
])
def test_preset_sizes(name: str, total_m: float, active_m: float) -> None:
    total, active = ModelConfig.from_preset(name).num_parameters()
    assert round(total / 1e6) == total_m and round(active / 1e6) == active_m


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_num_parameters_matches_built_model(name: str) -> None:
    config = ModelConfig.from_preset(name)
    assert config.num_parameters()[0] == unique_param_count(config)


@pytest.mark.parametrize("overrides", [
    {"tie_word_embeddings": False},
    {"use_moe": True, "num_experts": 3, "num_experts_per_tok": 2, "moe_intermediate_size": 96},
    {"hidden_size": 66, "head_dim": 16},
    {"qk_norm": False},
    {"use_moe": True, "num_experts_per_tok": 2, "n_shared_experts": 2, "intermediate_size": 80, "moe_intermediate_size": 96},
])
def test_num_parameters_variants(overrides: dict) -> None:
    config = ModelConfig.from_preset("debug", **overrides)
    total, active = config.num_parameters()
    assert total == unique_param_count(config)
    if config.use_moe:  # experts outside the top-k are inactive; the router and shared experts always run
        inactive = config.num_experts - config.num_experts_per_tok
        assert total - active == inactive * config.num_hidden_layers * 3 * config.hidden_size * config.moe_intermediate_size


def test_minimind2_presets_are_its_architecture() -> None:
    """The article's sizes: MiniMind2-Small 25.8M, MiniMind2 104M, MiniMind2-MoE 145M (MiniMind2's own counts)."""
    small, base, moe = (ModelConfig.from_preset(n) for n in ("minimind2-small", "minimind2", "minimind2-moe"))
    assert small.num_parameters()[0] == 25_829_888 and round(base.num_parameters()[0] / 1e5) == 1040
    for config in (small, base, moe):
        assert not config.qk_norm and config.rms_norm_eps == 1e-5 and config.head_dim == config.hidden_size // 8
        assert (config.num_attention_heads, config.num_key_value_heads) == (8, 2)
        assert config.intermediate_size == 64 * math.ceil(int(config.hidden_size * 8 / 3) / 64)
    assert (small.intermediate_size, base.intermediate_size, moe.intermediate_size) == (1408, 2048, 1728)
    assert (moe.hidden_size, moe.num_experts, moe.num_experts_per_tok, moe.n_shared_experts) == (640, 4, 2, 1)
    assert moe.seq_aux and moe.aux_loss_alpha == 0.01 and moe.router_aux_loss_coef == 0.005
    assert not small.use_moe and small.n_shared_experts == 0 and small.aux_loss_alpha is None


def test_aux_loss_weight_from_either_name() -> None:
    """router_aux_loss_coef counts tokens, MiniMind2's aux_loss_alpha routing slots: alpha = coef * k."""
    assert ModelConfig().router_aux_loss_coef == 5e-4 and ModelConfig().aux_loss_alpha is None
    assert ModelConfig(num_experts_per_tok=2, aux_loss_alpha=0.01).router_aux_loss_coef == 0.005
    assert ModelConfig(num_experts_per_tok=2, router_aux_loss_coef=0.1).aux_loss_alpha is None
    agreeing = ModelConfig(num_experts_per_tok=2, aux_loss_alpha=0.01, router_aux_loss_coef=0.005)
    assert ModelConfig.from_dict(agreeing.to_dict()) == agreeing
    with pytest.raises(ValueError, match="router_aux_loss_coef .* and aux_loss_alpha .* disagree"):
        ModelConfig.from_preset("minimind2-moe", router_aux_loss_coef=0.1)
    assert ModelConfig.from_preset("minimind2-moe", router_aux_loss_coef=0.1, aux_loss_alpha=None).router_aux_loss_coef == 0.1
    # a recorded config of before these fields loads as it did
    old = {k: v for k, v in ModelConfig().to_dict().items()
           if k not in ("qk_norm", "n_shared_experts", "scoring_func", "aux_loss_alpha", "seq_aux")}
    assert ModelConfig.from_dict(old) == ModelConfig()


def test_debug_preset_is_tiny() -> None:
    config = ModelConfig.from_preset("debug")
    assert config.vocab_size == 6400 and config.max_position_embeddings == 512
    assert config.num_parameters()[0] < 1_000_000


def test_dict_round_trip_and_overrides() -> None:
    config = ModelConfig.from_preset("minimind2-small", dropout=0.1)
    assert config.dropout == 0.1 and config.intermediate_size == 1408
    assert ModelConfig.from_dict(config.to_dict()) == config


def test_unknown_names_raise() -> None:
    with pytest.raises(ValueError, match="hidden_sise"):
        ModelConfig.from_dict({"hidden_sise": 64})
    with pytest.raises(ValueError, match="unknown model preset 'nope'"):
        ModelConfig.from_preset("nope")


@pytest.mark.parametrize("kwargs, message", [
    ({"hidden_size": 100, "num_attention_heads": 8}, "divisible by num_attention_heads"),
    ({"num_attention_heads": 8, "num_key_value_heads": 3}, "must divide"),
    ({"hidden_size": 60, "num_attention_heads": 4, "head_dim": 15}, "even"),
    ({"hidden_size": 0}, "hidden_size must be a positive integer"),
    ({"use_moe": True, "num_experts": 2, "num_experts_per_tok": 3}, "num_experts_per_tok"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"dropout": 1.0}, "dropout"),
    ({"eos_token_id": 6400}, "eos_token_id"),
    ({"scoring_func": "sigmoid"}, "scoring_func 'sigmoid' is not supported"),
    ({"n_shared_experts": -1}, "n_shared_experts must be an integer >= 0"),
])
def test_invalid_configs(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_explicit_head_dim_allows_indivisible_hidden() -> None:
    # MiniMind (like Qwen3) takes head_dim as given; only the default needs heads | hidden.
    config = ModelConfig(hidden_size=100, num_attention_heads=8, num_key_value_heads=4, head_dim=16)
    assert config.head_dim == 16
