"""Reading weight formats: MiniMind's own Hugging Face folders, sharded folders, foreign configs, .pth shapes."""

from __future__ import annotations

import json

import pytest
import torch

from minimind_pl.checkpoints import config_from_hf, infer_config, load_hf_directory, load_model
from minimind_pl.config import ModelConfig
from minimind_pl.tokenizer import Tokenizer

from helpers import logits, random_model


def test_minimind_style_hf_directory(tmp_path, tokenizer_dir):
    """MiniMind's published folders: its own config.json (model_type minimind, auto_map) and MiniMind names."""
    model = random_model(use_moe=True, num_experts=4)
    out = tmp_path / "minimind-3"
    out.mkdir()
    config = {**model.config.to_dict(), "model_type": "minimind", "architectures": ["MiniMindForCausalLM"],
              "auto_map": {"AutoConfig": "model_minimind.MiniMindConfig",
                           "AutoModelForCausalLM": "model_minimind.MiniMindForCausalLM"},
              "dtype": "float16", "transformers_version": "4.57.1", "rope_scaling": None,
              "intermediate_size": None, "head_dim": None, "pad_token_id": 0}
    (out / "config.json").write_text(json.dumps(config))
    torch.save({k: v.half() for k, v in model.state_dict().items()}, out / "pytorch_model.bin")
    Tokenizer.from_file(tokenizer_dir).save(out)
    state, cfg = load_hf_directory(out)
    assert ModelConfig.from_dict(cfg) == model.config
    reloaded = load_model(str(out), device="cpu")
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), atol=2e-2, rtol=0)


def test_sharded_safetensors_directory(tmp_path):
    from safetensors.torch import save_file

    model = random_model()
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    keys = sorted(state)
    halves = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2:]}
    for name, part in halves.items():
        save_file({k: state[k].contiguous() for k in part}, str(tmp_path / name))
    index = {"weight_map": {k: name for name, part in halves.items() for k in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(json.dumps(config_as_qwen3(model.config)))
    reloaded = load_model(str(tmp_path), device="cpu")
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), atol=1e-6, rtol=0)


def config_as_qwen3(config: ModelConfig) -> dict:
    """A Qwen3 config.json in transformers 4.x layout (top-level rope_theta)."""
    return {"model_type": "qwen3", "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
            "head_dim": config.head_dim, "max_position_embeddings": config.max_position_embeddings,
            "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta, "rope_scaling": None,
            "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": [2]}


def test_unsupported_configs_are_refused():
    base = config_as_qwen3(ModelConfig.from_preset("debug"))
    assert ModelConfig.from_dict(config_from_hf(base)) == ModelConfig.from_preset("debug")
    with pytest.raises(ValueError, match="model_type 'mistral'"):
        config_from_hf({**base, "model_type": "mistral"})
    with pytest.raises(ValueError, match="mlp_bias"):
        config_from_hf({**base, "model_type": "llama", "mlp_bias": True})
    with pytest.raises(ValueError, match="attention_bias"):
        config_from_hf({**base, "attention_bias": True})
    with pytest.raises(ValueError, match="RoPE scaling"):
        config_from_hf({**base, "rope_scaling": {"rope_type": "linear", "factor": 2.0}})


def test_directory_without_weights_or_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_directory(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config_as_qwen3(ModelConfig.from_preset("debug"))))
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_hf_directory(tmp_path)


def test_infer_config_from_shapes():
    for overrides in ({}, {"use_moe": True, "num_experts": 3}, {"tie_word_embeddings": False}):
        model = random_model(**overrides, max_position_embeddings=32768)
        assert ModelConfig.from_dict(infer_config(model.state_dict())) == model.config


def test_legacy_pth_without_zip_container_loads(tmp_path):
    """Old torch.save files (before the zip format) cannot be memory-mapped: they are read plainly."""
    model = random_model()
    path = tmp_path / "legacy.pth"
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=False)
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    torch.testing.assert_close(logits(load_model(str(path), preset="debug", device="cpu"), ids), logits(model, ids))
