"""``python main.py export``: write a checkpoint as a MiniMind ``.pth`` or a Hugging Face (Qwen3) folder for
transformers / vLLM / llama.cpp. The formats themselves live in :mod:`minimind_pl.checkpoints`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from minimind_pl.checkpoints import open_checkpoint, save_hf_directory, save_minimind
from minimind_pl.checkpoints.files import DTYPES
from minimind_pl.errors import UserError
from minimind_pl.vision.vlm import MiniMindVLM


def export_command(
    ckpt: str,
    out: str,
    format: Literal["minimind", "hf"] = "minimind",
    tokenizer: str | None = None,
    allow_tokenizer_mismatch: bool = False,
    preset: str | None = None,
    lora: str | None = None,
    dtype: Literal["float16", "bfloat16", "float32"] = "float16",
) -> Path:
    """Export a checkpoint as a MiniMind .pth state dict or a Hugging Face (Qwen3) directory.

    Args:
        ckpt: A Lightning .ckpt of any stage, a MiniMind .pth (MiniMind-V's too) or a Hugging Face directory.
        out: Output file (``minimind``: e.g. ``full_sft_768.pth``) or directory (``hf``).
        format: ``minimind`` (the state dict MiniMind's eval_llm.py --weight loads) or ``hf`` (config.json,
            model.safetensors, generation_config.json and the tokenizer, for transformers / vLLM / llama.cpp).
        tokenizer: Tokenizer directory for ``hf`` (default: the one recorded with the checkpoint).
        allow_tokenizer_mismatch: Use ``--tokenizer`` (or the recorded folder) even when it is not the tokenizer
            the checkpoint was trained with (checkpoints record its fingerprint): a warning instead of an error.
        preset: Model preset of a MiniMind .pth, which stores no config (default: read from the tensor shapes).
        lora: A LoRA adapter file to merge into the weights before exporting.
        dtype: Weight dtype on disk: ``float16`` (MiniMind's), ``bfloat16`` or ``float32``.
    """
    if format not in ("minimind", "hf"):
        raise UserError(f"unknown export format {format!r}; use 'minimind' or 'hf'")
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    checkpoint = open_checkpoint(ckpt, lora)
    model = checkpoint.build_model(preset, merge=True)  # adapters folded into W
    if format == "hf" and isinstance(model, MiniMindVLM):
        raise UserError(f"{ckpt} is a vision-language model (MiniMind-V): no transformers architecture holds "
                        f"its tower, projector and placeholder merge exactly, so there is no HF export of it. "
                        f"Use --format minimind (MiniMind-V's .pth; the tower stays its own folder).")
    if format == "minimind":
        path = save_minimind(model.state_dict(), out, DTYPES[dtype])
    else:
        path = save_hf_directory(model.state_dict(), model.config, checkpoint.tokenizer(tokenizer, allow_tokenizer_mismatch), out, dtype)
    print(f"exported {ckpt} -> {path} ({format}, {dtype})")
    return path
