"""Reading model weights from every format the project meets.

- a Lightning ``.ckpt`` written by any stage (weights under ``state_dict`` with the stage's ``model.``
  prefix, the model config under ``model_config``),
- a MiniMind ``.pth`` (a bare state dict in MiniMind's parameter names, usually fp16),
- a Hugging Face directory (``config.json`` + ``model.safetensors``), as written by ``export``.

Everything returns MiniMind parameter names, so ``MiniMindForCausalLM.load_weights`` takes the result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

STAGE_PREFIX = "model."  # a Stage keeps the transformer as ``self.model``


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a Lightning checkpoint or a ``.pth`` safely (tensors and plain containers only)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file name
        raise ValueError(f"cannot read checkpoint {path}: {err}") from err


def load_model_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Return ``(state_dict, config_dict_or_None)`` in MiniMind names for a .ckpt, .pth or HF directory.

    The config is known for Lightning checkpoints and HF directories; a MiniMind ``.pth`` holds only
    weights, so the caller supplies the config (a preset or ``--model.config.*``).
    """
    path = Path(path)
    if path.is_dir():
        from minimind_pl.export import load_hf_directory  # only needed for HF folders

        return load_hf_directory(path)
    raw = read_checkpoint(path)
    if "state_dict" in raw and isinstance(raw["state_dict"], dict):
        return _transformer_weights(raw["state_dict"], path), raw.get("model_config")
    if raw and all(isinstance(v, torch.Tensor) for v in raw.values()):
        return raw, None
    raise ValueError(f"{path} is neither a Lightning checkpoint nor a MiniMind state dict")


def _transformer_weights(stage_state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Keep the stage's transformer weights (``model.*``), dropping what sits beside it."""
    weights = {k[len(STAGE_PREFIX):]: v for k, v in stage_state.items() if k.startswith(STAGE_PREFIX)}
    if not weights:
        raise ValueError(f"{path} holds no transformer weights (no keys starting with '{STAGE_PREFIX}')")
    return weights
