"""MiniMind's own weight files: a bare state dict in MiniMind's parameter names (``full_sft_768.pth``, usually
fp16), which carries no config; :func:`infer_config` reads one off the tensor shapes. MiniMind2's files (no
q/k norms; MoE with a shared expert) and MiniMind-3's are told apart by their keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from minimind_pl.checkpoints.files import EMBED, HEAD
from minimind_pl.config import MINIMIND2_DEFAULTS, ModelConfig
from minimind_pl.errors import UserError
from minimind_pl.vision.config import VISION_PRESETS


def save_minimind(state_dict: dict[str, torch.Tensor], out: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write a MiniMind ``.pth``: every tensor (tied ``lm_head.weight`` kept) in ``dtype``, MiniMind's names."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().to("cpu", dtype).contiguous() for k, v in state_dict.items()}, path)
    return path


def infer_config(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A ModelConfig dict read off a MiniMind state dict's tensor shapes.

    Sizes, experts (routed and shared) and tying are in the shapes. With q/k norms (MiniMind-3) their width
    is head_dim, which gives the heads; without them the file is MiniMind2's: head_dim = hidden / 8 (its
    8 query heads), the key/value heads are k_proj's rows / head_dim, and what the shapes do not hold takes
    MiniMind2's values (``MINIMIND2_DEFAULTS``: eps 1e-5, top-2, balancing per sequence). What no shape
    holds (``rope_theta``, ``max_position_embeddings``, YaRN) keeps MiniMind's defaults either way.
    """
    if EMBED not in state_dict and HEAD not in state_dict:
        raise UserError(f"cannot infer a model config: the state dict has neither {EMBED} nor {HEAD}")
    embed = state_dict.get(EMBED, state_dict.get(HEAD))
    layers = {int(k.split(".")[2]) for k in state_dict if k.startswith("model.layers.")}
    if not layers:
        raise UserError("cannot infer a model config: the state dict has no model.layers.*")
    p = "model.layers.0."
    fields: dict[str, Any] = {
        "vocab_size": embed.shape[0], "hidden_size": embed.shape[1], "num_hidden_layers": max(layers) + 1,
        "tie_word_embeddings": HEAD not in state_dict or EMBED not in state_dict
        or torch.equal(state_dict[HEAD], state_dict[EMBED]),
    }
    fields.update(_attention_fields(state_dict, p, fields["hidden_size"]))
    fields.update(_mlp_fields(state_dict, p, minimind2=not fields.get("qk_norm", True)))
    if fields["head_dim"] * fields["num_attention_heads"] == fields["hidden_size"]:
        fields.pop("head_dim")  # the default; keeps the config identical to a preset's
    return ModelConfig.from_dict(fields).to_dict()


PROJECTOR_PREFIX = "vision_proj."
# MiniMind-V's projector keys: minimind-3v's MLP (LayerNorm first) and MiniMind2-V's single Linear
PROJECTOR_KEYS = {"mlp": PROJECTOR_PREFIX + "mlp.0.weight", "linear": PROJECTOR_PREFIX + "vision_proj.0.weight"}


def infer_vision_config(state_dict: dict[str, torch.Tensor], image_token_len: int | None = None) -> dict[str, Any]:
    """A VisionConfig dict read off a MiniMind-V state dict's projector: its keys give the generation
    (minimind-3v's MLP or MiniMind2-V's Linear, whose preset gives the placeholder), its input width the tower's.
    ``image_token_len`` (the tower's patch count, when a tower is at hand) replaces the preset's."""
    for projector, key in PROJECTOR_KEYS.items():
        if key in state_dict:
            width = state_dict[key].shape[0 if projector == "mlp" else 1]  # LayerNorm (F,) / Linear (C, F)
            preset = VISION_PRESETS["minimind-3v" if projector == "mlp" else "minimind2-v"].to_dict()
            return {**preset, "image_hidden_size": int(width),
                    "image_token_len": image_token_len or preset["image_token_len"]}
    raise UserError(f"the vision_proj.* weights are neither MiniMind-V's MLP projector ({PROJECTOR_KEYS['mlp']}) "
                    f"nor MiniMind2-V's linear one ({PROJECTOR_KEYS['linear']})")


def _attention_fields(state_dict: dict[str, torch.Tensor], p: str, hidden_size: int) -> dict[str, Any]:
    """Heads and head width of layer prefix ``p``: from the q/k norm width, else MiniMind2's 8 heads."""
    q_rows, k_rows = (state_dict[p + f"self_attn.{n}_proj.weight"].shape[0] for n in "qk")
    norm = state_dict.get(p + "self_attn.q_norm.weight")
    if norm is not None:
        head_dim = norm.shape[0]
        return {"head_dim": head_dim, "num_attention_heads": q_rows // head_dim, "num_key_value_heads": k_rows // head_dim}
    heads = MINIMIND2_DEFAULTS["num_attention_heads"]
    head_dim = hidden_size // heads
    if q_rows != hidden_size or k_rows % head_dim:
        raise UserError(f"cannot infer the attention heads: without q/k norms (MiniMind2) the file must have "
                        f"{heads} heads of hidden/{heads} = {head_dim}, but q_proj has {q_rows} rows and k_proj "
                        f"{k_rows}; give the config (--preset) instead")
    return {"qk_norm": False, "rms_norm_eps": MINIMIND2_DEFAULTS["rms_norm_eps"], "head_dim": head_dim,
            "num_attention_heads": heads, "num_key_value_heads": k_rows // head_dim}


def _mlp_fields(state_dict: dict[str, torch.Tensor], p: str, minimind2: bool) -> dict[str, Any]:
    """MLP / MoE sizes of layer prefix ``p`` (a MiniMind2 MoE also takes its routing defaults)."""
    experts = {int(k.split(".")[5]) for k in state_dict if k.startswith(p + "mlp.experts.")}
    if not experts:
        return {"intermediate_size": state_dict[p + "mlp.gate_proj.weight"].shape[0]}
    width = state_dict[p + "mlp.experts.0.gate_proj.weight"].shape[0]
    shared = {int(k.split(".")[5]) for k in state_dict if k.startswith(p + "mlp.shared_experts.")}
    fields: dict[str, Any] = {"use_moe": True, "num_experts": max(experts) + 1, "moe_intermediate_size": width,
                              "n_shared_experts": len(shared), "intermediate_size": width}
    if shared:
        fields["intermediate_size"] = state_dict[p + "mlp.shared_experts.0.gate_proj.weight"].shape[0]
    if minimind2:
        fields.update({k: MINIMIND2_DEFAULTS[k] for k in ("num_experts_per_tok", "aux_loss_alpha", "seq_aux")})
    return fields
