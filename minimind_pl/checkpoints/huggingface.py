"""Hugging Face model folders, both directions: write a ``Qwen3ForCausalLM`` / ``Qwen3MoeForCausalLM`` folder
(``config.json``, ``model.safetensors``, ``generation_config.json``, the tokenizer) and read one back
(ours, or MiniMind's own ``model_type: minimind`` folders).

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
from typing import Any

import torch

from minimind_pl.checkpoints.files import DTYPES, HEAD, read_torch_file
from minimind_pl.config import YARN_ROPE_SCALING, ModelConfig
from minimind_pl.errors import UserError
from minimind_pl.generation import SamplingSettings

SAFETENSORS_FILE = "model.safetensors"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
QWEN3_TYPES = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
# MiniMind2-era config names -> today's ModelConfig names
MINIMIND_ALIASES = {"n_routed_experts": "num_experts", "aux_loss_alpha": "router_aux_loss_coef"}


# ============================================================================ writing


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
    """``generation_config.json``: special tokens and MiniMind's default sampling (``SamplingSettings``)."""
    sampling = SamplingSettings()
    return {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": tokenizer.pad_id,
        "do_sample": sampling.do_sample,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write pretty JSON (UTF-8, non-ASCII kept)."""
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ============================================================================ reading


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
        raise UserError(f"{config_file} is not valid JSON: {err}") from err
    return read_hf_weights(root), config_from_hf(raw, str(config_file))


def config_from_hf(raw: dict[str, Any], where: str = "config.json") -> dict[str, Any]:
    """Map a ``config.json`` (MiniMind-style or Qwen3-style) to ``ModelConfig`` fields; the result is validated."""
    model_type = raw.get("model_type", "minimind")
    if model_type in QWEN3_TYPES:
        fields = _qwen3_fields(raw, where)
    elif model_type == "minimind":
        fields = _minimind_fields(raw, where)
    else:
        raise UserError(f"{where}: model_type {model_type!r} is not supported (expected 'minimind', 'qwen3' "
                         "or 'qwen3_moe')")
    for key in ("bos_token_id", "eos_token_id"):
        if isinstance(fields.get(key), list):
            fields[key] = fields[key][0]
        if fields.get(key) is None:
            fields.pop(key, None)
    try:
        return ModelConfig.from_dict(fields).to_dict()
    except (TypeError, ValueError) as err:
        raise UserError(f"{where}: {err}") from err


def _minimind_fields(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """ModelConfig fields of a MiniMind ``config.json`` (same names; MiniMind2 aliases mapped)."""
    known = set(ModelConfig.__dataclass_fields__)
    raw = {MINIMIND_ALIASES.get(k, k): v for k, v in raw.items()}
    if raw.get("use_moe") and raw.get("n_shared_experts"):
        raise UserError(f"{where}: shared experts (MiniMind2-MoE) are not supported by the MiniMind-3 architecture")
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
        raise UserError(f"{where}: Qwen3 features not in MiniMind's architecture: {bad}")
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
    raise UserError(f"{where}: RoPE scaling {rope} is not supported (only plain RoPE or MiniMind's YaRN {expected})")


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
    return read_torch_file(path)
