"""GGUF files for llama.cpp, llama-server, llama-cpp-python and Ollama (``export --format gguf``).

One file holds the weights, the hyper-parameters, the byte-level BPE tokenizer and the chat template, written
with ``gguf`` (llama.cpp's own writer library; the ``gguf`` extra). llama.cpp runs our models as its existing
architectures, which compute the same math:

- MiniMind-3 (q/k RMSNorm, no shared expert) as ``qwen3``, its MoE as ``qwen3moe`` (softmax router, top-k,
  weights renormalised: llama.cpp always renormalises for ``qwen3moe``, so ``norm_topk_prob`` must be on);
- dense MiniMind2 (no q/k norm) as ``llama``. llama.cpp's ``llama`` rotates interleaved pairs (x0, x1), (x2, x3)
  while our RoPE (like Hugging Face's) rotates the halves (x_i, x_{i+D/2}), so q and k rows are reordered per
  head: out row (2i + j) <- in row (j * D/2 + i). ``qwen3`` uses the half-rotation (NeoX) itself: no reordering.
- MiniMind2-MoE (a shared expert beside the routed ones) has no llama.cpp architecture: a clear error.
- MiniMind's YaRN (``inference_rope_scaling``) is llama.cpp's YaRN with the same factor, original context and
  betas; llama.cpp's own magnitude correction (1 + 0.1 ln factor) is divided out through ``attn_factor``.

Tensor types follow llama.cpp's converter: 1-D tensors (norms) always f32; 2-D weights in the chosen type;
``q8_0`` quantises what has rows divisible by 32 and keeps the rest f16.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from minimind_pl.checkpoints.huggingface import hf_rope_parameters
from minimind_pl.config import ModelConfig
from minimind_pl.errors import UserError
from minimind_pl.files import atomic_file

GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")
Q8_BLOCK = 32  # values per q8_0 block: a row must be a whole number of blocks

# our parameter name (after "model.layers.{i}.") -> llama.cpp's tensor name (after "blk.{i}.")
LAYER_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp",  # MoE router
}
EXPERT_TENSORS = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}
TOP_TENSORS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}

# token types of GGUF's tokenizer.ggml.token_type
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5


def import_gguf():
    """The ``gguf`` package, or a UserError that says how to install it."""
    try:
        import gguf
    except ImportError as exc:
        raise UserError("export --format gguf needs llama.cpp's writer library: pip install 'minimind_pl[gguf]' "
                        "(or pip install gguf)") from exc
    return gguf


def gguf_architecture(config: ModelConfig) -> str:
    """The llama.cpp architecture that computes exactly this model: ``qwen3``, ``qwen3moe`` or ``llama``."""
    if not config.use_moe:
        return "qwen3" if config.qk_norm else "llama"
    if config.qk_norm and config.n_shared_experts == 0 and config.norm_topk_prob:
        return "qwen3moe"
    raise UserError(
        "llama.cpp has no architecture for this MoE model: its qwen3moe has q/k norms, no shared expert and "
        "renormalised top-k weights, and its llama MoE (Mixtral) has no shared expert; this model has "
        f"qk_norm={config.qk_norm}, n_shared_experts={config.n_shared_experts}, "
        f"norm_topk_prob={config.norm_topk_prob}. Export it with --format minimind, or use a dense model.")


def interleave_rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder q/k projection rows (heads * D, in) from half-rotation to llama.cpp's interleaved-pair RoPE."""
    rows, width = weight.shape
    head_dim = rows // heads
    # (heads, 2, D/2, in): [h, j, i] is row j * D/2 + i of head h; swap to (heads, D/2, 2, in): row 2i + j
    return weight.reshape(heads, 2, head_dim // 2, width).transpose(1, 2).reshape(rows, width)


def gguf_tensors(state_dict: dict[str, torch.Tensor], config: ModelConfig, arch: str
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """(llama.cpp name, float32 tensor) for every weight; experts stacked (E, out, in); a tied head left out."""
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for key, value in state_dict.items():
        value = value.detach().to("cpu", torch.float32)
        if key in TOP_TENSORS:
            if key == "lm_head.weight" and config.tie_word_embeddings:
                continue  # llama.cpp uses token_embd for the head when output.weight is absent
            yield TOP_TENSORS[key], value
            continue
        layer, rest = _split_layer_key(key)
        if rest.startswith("mlp.experts."):
            index, proj = rest[len("mlp.experts."):].split(".")[:2]
            experts.setdefault((layer, proj), {})[int(index)] = value
            continue
        module = rest.rsplit(".", 1)[0]
        if module not in LAYER_TENSORS:
            raise UserError(f"no llama.cpp tensor for {key}")
        if arch == "llama" and module == "self_attn.q_proj":
            value = interleave_rope_rows(value, config.num_attention_heads)
        elif arch == "llama" and module == "self_attn.k_proj":
            value = interleave_rope_rows(value, config.num_key_value_heads)
        yield f"blk.{layer}.{LAYER_TENSORS[module]}.weight", value
    for (layer, proj), by_index in sorted(experts.items()):
        yield f"blk.{layer}.{EXPERT_TENSORS[proj]}.weight", torch.stack([by_index[i] for i in sorted(by_index)])


def _split_layer_key(key: str) -> tuple[int, str]:
    """``model.layers.3.self_attn.q_proj.weight`` -> (3, ``self_attn.q_proj.weight``)."""
    parts = key.split(".")
    if parts[:2] != ["model", "layers"] or len(parts) < 4:
        raise UserError(f"no llama.cpp tensor for {key}")
    return int(parts[2]), ".".join(parts[3:])


def encode_tensor(gguf, tensor: torch.Tensor, dtype: str) -> tuple[np.ndarray, Any]:
    """(data, raw GGML type or None) for GGUFWriter.add_tensor: 1-D stays f32, 2-D+ in ``dtype``."""
    array = tensor.numpy()
    if tensor.dim() == 1 or dtype == "f32":
        return array.astype(np.float32), None
    if dtype == "f16" or (dtype == "q8_0" and array.shape[-1] % Q8_BLOCK):
        return array.astype(np.float16), None
    kind = gguf.GGMLQuantizationType.BF16 if dtype == "bf16" else gguf.GGMLQuantizationType.Q8_0
    return gguf.quants.quantize(array, kind), kind


def add_hyperparameters(writer, config: ModelConfig, dtype: str, name: str) -> None:
    """Model sizes, attention, RoPE and MoE keys under ``{arch}.*``."""
    gguf = import_gguf()
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(file_types[dtype])
    add_rope_scaling(writer, config)
    if config.use_moe:
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)


def add_rope_scaling(writer, config: ModelConfig) -> None:
    """YaRN keys when MiniMind applies YaRN (``hf_rope_parameters`` decides, as for Hugging Face folders).

    llama.cpp's YaRN interpolates the same frequencies (ramp between the same dimension pairs) but multiplies
    cos/sin by ``attn_factor * (1 + 0.1 ln factor)``, where MiniMind multiplies by ``attention_factor``: the file's
    ``attn_factor`` divides that magnitude correction out again.
    """
    rope = hf_rope_parameters(config)
    if rope["rope_type"] != "yarn":
        return
    gguf = import_gguf()
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(rope["factor"])
    writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    writer.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
    writer.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])
    writer.add_rope_scaling_attn_factors(rope["attention_factor"] / (1 + 0.1 * math.log(rope["factor"])))


def add_tokenizer(writer, tokenizer, rows: int) -> None:
    """Byte-level BPE as llama.cpp's ``gpt2`` tokenizer model: tokens, types, merges, special ids, template.

    llama.cpp wants one token per embedding row: rows past the tokenizer's ids are written as unused ``[PAD{i}]``.
    """
    definition = tokenizer.definition
    model, pre = definition.get("model") or {}, definition.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) \
            or pre.get("add_prefix_space"):
        raise UserError("GGUF export handles byte-level BPE tokenizers with GPT-2's pre-tokenizer (MiniMind's and "
                        f"those `python main.py tokenizer` trains); this one has model {model.get('type')!r}, "
                        f"pre-tokenizer {pre}")
    if tokenizer.vocab_size > rows:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only {rows} embedding rows")
    tokens = [""] * tokenizer.vocab_size + [f"[PAD{i}]" for i in range(tokenizer.vocab_size, rows)]
    types = [TOKEN_NORMAL] * tokenizer.vocab_size + [TOKEN_UNUSED] * (rows - tokenizer.vocab_size)
    for text, index in model["vocab"].items():
        tokens[index] = text
    for added in definition.get("added_tokens") or []:
        tokens[added["id"]] = added["content"]
        types[added["id"]] = TOKEN_CONTROL if added.get("special") else TOKEN_USER_DEFINED
    missing = [i for i, text in enumerate(tokens) if not text]
    if missing:
        raise UserError(f"token ids {missing[:5]} have no text in tokenizer.json; GGUF needs every id")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # the GPT-2 split regex: what a ByteLevel pre-tokenizer with use_regex does
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_add_bos_token(False)  # MiniMind's template writes <|im_start|> itself
    template = tokenizer.config.get("chat_template")
    if template:  # a Jinja string, or a named set ([{"name", "template"}]: tokenizer.chat_template.<name> keys)
        writer.add_chat_template(template)


def save_gguf(state_dict: dict[str, torch.Tensor], config: ModelConfig, tokenizer, out: str | Path,
              dtype: str = "f16", name: str = "MiniMind") -> Path:
    """Write a GGUF file that llama.cpp and Ollama run as is (atomically: a failed export leaves no file)."""
    gguf = import_gguf()
    if dtype not in GGUF_DTYPES:
        raise UserError(f"unknown GGUF dtype {dtype!r}; use one of {', '.join(GGUF_DTYPES)}")
    arch = gguf_architecture(config)
    path = Path(out)
    with atomic_file(path) as file:
        # GGUFWriter opens files by name: it writes the temporary file atomic_file has just created, which then
        # replaces `path` only when everything is written
        writer = gguf.GGUFWriter(path=file.name, arch=arch)
        add_hyperparameters(writer, config, dtype, name)
        add_tokenizer(writer, tokenizer, config.vocab_size)
        for tensor_name, tensor in gguf_tensors(state_dict, config, arch):
            data, raw_type = encode_tensor(gguf, tensor, dtype)
            writer.add_tensor(tensor_name, data, raw_dtype=raw_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path
