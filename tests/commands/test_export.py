"""Export to MiniMind .pth and Hugging Face (Qwen3) directories, and import of HF directories."""

from __future__ import annotations

import json

import pytest
import torch

from minimind_pl.cli import main
from minimind_pl.config import ModelConfig
from minimind_pl.checkpoints import load_hf_directory, load_model, load_tokenizer
from minimind_pl.commands.export import export_command
from minimind_pl.model import MiniMindForCausalLM
from minimind_pl.tokenizer import Tokenizer

from helpers import logits, random_model, require_module, write_stage_checkpoint

VARIANTS = {
    "dense": {},
    "moe": {"use_moe": True, "num_experts": 4, "num_experts_per_tok": 2},
    "yarn": {"inference_rope_scaling": True, "max_position_embeddings": 32768},
}


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


def test_export_merges_a_lora_adapter(tmp_path, tokenizer_dir):
    from minimind_pl.checkpoints import save_lora
    from minimind_pl.lora import LoRAConfig, apply_lora

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
