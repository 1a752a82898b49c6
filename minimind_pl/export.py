"""Moving weights between formats: Lightning ``.ckpt`` -> MiniMind ``.pth`` | Hugging Face (Qwen3) directory,
and reading Hugging Face directories (ours, or MiniMind's own ``model_type: minimind`` folders) back.

MiniMind's parameter names are Hugging Face Qwen3's, so no tensor is renamed anywhere: a dense model is
a ``Qwen3ForCausalLM`` and an MoE model a ``Qwen3MoeForCausalLM`` (experts stored one by one,
``mlp.experts.{e}.{gate,up,down}_proj.weight``, the layout Qwen3-MoE checkpoints use and that transformers
fuses at load time). Only ``config.json`` differs between the two worlds, and that is what this module maps.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Literal

import torch

from minimind_pl.config import YARN_ROPE_SCALING, ModelConfig

SAFETENSORS_FILE = "model.safetensors"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
QWEN3_TYPES = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
# MiniMind2-era config names -> today's ModelConfig names
MINIMIND_ALIASES = {"n_routed_experts": "num_experts", "aux_loss_alpha": "router_aux_loss_coef"}
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


# ============================================================================ export


def export_command(
    ckpt: str,
    out: str,
    format: Literal["minimind", "hf"] = "minimind",
    tokenizer: str | None = None,
    preset: str | None = None,
    lora: str | None = None,
    dtype: Literal["float16", "bfloat16", "float32"] = "float16",
) -> Path:
    """Export a checkpoint as a MiniMind .pth state dict or a Hugging Face (Qwen3) directory.

    Args:
        ckpt: A Lightning .ckpt of any stage, a MiniMind .pth or a Hugging Face directory.
        out: Output file (``minimind``: e.g. ``full_sft_768.pth``) or directory (``hf``).
        format: ``minimind`` (the state dict MiniMind's eval_llm.py --weight loads) or ``hf`` (config.json,
            model.safetensors, generation_config.json and the tokenizer, for transformers / vLLM / llama.cpp).
        tokenizer: Tokenizer directory for ``hf`` (default: the one recorded with the checkpoint).
        preset: Model preset of a MiniMind .pth, which stores no config (default: read from the tensor shapes).
        lora: A LoRA adapter file to merge into the weights before exporting.
        dtype: Weight dtype on disk: ``float16`` (MiniMind's), ``bfloat16`` or ``float32``.
    """
    from minimind_pl.inference import load_model, load_tokenizer
    from minimind_pl.lora import merge_lora

    if format not in ("minimind", "hf"):
        raise ValueError(f"unknown export format {format!r}; use 'minimind' or 'hf'")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    model = merge_lora(load_model(ckpt, preset=preset, device="cpu", lora=lora))  # adapters folded into W
    if format == "minimind":
        path = save_minimind(model.state_dict(), out, DTYPES[dtype])
    else:
        path = save_hf_directory(model.state_dict(), model.config, load_tokenizer(ckpt, tokenizer), out, dtype)
    print(f"exported {ckpt} -> {path} ({format}, {dtype})")
    return path


def save_minimind(state_dict: dict[str, torch.Tensor], out: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write a MiniMind ``.pth``: every tensor (tied ``lm_head.weight`` kept) in ``dtype``, MiniMind's names."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().to("cpu", dtype).contiguous() for k, v in state_dict.items()}, path)
    return path


def save_hf_directory(state_dict: dict[str, torch.Tensor], config: ModelConfig, tokenizer, out: str | Path,
                      dtype: str = "float16") -> Path:
    """Write a Hugging Face directory that ``AutoModelForCausalLM`` / ``AutoTokenizer`` load without remote code."""
    from safetensors.torch import save_file

    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in state_dict.items()}
    if config.tie_word_embeddings:
        tensors.pop(HEAD, None)  # one copy on disk; config.json says the head is tied
    save_file(tensors, str(root / SAFETENSORS_FILE), metadata={"format": "pt"})
    write_json(root / "config.json", hf_config(config, dtype))
    write_json(root / "generation_config.json", generation_config(config, tokenizer))
    tokenizer.save(root)
    return root


def hf_config(config: ModelConfig, dtype: str = "float16") -> dict[str, Any]:
    """``config.json`` for ``Qwen3ForCausalLM`` / ``Qwen3MoeForCausalLM`` (transformers 5 layout plus the
    legacy keys older transformers, vLLM and llama.cpp's converter read)."""
    model_type = "qwen3_moe" if config.use_moe else "qwen3"
    rope = hf_rope_parameters(config)
    out: dict[str, Any] = {
        "architectures": [QWEN3_TYPES[model_type]],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": config.hidden_act,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": rope,
        "rope_scaling": None if rope["rope_type"] == "default" else {k: v for k, v in rope.items() if k != "rope_theta"},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "layer_types": ["full_attention"] * config.num_hidden_layers,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "initializer_range": 0.02,
        "use_cache": True,
        "dtype": dtype,
        "torch_dtype": dtype,
    }
    if config.use_moe:
        out.update({
            "num_experts": config.num_experts,
            "num_local_experts": config.num_experts,
            "num_experts_per_tok": config.num_experts_per_tok,
            "moe_intermediate_size": config.moe_intermediate_size,
            "norm_topk_prob": config.norm_topk_prob,
            "router_aux_loss_coef": config.router_aux_loss_coef,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "output_router_logits": False,
        })
    return out


def hf_rope_parameters(config: ModelConfig) -> dict[str, Any]:
    """Hugging Face ``rope_parameters`` giving the same frequencies as MiniMind's RoPE (plain or YaRN)."""
    scaling = config.rope_scaling
    if scaling is None or config.max_position_embeddings <= scaling["original_max_position_embeddings"]:
        return {"rope_type": "default", "rope_theta": config.rope_theta}  # MiniMind applies YaRN only past 2048
    check_yarn_bounds(config)
    return {
        "rope_type": "yarn",
        "rope_theta": config.rope_theta,
        "factor": float(scaling["factor"]),
        "original_max_position_embeddings": scaling["original_max_position_embeddings"],
        "beta_fast": float(scaling["beta_fast"]),
        "beta_slow": float(scaling["beta_slow"]),
        "attention_factor": float(scaling["attention_factor"]),
    }


def check_yarn_bounds(config: ModelConfig) -> None:
    """Warn when Hugging Face's YaRN ramp (clamped at head_dim - 1) would differ from MiniMind's (head_dim/2 - 1)."""
    scaling, dim = config.rope_scaling, config.head_dim
    rotations = dim * math.log(scaling["original_max_position_embeddings"] / (scaling["beta_slow"] * 2 * math.pi))
    high = math.ceil(rotations / (2 * math.log(config.rope_theta)))
    if high > dim // 2 - 1:
        warnings.warn(f"YaRN ramp end {high} exceeds head_dim/2 - 1 = {dim // 2 - 1}: Hugging Face's RoPE will differ "
                      "slightly from MiniMind's for this config", stacklevel=2)


def generation_config(config: ModelConfig, tokenizer) -> dict[str, Any]:
    """``generation_config.json``: special tokens and MiniMind's default sampling (chat.py's defaults)."""
    return {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": tokenizer.pad_id,
        "do_sample": True,
        "temperature": 0.85,
        "top_p": 0.85,
        "top_k": 50,
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write pretty JSON (UTF-8, non-ASCII kept)."""
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ============================================================================ import


def load_hf_directory(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a Hugging Face directory: ``(state_dict in MiniMind names, ModelConfig dict)``.

    Accepts our Qwen3 / Qwen3-MoE export and MiniMind's own folders (``model_type: minimind``, with or
    without ``auto_map``), weights in ``model.safetensors`` or ``pytorch_model.bin`` (sharded or not).
    """
    root = Path(path)
    config_file = root / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{root} is not a Hugging Face model directory: no config.json")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file} is not valid JSON: {err}") from err
    return read_hf_weights(root), config_from_hf(raw, str(config_file))


def config_from_hf(raw: dict[str, Any], where: str = "config.json") -> dict[str, Any]:
    """Map a ``config.json`` (MiniMind-style or Qwen3-style) to ``ModelConfig`` fields; the result is validated."""
    model_type = raw.get("model_type", "minimind")
    if model_type in QWEN3_TYPES:
        fields = _qwen3_fields(raw, where)
    elif model_type == "minimind":
        fields = _minimind_fields(raw, where)
    else:
        raise ValueError(f"{where}: model_type {model_type!r} is not supported (expected 'minimind', 'qwen3' "
                         "or 'qwen3_moe')")
    for key in ("bos_token_id", "eos_token_id"):
        if isinstance(fields.get(key), list):
            fields[key] = fields[key][0]
        if fields.get(key) is None:
            fields.pop(key, None)
    try:
        return ModelConfig.from_dict(fields).to_dict()
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from err


def _minimind_fields(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """ModelConfig fields of a MiniMind ``config.json`` (same names; MiniMind2 aliases mapped)."""
    known = set(ModelConfig.__dataclass_fields__)
    raw = {MINIMIND_ALIASES.get(k, k): v for k, v in raw.items()}
    if raw.get("use_moe") and raw.get("n_shared_experts"):
        raise ValueError(f"{where}: shared experts (MiniMind2-MoE) are not supported by the MiniMind-3 architecture")
    fields = {k: v for k, v in raw.items() if k in known}
    theta = _rope_theta(raw)
    if theta is not None:
        fields["rope_theta"] = theta
    return fields


def _qwen3_fields(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """ModelConfig fields of a Qwen3 / Qwen3-MoE ``config.json``, refusing features MiniMind lacks."""
    unsupported = {
        "attention_bias": raw.get("attention_bias", False),
        "use_sliding_window": raw.get("use_sliding_window", False),
        "mlp_only_layers": bool(raw.get("mlp_only_layers")),
        "decoder_sparse_step != 1": raw.get("decoder_sparse_step", 1) != 1,
    }
    bad = [name for name, value in unsupported.items() if value]
    if bad:
        raise ValueError(f"{where}: Qwen3 features not in MiniMind's architecture: {bad}")
    names = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
             "tie_word_embeddings", "bos_token_id", "eos_token_id"]
    fields = {k: raw[k] for k in names if k in raw}
    fields["rope_theta"] = _rope_theta(raw) or 10000.0  # transformers' default for Qwen3
    fields["inference_rope_scaling"] = _is_minimind_yarn(_rope_dict(raw), where)
    fields["tie_word_embeddings"] = raw.get("tie_word_embeddings", False)
    if raw.get("model_type") == "qwen3_moe":
        fields.update(use_moe=True, num_experts=raw.get("num_experts", raw.get("num_local_experts")))
        for key in ("num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob", "router_aux_loss_coef"):
            if key in raw:
                fields[key] = raw[key]
    return fields


def _rope_dict(raw: dict[str, Any]) -> dict[str, Any]:
    """The RoPE settings of a config, from ``rope_parameters`` (transformers 5) or ``rope_scaling`` (4.x)."""
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    return rope if isinstance(rope, dict) else {}


def _rope_theta(raw: dict[str, Any]) -> float | None:
    """``rope_theta`` from the top level or from ``rope_parameters``."""
    theta = raw.get("rope_theta", _rope_dict(raw).get("rope_theta"))
    return float(theta) if theta is not None else None


def _is_minimind_yarn(rope: dict[str, Any], where: str) -> bool:
    """True for MiniMind's YaRN settings, False for plain RoPE, ValueError for any other scaling."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return False
    expected = {k: v for k, v in YARN_ROPE_SCALING.items() if k != "type"}
    if kind == "yarn" and all(float(rope.get(k, -1)) == float(v) for k, v in expected.items()):
        return True
    raise ValueError(f"{where}: RoPE scaling {rope} is not supported (only plain RoPE or MiniMind's YaRN {expected})")


def read_hf_weights(root: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face directory (safetensors preferred, sharded checkpoints followed)."""
    root = Path(root)
    for name in WEIGHT_FILES:
        path = root / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            shards = sorted(set(json.loads(path.read_text(encoding="utf-8"))["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(_read_weight_file(root / shard))
            return state
        return _read_weight_file(path)
    raise FileNotFoundError(f"{root} holds no weights (looked for {', '.join(WEIGHT_FILES)})")


def _read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """One ``.safetensors`` or ``.bin`` file, loaded safely on the CPU."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    from minimind_pl.checkpoints import read_checkpoint

    return read_checkpoint(path)


# ============================================================================ .pth without a config


def infer_config(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A ModelConfig dict read off a MiniMind state dict's tensor shapes.

    Sizes, heads (via the q/k norm width), experts and tying are in the shapes; what is not
    (``rope_theta``, ``max_position_embeddings``, ``rms_norm_eps``, YaRN) keeps MiniMind's defaults.
    """
    if EMBED not in state_dict and HEAD not in state_dict:
        raise ValueError(f"cannot infer a model config: the state dict has neither {EMBED} nor {HEAD}")
    embed = state_dict.get(EMBED, state_dict.get(HEAD))
    layers = {int(k.split(".")[2]) for k in state_dict if k.startswith("model.layers.")}
    if not layers:
        raise ValueError("cannot infer a model config: the state dict has no model.layers.*")
    p = "model.layers.0."
    head_dim = state_dict[p + "self_attn.q_norm.weight"].shape[0]
    fields: dict[str, Any] = {
        "vocab_size": embed.shape[0], "hidden_size": embed.shape[1], "num_hidden_layers": max(layers) + 1,
        "head_dim": head_dim,
        "num_attention_heads": state_dict[p + "self_attn.q_proj.weight"].shape[0] // head_dim,
        "num_key_value_heads": state_dict[p + "self_attn.k_proj.weight"].shape[0] // head_dim,
        "tie_word_embeddings": HEAD not in state_dict or EMBED not in state_dict
        or torch.equal(state_dict[HEAD], state_dict[EMBED]),
    }
    experts = {int(k.split(".")[5]) for k in state_dict if k.startswith(p + "mlp.experts.")}
    if experts:
        fields.update(use_moe=True, num_experts=max(experts) + 1,
                      moe_intermediate_size=state_dict[p + "mlp.experts.0.gate_proj.weight"].shape[0])
        fields["intermediate_size"] = fields["moe_intermediate_size"]
    else:
        fields["intermediate_size"] = state_dict[p + "mlp.gate_proj.weight"].shape[0]
    if fields["head_dim"] * fields["num_attention_heads"] == fields["hidden_size"]:
        fields.pop("head_dim")  # the default; keeps the config identical to a preset's
    return ModelConfig.from_dict(fields).to_dict()
