"""Loading a trained model and its tokenizer for chat, generation, serving, evaluation and export."""

from __future__ import annotations

from pathlib import Path

import torch

from minimind_pl.checkpoints import load_model_weights, read_checkpoint
from minimind_pl.config import ModelConfig
from minimind_pl.export import infer_config
from minimind_pl.lora import apply_lora_file, base_and_adapter
from minimind_pl.model import MiniMindForCausalLM
from minimind_pl.tokenizer import Tokenizer


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` means CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(ckpt: str, preset: str | None = None, device: str = "auto",
               lora: str | None = None) -> MiniMindForCausalLM:
    """Build the transformer from a Lightning .ckpt, MiniMind .pth or HF directory, in eval mode.

    A .pth carries no config: ``preset`` names it; without one the config is read off the tensor shapes
    (``export.infer_config``: sizes, heads, experts; rope_theta and context length keep MiniMind's defaults).
    ``lora`` adds an adapter file on top, unmerged; a LoRA stage checkpoint given as ``ckpt`` loads
    its recorded base plus its adapters.
    """
    ckpt, lora = base_and_adapter(ckpt, lora)
    state_dict, saved_config = load_model_weights(ckpt)
    if saved_config is not None:
        config = ModelConfig.from_dict(saved_config)
    elif preset is not None:
        config = ModelConfig.from_preset(preset)
    else:
        config = ModelConfig.from_dict(infer_config(state_dict))
    model = MiniMindForCausalLM(config)
    model.load_weights({k: v.float() for k, v in state_dict.items()}, strict=True)
    if lora is not None:
        apply_lora_file(model, lora)
    return model.to(pick_device(device)).eval()


def tokenizer_dir_of(ckpt: str) -> str | None:
    """The tokenizer a checkpoint was trained with: the stage's linked ``tokenizer`` or an HF folder."""
    path = Path(ckpt)
    if path.is_dir():
        return str(path) if (path / "tokenizer.json").exists() else None
    if path.suffix == ".ckpt":
        return read_checkpoint(path).get("hyper_parameters", {}).get("tokenizer")
    return None


def load_tokenizer(ckpt: str, tokenizer: str | None = None) -> Tokenizer:
    """``tokenizer`` if given, else the one recorded with the checkpoint; a clear error if neither."""
    directory = tokenizer or tokenizer_dir_of(ckpt)
    if directory is None:
        raise ValueError(f"no tokenizer is recorded with {ckpt}; pass --tokenizer DIR")
    return Tokenizer.from_file(directory)
