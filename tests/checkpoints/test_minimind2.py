"""MiniMind2's own files: its ``out/*.pth`` state dicts and its Hugging Face folders (``model_type: minimind``),
built from random weights in MiniMind2's key layout, loaded, chatted with and exported."""

from __future__ import annotations

import json

import pytest
import torch

from minimind_pl.checkpoints import config_from_hf, infer_config, load_hf_directory, load_model
from minimind_pl.cli import main
from minimind_pl.commands.export import export_command
from minimind_pl.config import ModelConfig
from minimind_pl.errors import UserError
from minimind_pl.model import MiniMindForCausalLM
from minimind_pl.tokenizer import Tokenizer

from helpers import greedy_chat_answer, logits, minimind_state_dict, require_module

TINY = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 192}  # 8 heads of 8, 2 kv heads
DENSE = ModelConfig.from_preset("minimind2-small", **TINY)
MOE = ModelConfig.from_preset("minimind2-moe", **TINY)


def minimind2_model(config: ModelConfig, seed: int = 0) -> MiniMindForCausalLM:
    """Our model holding a random MiniMind2-layout fp16 state dict (as its eval script would load it)."""
    model = MiniMindForCausalLM(config)
    model.load_weights(minimind_state_dict(config, seed), strict=True)
    return model.eval()


def minimind2_config_json(config: ModelConfig) -> dict:
    """A config.json as MiniMind2's ``save_pretrained`` writes it (MiniMindConfig's attributes, auto_map)."""
    return {
        "architectures": ["MiniMindForCausalLM"], "model_type": "minimind",
        "auto_map": {"AutoConfig": "model_minimind.MiniMindConfig",
                     "AutoModelForCausalLM": "model_minimind.MiniMindForCausalLM"},
        "dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "max_position_embeddings": 32768, "num_attention_heads": 8, "num_hidden_layers": config.num_hidden_layers,
        "num_key_value_heads": 2, "vocab_size": config.vocab_size, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
        "inference_rope_scaling": False, "rope_scaling": None, "flash_attn": True, "use_moe": config.use_moe,
        "num_experts_per_tok": 2, "n_routed_experts": 4, "n_shared_experts": 1, "scoring_func": "softmax",
        "aux_loss_alpha": 0.01, "seq_aux": True, "norm_topk_prob": True, "max_seq_len": 8192,
        "torch_dtype": "float16", "transformers_version": "4.57.1",
    }


def minimind2_folder(tmp_path, config: ModelConfig, tokenizer_dir) -> tuple[MiniMindForCausalLM, object]:
    """A MiniMind2 Hugging Face folder: its config.json, ``pytorch_model.bin`` (fp16, tied head kept), tokenizer."""
    model = minimind2_model(config)
    out = tmp_path / "MiniMind2"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(minimind2_config_json(config)))
    torch.save({k: v.half() for k, v in model.state_dict().items()}, out / "pytorch_model.bin")
    Tokenizer.from_file(tokenizer_dir).save(out)
    return model, out


@pytest.mark.parametrize("config", [DENSE, MOE], ids=["dense", "moe"])
def test_pth_config_is_read_off_the_shapes(tmp_path, config):
    """MiniMind2's out/*.pth: no q/k norms -> its 8 heads, eps 1e-5; shared_experts keys -> n_shared_experts."""
    state = minimind_state_dict(config)
    assert ModelConfig.from_dict(infer_config(state)) == config
    path = tmp_path / "full_sft_64.pth"
    torch.save(state, path)
    model = minimind2_model(config)
    ids = torch.randint(0, config.vocab_size, (2, 11))
    torch.testing.assert_close(logits(load_model(str(path), device="cpu"), ids), logits(model, ids), atol=0, rtol=0)


def test_pth_with_other_heads_needs_a_config():
    """Without q/k norms only MiniMind2's 8 heads of hidden/8 can be assumed; other shapes ask for --preset."""
    state = minimind_state_dict(ModelConfig.from_preset("minimind2-small", **TINY, num_attention_heads=4, head_dim=8))
    with pytest.raises(UserError, match="cannot infer the attention heads"):
        infer_config(state)


@pytest.mark.parametrize("config", [DENSE, MOE], ids=["dense", "moe"])
def test_hf_folder_loads_with_its_config(tmp_path, tokenizer_dir, config):
    model, folder = minimind2_folder(tmp_path, config, tokenizer_dir)
    _, read = load_hf_directory(folder)
    assert ModelConfig.from_dict(read) == config
    ids = torch.randint(0, config.vocab_size, (2, 13))
    torch.testing.assert_close(logits(load_model(str(folder), device="cpu"), ids), logits(model, ids), atol=0, rtol=0)


def test_hf_config_mapping_details():
    raw = minimind2_config_json(DENSE)
    dense = config_from_hf(raw)
    assert dense["n_shared_experts"] == 0 and dense["aux_loss_alpha"] is None  # MoE settings of a dense model dropped
    assert dense == DENSE.to_dict()
    # a missing intermediate_size is MiniMind2's 8/3 rule, not MiniMind-3's pi
    assert config_from_hf({**raw, "intermediate_size": None, "hidden_size": 768})["intermediate_size"] == 2048
    # MiniMind2 renormalises the top-k weights only for k > 1
    top1 = config_from_hf({**minimind2_config_json(MOE), "num_experts_per_tok": 1})
    assert not top1["norm_topk_prob"] and top1["router_aux_loss_coef"] == 0.01
    assert config_from_hf(minimind2_config_json(MOE))["router_aux_loss_coef"] == 0.005


def test_chat_with_a_minimind2_folder(tmp_path, tokenizer_dir, capsys):
    """``python main.py chat --ckpt MiniMind2``: the folder's own tokenizer and chat template, greedy answer."""
    model, folder = minimind2_folder(tmp_path, DENSE, tokenizer_dir)
    main(["chat", "--ckpt", str(folder), "--prompt", "你好", "--max_new_tokens", "8", "--temperature", "0",
          "--device", "cpu"])
    expected = greedy_chat_answer(model, Tokenizer.from_file(folder), "你好", max_new_tokens=8)
    assert capsys.readouterr().out == expected + "\n"


def test_dense_export_is_a_llama_folder_transformers_loads(tmp_path, tokenizer_dir):
    transformers = require_module("transformers")
    model, folder = minimind2_folder(tmp_path, DENSE, tokenizer_dir)
    out = export_command(str(folder), str(tmp_path / "hf"), format="hf", dtype="float32")
    raw = json.loads((out / "config.json").read_text())
    assert raw["architectures"] == ["LlamaForCausalLM"] and raw["model_type"] == "llama"
    assert (raw["head_dim"], raw["rms_norm_eps"], raw["tie_word_embeddings"]) == (8, 1e-5, True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # no remote code
    assert type(hf).__name__ == "LlamaForCausalLM"
    ids = torch.randint(0, DENSE.vocab_size, (2, 30))
    torch.testing.assert_close(logits(hf, ids), logits(model, ids), atol=1e-5, rtol=0)
    reloaded = load_model(str(out), device="cpu")
    assert reloaded.config == DENSE.__class__.from_dict({**DENSE.to_dict(), "max_position_embeddings": 32768})
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), atol=0, rtol=0)


def test_moe_exports_to_pth_and_explains_hf(tmp_path, tokenizer_dir):
    model, folder = minimind2_folder(tmp_path, MOE, tokenizer_dir)
    with pytest.raises(UserError, match="no transformers architecture loads it.*--format minimind"):
        export_command(str(folder), str(tmp_path / "hf"), format="hf")
    assert not (tmp_path / "hf").exists()
    pth = export_command(str(folder), str(tmp_path / "full_sft_640_moe.pth"), format="minimind")
    state = torch.load(pth, weights_only=True)
    assert "model.layers.0.mlp.shared_experts.0.down_proj.weight" in state
    assert not any("q_norm" in k for k in state)
    reference = MiniMindForCausalLM(MOE)
    reference.load_state_dict(state, strict=True)  # what MiniMind2's eval script does
    ids = torch.randint(0, MOE.vocab_size, (1, 9))
    torch.testing.assert_close(logits(load_model(str(pth), device="cpu"), ids), logits(model, ids), atol=0, rtol=0)
