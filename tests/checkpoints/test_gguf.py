"""GGUF export checked inside llama.cpp itself (through llama-cpp-python, which builds llama.cpp from source):
the same token ids, the same logits and greedy continuations, the chat template as llama.cpp renders it."""

import contextlib
import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import random_model, require_module, run_python, with_yarn
from minimind_pl.checkpoints.gguf import gguf_architecture, interleave_rope_rows, save_gguf
from minimind_pl.config import ModelConfig
from minimind_pl.errors import UserError
from minimind_pl.generation import generate
from minimind_pl.model import MiniMindForCausalLM
from minimind_pl.tokenizer import Tokenizer

MIXED_TEXTS = [
    "Hello, world! It's 2026.",
    "床前明月光，疑是地上霜。",
    "emoji 🤖🎉 and ünïcödé",
    "def f(x):\n    return x ** 2  # square\n\n\tif a<b: pass",
    "  leading spaces,   runs   of spaces\n\n\nand newlines",
    "<|im_start|>user\n你好<|im_end|>\n<think>x</think><tool_call>{\"a\": 1}</tool_call>",
    "12345 3.14159 你好123世界",  # digit runs: llama.cpp's qwen2 and llama3 pre-tokenizers split them otherwise
]
F32_KV = 0  # GGML_TYPE_F32: llama.cpp's KV cache defaults to f16, which alone moves logits by ~1e-3


@pytest.fixture
def llama_cpp(monkeypatch):
    """llama-cpp-python with llama.cpp's extra CPU buffer types off: its AMX repacking of q8_0 weights crashes this
    build (0.3.36) on AMX CPUs whatever the model's width (seen on the development machine), while the plain CPU
    path computes the same math."""
    module = require_module("llama_cpp")
    defaults = module.llama_cpp.llama_model_default_params

    def without_extra_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params

    monkeypatch.setattr(module.llama_cpp, "llama_model_default_params", without_extra_buffers)
    return module


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(tokenizer_dir)


@contextlib.contextmanager
def in_llama_cpp(llama_cpp, path: Path):
    """llama.cpp on one thread with an f32 KV cache and every position's logits kept, closed afterwards."""
    llm = llama_cpp.Llama(str(path), n_ctx=128, n_threads=1, logits_all=True, verbose=False,
                          type_k=F32_KV, type_v=F32_KV)
    try:
        yield llm
    finally:
        llm.close()


def exported(llama_cpp, model: MiniMindForCausalLM, tokenizer: Tokenizer, path: Path, dtype: str = "f32"):
    """``model`` written as GGUF at ``path`` and opened in llama.cpp."""
    return in_llama_cpp(llama_cpp, save_gguf(model.state_dict(), model.config, tokenizer, path, dtype))


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    """(len(ids), vocab) logits llama.cpp computes for ``ids`` from an empty cache."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def ours(model: MiniMindForCausalLM, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def moe_model() -> MiniMindForCausalLM:
    return random_model(0, use_moe=True, num_experts=4, num_experts_per_tok=2)


@pytest.mark.parametrize("arch, model_fn", [
    ("qwen3", lambda: random_model(0)),
    ("llama", lambda: random_model(0, qk_norm=False)),  # MiniMind2: q/k rows reordered for llama.cpp's RoPE
    ("qwen3moe", moe_model),
])
def test_llama_cpp_computes_our_logits_and_greedy_answers(tmp_path, llama_cpp, tokenizer, arch, model_fn):
    model = model_fn()
    assert gguf_architecture(model.config) == arch
    path = save_gguf(model.state_dict(), model.config, tokenizer, tmp_path / "model.gguf", "f32")
    with in_llama_cpp(llama_cpp, path) as llm:
        assert llm.metadata["general.architecture"] == arch
        ids = tokenizer.encode_chat([{"role": "user", "content": "写一首诗 about the moon 🌙"}])
        ref = ours(model, ids)
        np.testing.assert_allclose(llama_logits(llm, ids), ref, atol=2e-5 * np.abs(ref).max())
        llm.reset()
        theirs = list(itertools.islice(llm.generate(ids, temp=0.0, top_k=1, reset=True), 12))  # endless otherwise
        ours_greedy = generate(model, [ids], max_new_tokens=12, do_sample=False)[0]
        assert theirs == ours_greedy[: len(theirs)] and len(theirs) == 12


def test_llama_cpp_tokenizes_as_we_do(tmp_path, llama_cpp, tokenizer):
    model = random_model(0)
    with exported(llama_cpp, model, tokenizer, tmp_path / "m.gguf") as llm:
        for text in MIXED_TEXTS:
            assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == tokenizer.encode(text), text
            ids = tokenizer.encode(text)
            assert llm.detokenize(ids, special=True).decode("utf-8") == text
        meta = llm.metadata
        assert meta["tokenizer.ggml.bos_token_id"] == str(tokenizer.bos_id)
        assert meta["tokenizer.ggml.eos_token_id"] == str(tokenizer.eos_id)
        assert llm.token_eos() == tokenizer.eos_id


def test_llama_cpp_renders_our_chat_template(tmp_path, llama_cpp, tokenizer):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    model = random_model(0)
    with exported(llama_cpp, model, tokenizer, tmp_path / "m.gguf") as llm:
        formatter = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"], eos_token="<|im_end|>",
                                        bos_token="<|im_start|>", add_generation_prompt=True)
        messages = [{"role": "system", "content": "You are MiniMind."},
                    {"role": "user", "content": "1+1=?"},
                    {"role": "assistant", "content": "2"},
                    {"role": "user", "content": "再加一呢？"}]
        prompt = formatter(messages=messages).prompt
        assert llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True) == tokenizer.encode_chat(messages)


def test_llama_cpp_chat_completion_uses_the_files_template_and_answers_as_we_do(tmp_path, llama_cpp, tokenizer):
    """What a llama-cpp-python user runs: no chat format named, so it takes the template from the file."""
    model = random_model(0)
    messages = [{"role": "system", "content": "You are MiniMind."}, {"role": "user", "content": "1+1=?"},
                {"role": "assistant", "content": "2"}, {"role": "user", "content": "再加一呢？"}]
    with exported(llama_cpp, model, tokenizer, tmp_path / "m.gguf") as llm:
        reply = llm.create_chat_completion(messages, temperature=0.0, top_k=1, max_tokens=10)
    ids = tokenizer.encode_chat(messages)
    assert reply["usage"]["prompt_tokens"] == len(ids)
    answer = generate(model, [ids], max_new_tokens=10, do_sample=False)[0]
    assert reply["choices"][0]["message"]["content"] == tokenizer.decode(answer, skip_special_tokens=True)


@pytest.mark.parametrize("templates", [None, "named"])
def test_a_named_template_set_or_none_is_written_as_llama_cpp_reads_it(tmp_path, llama_cpp, tokenizer, templates):
    config = {k: v for k, v in tokenizer.config.items() if k != "chat_template"}
    if templates:
        config["chat_template"] = [{"name": "default", "template": tokenizer.chat_template()},
                                   {"name": "tool_use", "template": "{{ 'tools' }}"}]
    changed = Tokenizer(json.dumps(tokenizer.definition), json.dumps(config))
    with exported(llama_cpp, random_model(0), changed, tmp_path / "m.gguf") as llm:
        meta = llm.metadata
    if templates:
        assert meta["tokenizer.chat_template"] == tokenizer.chat_template()
        assert meta["tokenizer.chat_template.tool_use"] == "{{ 'tools' }}"
    else:  # a base model without a template: none in the file (llama.cpp falls back to its own)
        assert not any(key.startswith("tokenizer.chat_template") for key in meta)


@pytest.mark.parametrize("dtype, tolerance", [("f16", 0.02), ("bf16", 0.05), ("q8_0", 0.05)])
def test_smaller_types_stay_close(tmp_path, llama_cpp, tokenizer, dtype, tolerance):
    """f16 rounds weights to 11 bits, bf16 to 8, q8_0 to 8 bits per block of 32: logits move by a few hundredths of
    their range on the tiny random model (tolerance relative to the largest logit)."""
    model = random_model(0)
    path = save_gguf(model.state_dict(), model.config, tokenizer, tmp_path / f"m-{dtype}.gguf", dtype)
    with in_llama_cpp(llama_cpp, path) as llm:
        ids = tokenizer.encode(MIXED_TEXTS[1] + MIXED_TEXTS[0])
        ref = ours(model, ids)
        error = np.abs(llama_logits(llm, ids) - ref).max() / np.abs(ref).max()
        assert 0 < error < tolerance


def test_interleave_rope_rows_pairs_the_halves_of_each_head():
    # one head of width 4, rows named by their index: halves (0, 1 | 2, 3) become pairs (0, 2), (1, 3)
    weight = torch.arange(8.0).reshape(8, 1)
    assert interleave_rope_rows(weight, heads=2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.mark.parametrize("overrides, message", [
    ({"use_moe": True, "n_shared_experts": 1}, "n_shared_experts=1"),
    ({"use_moe": True, "norm_topk_prob": False}, "norm_topk_prob=False"),
    ({"use_moe": True, "qk_norm": False}, "qk_norm=False"),
])
def test_models_llama_cpp_cannot_run_are_refused(overrides, message):
    with pytest.raises(UserError, match=message):
        gguf_architecture(ModelConfig.from_preset("debug", **overrides))


@pytest.mark.parametrize("qk_norm", [True, False])  # qwen3 and llama
def test_llama_cpp_computes_our_yarn_logits(tmp_path, llama_cpp, tokenizer, qk_norm):
    """MiniMind's YaRN changes the slow dimensions at every position (logits move by tenths on this tiny model)."""
    model = with_yarn(random_model(0, qk_norm=qk_norm, max_position_embeddings=32768))
    with exported(llama_cpp, model, tokenizer, tmp_path / "m.gguf") as llm:
        assert llm.metadata[f"{gguf_architecture(model.config)}.rope.scaling.type"] == "yarn"
        ids = tokenizer.encode(" ".join(MIXED_TEXTS))
        ref = ours(model, ids)
        np.testing.assert_allclose(llama_logits(llm, ids), ref, atol=2e-5 * np.abs(ref).max())


def test_llama_cpp_qwen3moe_renormalises_whatever_the_file_says(tmp_path, llama_cpp, tokenizer, monkeypatch):
    """Why norm_topk_prob=False is refused: written as qwen3moe anyway, llama.cpp computes the renormalised model."""
    import minimind_pl.checkpoints.gguf as gguf_module

    renormalised = moe_model()
    raw = MiniMindForCausalLM(dataclasses.replace(renormalised.config, norm_topk_prob=False))
    raw.load_state_dict(renormalised.state_dict())
    monkeypatch.setattr(gguf_module, "gguf_architecture", lambda config: "qwen3moe")
    with exported(llama_cpp, raw.eval(), tokenizer, tmp_path / "m.gguf") as llm:
        ids = tokenizer.encode(MIXED_TEXTS[0])
        theirs, ref = llama_logits(llm, ids), ours(renormalised, ids)
    np.testing.assert_allclose(theirs, ref, atol=2e-5 * np.abs(ref).max())
    assert np.abs(theirs - ours(raw, ids)).max() > 0.01 * np.abs(ref).max()


def test_a_failed_export_leaves_no_file(tmp_path, tokenizer):
    model = random_model(0, use_moe=True, n_shared_experts=1)
    with pytest.raises(UserError, match="n_shared_experts=1"):
        save_gguf(model.state_dict(), model.config, tokenizer, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_a_model_with_more_rows_than_tokens_gets_unused_pad_tokens(tmp_path, llama_cpp, tokenizer):
    model = random_model(0, vocab_size=6464)  # rows padded to a multiple of 64, as some trainers do
    with exported(llama_cpp, model, tokenizer, tmp_path / "m.gguf") as llm:
        assert llm.n_vocab() == 6464
        ids = tokenizer.encode(MIXED_TEXTS[0])
        ref = ours(model, ids)
        np.testing.assert_allclose(llama_logits(llm, ids), ref, atol=2e-5 * np.abs(ref).max())


def test_export_command_writes_gguf(tmp_path, llama_cpp, tokenizer_dir):
    from helpers import write_stage_checkpoint

    model = random_model(0)
    ckpt = write_stage_checkpoint(model, tmp_path / "pretrain.ckpt", tokenizer_dir)
    out = tmp_path / "model.gguf"
    result = run_python(["main.py", "export", "--ckpt", str(ckpt), "--format", "gguf", "--out", str(out),
                         "--dtype", "q8_0"])
    assert result.returncode == 0, result.stderr
    with in_llama_cpp(llama_cpp, out) as llm:
        assert llm.metadata["general.file_type"] == "7"  # LlamaFileType.MOSTLY_Q8_0
