"""Hugging Face model folders, both directions: write a ``Qwen3ForCausalLM`` / ``Qwen3MoeForCausalLM`` /
``LlamaForCausalLM`` folder (``config.json``, ``model.safetensors``, ``generation_config.json``, the tokenizer)
and read one back (ours, or MiniMind's own ``model_type: minimind`` folders, MiniMind-3's and MiniMind2's).

MiniMind's parameter names are Hugging Face Qwen3's (and, without the q/k norms, Llama's), so no tensor is
renamed anywhere: a dense model is a ``Qwen3ForCausalLM``, a dense MiniMind2 (no q/k norm) a
``LlamaForCausalLM`` and an MoE model a ``Qwen3MoeForCausalLM`` (experts stored one by one,
``mlp.experts.{e}.{gate,up,down}_proj.weight``, the layout Qwen3-MoE checkpoints use and that transformers
fuses at load time). Only ``config.json`` differs between the worlds, and that is what this module maps.
MiniMind2-MoE (top-2 plus an unconditional shared expert, no q/k norm) has no such twin in transformers.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch

from minimind_pl.checkpoints.files import DTYPES, HEAD, read_torch_file
from minimind_pl.config import MINIMIND2_DEFAULTS, YARN_ROPE_SCALING, ModelConfig, minimind2_intermediate_size
from minimind_pl.errors import UserError
from minimind_pl.generation import SamplingSettings

SAFETENSORS_FILE = "model.safetensors"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
QWEN3_TYPES = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
HF_ARCHITECTURES = {**QWEN3_TYPES, "llama": "LlamaForCausalLM"}
# MiniMind2-era config names -> today's ModelConfig names (MiniMind2's other names are ModelConfig's own; its
# aux_loss_alpha is a field of its own: it counts routing slots, router_aux_loss_coef tokens)
MINIMIND_ALIASES = {"n_routed_experts": "num_experts"}
# Only MiniMind2's config.json has this key (MiniMind-3 calls it num_experts)
MINIMIND2_MARKER = "n_routed_experts"
# MiniMind's model types: its LM, and MiniMind-V's (VLMConfig: the LM's fields plus the image placeholder's)
MINIMIND_TYPES = ("minimind", "minimind-v")
MINIMIND2_HIDDEN_SIZE = 512  # MiniMind2Config's default (MiniMind2-Small)
MOE_ONLY_FIELDS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                   "router_aux_loss_coef", "n_shared_experts", "aux_loss_alpha", "seq_aux")


# ============================================================================ writing


def save_hf_directory(state_dict: dict[str, torch.Tensor], config: ModelConfig, tokenizer, out: str | Path,
                      dtype: str = "float16") -> Path:
    """Write a Hugging Face directory that ``AutoModelForCausalLM`` / ``AutoTokenizer`` load without remote code."""
    from safetensors.torch import save_file

    config_json = hf_config(config, dtype)  # refuses a model transformers cannot load before anything is written
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in state_dict.items()}
    if config.tie_word_embeddings:
        tensors.pop(HEAD, None)  # one copy on disk; config.json says the head is tied
    save_file(tensors, str(root / SAFETENSORS_FILE), metadata={"format": "pt"})
    write_json(root / "config.json", config_json)
    write_json(root / "generation_config.json", generation_config(config, tokenizer))
    tokenizer.save(root)
    return root


def hf_model_type(config: ModelConfig) -> str:
    """The transformers architecture with exactly this model's math: ``qwen3``, ``qwen3_moe`` or ``llama``.

    A ``UserError`` for MoE models outside Qwen3-MoE's routing (MiniMind2-MoE): no architecture of
    transformers runs top-k experts beside an unconditional shared expert without remote code.
    """
    if not config.use_moe:
        return "qwen3" if config.qk_norm else "llama"
    if config.n_shared_experts == 0 and config.qk_norm:
        return "qwen3_moe"
    raise UserError(
        "a Hugging Face folder of this MoE model cannot be written: no transformers architecture loads it without "
        "remote code (Qwen3-MoE has q/k norms and no shared expert, Qwen2-MoE gates its shared expert with a "
        "learned sigmoid and has attention biases, DeepSeek-V2 does not renormalise the top-k weights and uses "
        "latent attention, Mixtral has no shared expert; this model has "
        f"qk_norm={config.qk_norm}, n_shared_experts={config.n_shared_experts}, {config.num_experts_per_tok} of "
        f"{config.num_experts} experts with softmax scores). Export it with --format minimind (a MiniMind .pth, "
        "which MiniMind's own code and this project load), or convert a dense model.")


def hf_config(config: ModelConfig, dtype: str = "float16") -> dict[str, Any]:
    """``config.json`` for ``Qwen3ForCausalLM`` / ``Qwen3MoeForCausalLM`` / ``LlamaForCausalLM`` (transformers 5
    layout plus the legacy keys older transformers, vLLM and llama.cpp's converter read)."""
    model_type = hf_model_type(config)
    rope = hf_rope_parameters(config)
    out: dict[str, Any] = {
        "architectures": [HF_ARCHITECTURES[model_type]],
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
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "initializer_range": 0.02,
        "use_cache": True,
        "dtype": dtype,
        "torch_dtype": dtype,
    }
    if model_type == "llama":
        out.update({"mlp_bias": False, "pretraining_tp": 1})
    else:
        out.update({"use_sliding_window": False, "sliding_window": None,
                    "layer_types": ["full_attention"] * config.num_hidden_layers})
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
    """Warn when Hugging Face's and llama.cpp's YaRN ramp (clamped at head_dim - 1) would differ from MiniMind's
    (head_dim/2 - 1)."""
    scaling, dim = config.rope_scaling, config.head_dim
    rotations = dim * math.log(scaling["original_max_position_embeddings"] / (scaling["beta_slow"] * 2 * math.pi))
    high = math.ceil(rotations / (2 * math.log(config.rope_theta)))
    if high > dim // 2 - 1:
        warnings.warn(f"YaRN ramp end {high} exceeds head_dim/2 - 1 = {dim // 2 - 1}: Hugging Face's and llama.cpp's "
                      "RoPE (which clamp it at head_dim - 1) will differ slightly from MiniMind's for this config",
                      stacklevel=2)


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
    without ``auto_map``; MiniMind-V's ``minimind-v``, whose image fields ``read_config_json`` gives),
    weights in ``model.safetensors`` or ``pytorch_model.bin`` (sharded or not).
    """
    root = Path(path)
    config = config_from_hf(read_config_json(root), str(root / "config.json"))
    return read_hf_weights(root), config


def read_config_json(root: str | Path) -> dict[str, Any]:
    """A model folder's ``config.json`` as it is."""
    config_file = Path(root) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{root} is not a Hugging Face model directory: no config.json")
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{config_file} is not valid JSON: {err}") from err


def config_from_hf(raw: dict[str, Any], where: str = "config.json") -> dict[str, Any]:
    """Map a ``config.json`` (MiniMind-style or Qwen3-style) to ``ModelConfig`` fields; the result is validated."""
    model_type = raw.get("model_type", "minimind")
    if model_type in HF_ARCHITECTURES:
        fields = _transformers_fields(raw, where)
    elif model_type in MINIMIND_TYPES and MINIMIND2_MARKER in raw:
        fields = _minimind2_fields(raw, where)
    elif model_type in MINIMIND_TYPES:
        fields = _minimind_fields(raw, where)
    else:
        raise UserError(f"{where}: model_type {model_type!r} is not supported (expected 'minimind', 'minimind-v', "
                         "'qwen3', 'qwen3_moe' or 'llama')")
    if not fields.get("use_moe"):  # MiniMind's configs carry MoE settings that a dense model does not use
        for key in MOE_ONLY_FIELDS:
            fields.pop(key, None)
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
    """ModelConfig fields of a MiniMind-3 ``config.json`` (the same names)."""
    known = set(ModelConfig.__dataclass_fields__)
    fields = {k: v for k, v in raw.items() if k in known}
    theta = _rope_theta(raw)
    if theta is not None:
        fields["rope_theta"] = theta
    return fields


def _minimind2_fields(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """ModelConfig fields of a MiniMind2 ``config.json``: its names mapped, its defaults under what is missing.

    MiniMind2 has no q/k norm, derives the MLP width with 8/3 instead of pi, and renormalises the top-k
    weights only when k > 1 (with k = 1 that is ``norm_topk_prob=False``).
    """
    raw = {MINIMIND_ALIASES.get(k, k): v for k, v in raw.items()}
    fields = {**MINIMIND2_DEFAULTS, **_minimind_fields(raw, where), "qk_norm": False}
    fields.pop("router_aux_loss_coef", None)  # MiniMind2's weight is aux_loss_alpha
    hidden = fields.get("hidden_size", MINIMIND2_HIDDEN_SIZE)
    fields["hidden_size"] = hidden
    if fields.get("intermediate_size") is None:
        fields["intermediate_size"] = minimind2_intermediate_size(hidden)
    if fields.get("num_experts_per_tok") == 1:
        fields["norm_topk_prob"] = False
    return fields


def _transformers_fields(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """ModelConfig fields of a Qwen3 / Qwen3-MoE / Llama ``config.json``, refusing features MiniMind lacks."""
    unsupported = {
        "attention_bias": raw.get("attention_bias", False),
        "mlp_bias": raw.get("mlp_bias", False),
        "pretraining_tp != 1": raw.get("pretraining_tp", 1) != 1,
        "use_sliding_window": raw.get("use_sliding_window", False),
        "mlp_only_layers": bool(raw.get("mlp_only_layers")),
        "decoder_sparse_step != 1": raw.get("decoder_sparse_step", 1) != 1,
    }
    bad = [name for name, value in unsupported.items() if value]
    if bad:
        raise UserError(f"{where}: {raw.get('model_type')} features not in MiniMind's architecture: {bad}")
    names = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
             "tie_word_embeddings", "bos_token_id", "eos_token_id"]
    fields = {k: raw[k] for k in names if k in raw}
    fields["rope_theta"] = _rope_theta(raw) or 10000.0  # transformers' default for Qwen3
    fields["inference_rope_scaling"] = _is_minimind_yarn(_rope_dict(raw), where)
    fields["tie_word_embeddings"] = raw.get("tie_word_embeddings", False)
    fields["qk_norm"] = raw.get("model_type") != "llama"
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
