"""``python main.py export``: write a checkpoint as a MiniMind ``.pth``, a Hugging Face (Qwen3) folder for
transformers / vLLM, or a GGUF file for llama.cpp / Ollama. The formats live in :mod:`minimind_pl.checkpoints`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from minimind_pl.checkpoints import open_checkpoint, save_hf_directory, save_minimind
from minimind_pl.checkpoints.files import DTYPES
from minimind_pl.checkpoints.gguf import save_gguf
from minimind_pl.errors import UserError
from minimind_pl.vision.vlm import MiniMindVLM


SHORT_DTYPE_NAMES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}  # GGUF's names
LONG_DTYPE_NAMES = {short: long for long, short in SHORT_DTYPE_NAMES.items()}


def export_command(
    ckpt: str,
    out: str,
    format: Literal["minimind", "hf", "gguf"] = "minimind",
    tokenizer: str | None = None,
    allow_tokenizer_mismatch: bool = False,
    preset: str | None = None,
    lora: str | None = None,
    vision_encoder: str | None = None,
    dtype: Literal["float16", "bfloat16", "float32", "f16", "bf16", "f32", "q8_0"] = "float16",
) -> Path:
    """Export a checkpoint as a MiniMind .pth state dict, a Hugging Face (Qwen3) directory or a GGUF file.

    Args:
        ckpt: A Lightning .ckpt of any stage, a MiniMind .pth (MiniMind-V's too) or a Hugging Face directory.
        out: Output file (``minimind``: e.g. ``full_sft_768.pth``; ``gguf``: e.g. ``model.gguf``) or directory
            (``hf``).
        format: ``minimind`` (the state dict MiniMind's eval_llm.py --weight loads), ``hf`` (config.json,
            model.safetensors, generation_config.json and the tokenizer, for transformers / vLLM) or ``gguf`` (one
            file with weights, tokenizer and chat template for llama.cpp, llama-server and Ollama; needs the
            ``gguf`` extra; MiniMind-3 as qwen3/qwen3moe, dense MiniMind2 as llama).
        tokenizer: Tokenizer directory for ``hf`` and ``gguf`` (default: the one recorded with the checkpoint).
        allow_tokenizer_mismatch: Use ``--tokenizer`` (or the recorded folder) even when it is not the tokenizer
            the checkpoint was trained with (checkpoints record its fingerprint): a warning instead of an error.
        preset: Model preset of a MiniMind .pth, which stores no config (default: read from the tensor shapes).
        lora: A LoRA adapter file to merge into the weights before exporting.
        vision_encoder: The vision tower folder of a MiniMind-V checkpoint, checked against the one its stage
            checkpoint recorded (the tower is never exported: MiniMind-V's .pth holds no tower weights).
        dtype: Weight dtype on disk: ``float16`` (MiniMind's), ``bfloat16`` or ``float32`` (also written ``f16``,
            ``bf16``, ``f32``); ``gguf`` also takes ``q8_0`` (8-bit blocks, llama.cpp's quantisation). GGUF keeps
            norms in f32 as llama.cpp's converter does.
    """
    if format not in ("minimind", "hf", "gguf"):
        raise UserError(f"unknown export format {format!r}; use 'minimind', 'hf' or 'gguf'")
    dtype = LONG_DTYPE_NAMES.get(dtype, dtype) if format != "gguf" else SHORT_DTYPE_NAMES.get(dtype, dtype)
    if format != "gguf" and dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r} for --format {format}; use one of {sorted(DTYPES)}")
    checkpoint = open_checkpoint(ckpt, lora)
    model = checkpoint.build_model(preset, merge=True, vision_encoder=vision_encoder)  # adapters folded into W
    if format in ("hf", "gguf") and isinstance(model, MiniMindVLM):
        raise UserError(f"{ckpt} is a vision-language model (MiniMind-V): no transformers or llama.cpp architecture holds "
                        f"its tower, projector and placeholder merge exactly, so there is no {format} export of it. "
                        f"Use --format minimind (MiniMind-V's .pth; the tower stays its own folder).")
    if format == "minimind":
        path = save_minimind(model.state_dict(), out, DTYPES[dtype])
    elif format == "gguf":
        path = save_gguf(model.state_dict(), model.config, checkpoint.tokenizer(tokenizer, allow_tokenizer_mismatch),
                         out, dtype)
    else:
        path = save_hf_directory(model.state_dict(), model.config, checkpoint.tokenizer(tokenizer, allow_tokenizer_mismatch), out, dtype)
    print(f"exported {ckpt} -> {path} ({format}, {dtype})")
    return path
