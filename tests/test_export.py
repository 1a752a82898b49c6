"""Export to MiniMind .pth and Hugging Face (Qwen3) directories, and import of HF directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from minimind_pl.cli import main
from minimind_pl.config import ModelConfig
from minimind_pl.export import config_from_hf, export_command, infer_config, load_hf_directory
from minimind_pl.inference import load_model, load_tokenizer
from minimind_pl.model import MiniMindForCausalLM
from minimind_pl.tokenizer import Tokenizer

from helpers import random_model, require_module, write_stage_checkpoint

VARIANTS = {
    "dense": {},
    "moe": {"use_moe": True, "num_experts": 4, "num_experts_per_tok": 2},
    "yarn": {"inference_rope_scaling": True, "max_position_embeddings": 32768},
}


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Float32 logits without gradients."""
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.fixture
def tokenizer_dir(shared_dir: Path) -> Path:
    """MiniMind's tokenizer."""
    return shared_dir / "minimind"


def test_minimind_pth_is_fp16_with_tied_head_and_reloads(tmp_path, tokenizer_dir):
    model = random_model()
    ckpt = write_stage_checkpoint(model, tmp_path / "sft.ckpt", tokenizer_dir)
    out = tmp_path / "full_sft_64.pth"
    main(["export", "--ckpt", str(ckpt), "--format", "minimind", "--out", str(out)])
    state = torch.load(out, weights_only=True)
    assert set(state) == set(model.state_dict())  # MiniMind's names, lm_head.weight kept
    assert all(t.dtype == torch.float16 for t in state.values())
    assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    plain = MiniMindForCausalLM(model.config)
    plain.load_state_dict(state, strict=True)  # what MiniMind's eval_llm.py does
    reloaded = load_model(str(out), device="cpu")  # no preset: the config is read off the shapes
    # the context length is not in the shapes: MiniMind's default (32768) instead of the debug preset's
    assert reloaded.config == ModelConfig.from_preset("debug", max_position_embeddings=32768)
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), atol=2e-2, rtol=0)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hf_directory_matches_transformers(tmp_path, tokenizer_dir, variant):
    transformers = require_module("transformers")
    model = random_model(**VARIANTS[variant])
    ckpt = write_stage_checkpoint(model, tmp_path / "m.ckpt", tokenizer_dir)
    out = tmp_path / "hf"
    export_command(str(ckpt), str(out), format="hf", dtype="float32")
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == ("Qwen3MoeForCausalLM" if variant == "moe" else "Qwen3ForCausalLM")
    ids = torch.randint(0, model.config.vocab_size, (2, 40 if variant != "yarn" else 300))
    torch.testing.assert_close(logits(hf, ids), logits(model, ids), atol=1e-4, rtol=0)
    state, config = load_hf_directory(out)  # and back
    assert ModelConfig.from_dict(config) == model.config


def test_hf_tokenizer_renders_the_same_chat(tmp_path, tokenizer_dir, shared_dir):
    transformers = require_module("transformers")
    model = random_model()
    out = tmp_path / "hf"
    export_command(str(write_stage_checkpoint(model, tmp_path / "m.ckpt", tokenizer_dir)), str(out), format="hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = Tokenizer.from_file(out)
    for line in (shared_dir / "minimind" / "chat_examples.jsonl").read_text(encoding="utf-8").splitlines():
        example = json.loads(line)
        kwargs = {k: example[k] for k in ("add_generation_prompt", "open_thinking") if k in example}
        expected = hf_tok.apply_chat_template(example["messages"], tools=example.get("tools"), tokenize=False, **kwargs)
        assert ours.apply_chat_template(example["messages"], tools=example.get("tools"), **kwargs) == expected
        assert hf_tok.encode(expected, add_special_tokens=False) == ours.encode(expected)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == ours.eos_id == 2


def test_fp16_hf_directory_loads_everywhere(tmp_path, tokenizer_dir):
    model = random_model()
    ckpt = write_stage_checkpoint(model, tmp_path / "m.ckpt", tokenizer_dir)
    out = tmp_path / "hf"
    main(["export", "--ckpt", str(ckpt), "--format", "hf", "--out", str(out)])
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["torch_dtype"] == "float16"
    assert config["tie_word_embeddings"] is True
    from safetensors.torch import load_file

    assert "lm_head.weight" not in load_file(str(out / "model.safetensors"))  # tied: stored once
    reloaded = load_model(str(out), device="cpu")
    fp16 = MiniMindForCausalLM(model.config).eval()
    fp16.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    torch.testing.assert_close(logits(reloaded, ids), logits(fp16, ids), atol=1e-5, rtol=0)
    assert load_tokenizer(str(out)).eos_id == 2
    # --model.init_weights accepts the directory (the stage checks the config matches)
    from minimind_pl.stages import Pretrain

    stage = Pretrain(config=model.config, init_weights=str(out))
    torch.testing.assert_close(logits(stage.model.eval(), ids), logits(fp16, ids), atol=1e-5, rtol=0)


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
    with pytest.raises(ValueError, match="model_type 'llama'"):
        config_from_hf({**base, "model_type": "llama"})
    with pytest.raises(ValueError, match="attention_bias"):
        config_from_hf({**base, "attention_bias": True})
    with pytest.raises(ValueError, match="RoPE scaling"):
        config_from_hf({**base, "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    with pytest.raises(ValueError, match="shared experts"):
        config_from_hf({"model_type": "minimind", "use_moe": True, "n_shared_experts": 1})


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


def test_export_merges_a_lora_adapter(tmp_path, tokenizer_dir):
    from minimind_pl.lora import LoRAConfig, apply_lora, save_lora

    model = random_model()
    base = write_stage_checkpoint(model, tmp_path / "base.ckpt", tokenizer_dir)
    apply_lora(model, LoRAConfig(rank=2, targets=("q_proj", "o_proj")))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn_like(p))
    adapter = save_lora(model, tmp_path / "adapter.pth", base=str(base))
    out = tmp_path / "merged.pth"
    export_command(str(base), str(out), lora=str(adapter), dtype="float32")
    merged = load_model(str(out), device="cpu")
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    torch.testing.assert_close(logits(merged, ids), logits(model.eval(), ids), atol=1e-5, rtol=0)
