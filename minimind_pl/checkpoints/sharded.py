"""Checkpoint folders written by the sharded strategies, read as one ordinary stage checkpoint.

- FSDP with ``state_dict_type="sharded"``: a folder of ``torch.distributed.checkpoint`` shards (``.metadata``,
  ``*.distcp``) whose tensors sit under ``model`` / ``optimizer_<i>``, plus ``meta.pt`` with everything else
  (hyper-parameters, ``model_config``, ``stage``, ...). Read without any process group.
- DeepSpeed: a folder with ``latest`` (the tag) and ``<tag>/*model_states.pt`` plus ZeRO partitions.
  Consolidated to full float32 weights by DeepSpeed's own reader (the ``deepspeed`` extra).

:func:`read_sharded_folder` returns the same dict a Lightning ``.ckpt`` holds (``state_dict`` and the extra
keys), so every tool opens these folders as it opens a file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from minimind_pl.errors import UserError

FSDP_META_FILE = "meta.pt"  # Lightning's name for the non-tensor part of a sharded checkpoint
DCP_INDEX_FILE = ".metadata"  # torch.distributed.checkpoint's index of the shards


def is_fsdp_sharded(path: Path) -> bool:
    """A folder written by Lightning's FSDP strategy with ``state_dict_type="sharded"``."""
    return (path / FSDP_META_FILE).is_file() and (path / DCP_INDEX_FILE).is_file()


def is_deepspeed(path: Path) -> bool:
    """A DeepSpeed checkpoint folder (as Lightning's DeepSpeed strategy saves a ``.ckpt``)."""
    return (path / "latest").is_file() or any(path.glob("*/*model_states.pt"))


def read_sharded_folder(path: Path) -> Optional[dict[str, Any]]:
    """The checkpoint dict of a sharded FSDP or DeepSpeed folder; None for any other folder."""
    if is_fsdp_sharded(path):
        return read_fsdp_sharded(path)
    if is_deepspeed(path):
        return read_deepspeed(path)
    return None


def read_fsdp_sharded(path: Path) -> dict[str, Any]:
    """All shards gathered into one state dict in memory (no process group), with ``meta.pt`` beside it."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    tensors: dict[str, Any] = {}
    try:
        _load_state_dict(tensors, storage_reader=FileSystemReader(path), planner=_EmptyStateDictLoadPlanner(),
                         no_dist=True)
        meta = torch.load(path / FSDP_META_FILE, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the folder's name
        raise UserError(f"cannot read the sharded checkpoint folder {path}: {err}") from err
    if "model" not in tensors:
        raise UserError(f"{path} is a torch.distributed.checkpoint folder without model weights ('model' key)")
    return {**meta, "state_dict": tensors["model"]}


def read_deepspeed(path: Path) -> dict[str, Any]:
    """DeepSpeed's ZeRO partitions consolidated into full float32 weights, with the checkpoint's other keys (what the
    stage stored: hyper-parameters, ``model_config``, ``stage``, ...), read from rank 0's model-state file."""
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as err:
        raise UserError(f"{path} is a DeepSpeed checkpoint folder; reading it needs DeepSpeed: "
                        "pip install -e \".[deepspeed]\"") from err
    tag = (path / "latest").read_text().strip() if (path / "latest").is_file() else None
    states = sorted((path / tag).glob("*model_states.pt") if tag else path.glob("*/*model_states.pt"))
    if not states:
        raise UserError(f"{path} looks like a DeepSpeed checkpoint folder but holds no *model_states.pt file")
    # rank 0's file: mp_rank_00_model_states.pt (ZeRO-1/2), zero_pp_rank_0_mp_rank_00_model_states.pt (ZeRO-3)
    extra = torch.load(states[0], map_location="cpu", weights_only=False, mmap=True)  # the weights are not read
    weights = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=states[0].parent.name)
    # the engine's own module and optimizer states are not needed: the weights come consolidated
    return {**{k: v for k, v in extra.items() if k not in ("module", "optimizer")}, "state_dict": weights}
