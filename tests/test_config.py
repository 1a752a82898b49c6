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
])
def test_num_parameters_variants(overrides: dict) -> None:
    config = ModelConfig.from_preset("debug", **overrides)
    total, active = config.num_parameters()
    assert total == unique_param_count(config)
    if config.use_moe:  # one of three experts inactive per token
        assert total - active == config.num_hidden_layers * 3 * config.hidden_size * config.moe_intermediate_size


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
])
def test_invalid_configs(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_explicit_head_dim_allows_indivisible_hidden() -> None:
    # MiniMind (like Qwen3) takes head_dim as given; only the default needs heads | hidden.
    config = ModelConfig(hidden_size=100, num_attention_heads=8, num_key_value_heads=4, head_dim=16)
    assert config.head_dim == 16
