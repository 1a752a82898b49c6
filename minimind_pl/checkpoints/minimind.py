"""MiniMind's own weight files: a bare state dict in MiniMind's parameter names (``full_sft_768.pth``, usually
fp16), which carries no config; :func:`infer_config` reads one off the tensor shapes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from minimind_pl.checkpoints.files import EMBED, HEAD
from minimind_pl.config import ModelConfig
from minimind_pl.errors import UserError


def save_minimind(state_dict: dict[str, torch.Tensor], out: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write a MiniMind ``.pth``: every tensor (tied ``lm_head.weight`` kept) in ``dtype``, MiniMind's names."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().to("cpu", dtype).contiguous() for k, v in state_dict.items()}, path)
    return path


def infer_config(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A ModelConfig dict read off a MiniMind state dict's tensor shapes.

    Sizes, heads (via the q/k norm width), experts and tying are in the shapes; what is not
    (``rope_theta``, ``max_position_embeddings``, ``rms_norm_eps``, YaRN) keeps MiniMind's defaults.
    """
    if EMBED not in state_dict and HEAD not in state_dict:
        raise UserError(f"cannot infer a model config: the state dict has neither {EMBED} nor {HEAD}")
    embed = state_dict.get(EMBED, state_dict.get(HEAD))
    layers = {int(k.split(".")[2]) for k in state_dict if k.startswith("model.layers.")}
    if not layers:
        raise UserError("cannot infer a model config: the state dict has no model.layers.*")
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
