"""What every weight format shares: the one safe ``torch.load``, dtypes by name, and the names under which
the transformer's weights sit in each kind of file."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch

from minimind_pl.errors import UserError

STAGE_PREFIX = "model."  # a Stage keeps the transformer as ``self.model``: its weights are ``model.*`` in a .ckpt
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile wrappers that foreign files may carry
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def read_torch_file(path: str | Path, what: str = "checkpoint") -> Any:
    """Load a ``.ckpt`` / ``.pth`` / ``.bin`` safely (tensors and plain containers only), on the CPU.

    Tensors are memory-mapped, so reading a full stage checkpoint (optimizer state included) costs
    only what is used. Errors name the file; ``what`` says what it was meant to be.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a folder, not a file")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # pre-zip files cannot be mapped
    except Exception as err:  # noqa: BLE001 - re-raised with the file name
        raise UserError(f"cannot read {what} {path}: {err}") from err


def strip_prefix(state_dict: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The entries whose key starts with ``prefix``, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def strip_wrappers(key: str) -> str:
    """A parameter name without DDP / torch.compile prefixes."""
    while key.startswith(WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def nonfinite_tensors(tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating-point tensors holding NaN or inf (one host sync for all of them)."""
    named = [(name, t) for name, t in tensors if torch.is_tensor(t) and t.is_floating_point()]
    if not named:
        return []
    finite = torch.stack([torch.isfinite(t).all().to(named[0][1].device) for _, t in named])
    if bool(finite.all()):
        return []
    return [name for (name, _), ok in zip(named, finite.tolist()) if not ok]
