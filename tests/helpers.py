"""Builders shared by several test files (``tests`` is on pytest's ``pythonpath``)."""

from __future__ import annotations

from pathlib import Path

import torch

from minimind_pl.config import ModelConfig
from minimind_pl.model import MiniMindForCausalLM


def random_model(seed: int = 0, **overrides) -> MiniMindForCausalLM:
    """A debug-size model whose every weight is random (norm weights around one), in eval mode."""
    torch.manual_seed(seed)
    model = MiniMindForCausalLM(ModelConfig.from_preset("debug", **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    return model.eval()


def write_stage_checkpoint(model: MiniMindForCausalLM, path: Path, tokenizer_dir: Path) -> Path:
    """A file in the layout a Stage checkpoint has (weights under ``model.``, config, linked tokenizer)."""
    torch.save({"state_dict": {"model." + k: v for k, v in model.state_dict().items()},
                "model_config": model.config.to_dict(),
                "hyper_parameters": {"tokenizer": str(tokenizer_dir)}}, path)
    return path


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Float32 logits of a forward pass without gradients."""
    with torch.no_grad():
        return model(ids).logits.float()
