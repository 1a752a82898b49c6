"""LoRA adapter files: write them, recognise and read them, and put them on a model.

Three kinds are read:

- a checkpoint of the ``LoRA`` stage (Lightning ``.ckpt``; adapter tensors under ``state_dict`` with the
  stage's ``model.`` prefix, the settings under ``lora_config``, the base under ``lora_base``), also as the folder
  a sharded strategy writes (``checkpoints.sharded``),
- a file written by :func:`save_lora` (``lora_state_dict``, ``lora_config``, ``model_config``, ``lora_base``),
- a MiniMind LoRA ``.pth`` (keys ``<module>.lora.A.weight`` / ``<module>.lora.B.weight``, scale 1).

The mechanism itself (``LoRALinear``, apply, merge) is :mod:`minimind_pl.lora`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from minimind_pl.checkpoints.files import STAGE_PREFIX, read_torch_file, strip_prefix, strip_wrappers
from minimind_pl.checkpoints.sharded import read_sharded_folder
from minimind_pl.config import architecture_diff
from minimind_pl.errors import UserError
from minimind_pl.lora import (
    LORA_SUFFIXES, LoRAConfig, LoRALinear, apply_lora, lora_config_of, lora_modules, lora_state_dict, targets_of,
)

MINIMIND_SUFFIXES = {".lora.A.weight": ".lora_A", ".lora.B.weight": ".lora_B"}


@dataclass
class LoRAFile:
    """What an adapter file holds.

    Args:
        tensors: Adapter tensors in this project's names (``<module>.lora_A`` / ``<module>.lora_B``).
        config: Rank, alpha, dropout and targets of the adapters.
        model_config: The base model's ``ModelConfig`` as a dict, when recorded.
        base: Path of the base weights the adapters were trained on (as given), when recorded.
        base_absolute: The same path made absolute when the adapters were saved, when recorded.
    """

    tensors: dict[str, Tensor]
    config: LoRAConfig
    model_config: Optional[dict[str, Any]] = None
    base: Optional[str] = None
    base_absolute: Optional[str] = None


# ----------------------------------------------------------------------------- writing


def adapter_record(lora_config: LoRAConfig, base: Optional[str]) -> dict[str, Any]:
    """The entries that make a file an adapter file (beside its tensors): settings and the base's path."""
    return {"lora_config": lora_config.to_dict(), "lora_base": base, "lora_base_absolute": absolute_path(base)}


def save_lora(model: nn.Module, path: str | Path, base: Optional[str] = None) -> Path:
    """Write a standalone adapter file: the adapter tensors, their settings, the base config and path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = getattr(model, "config", None)
    torch.save({
        "lora_state_dict": {k: v.cpu() for k, v in lora_state_dict(model).items()},
        "model_config": config.to_dict() if hasattr(config, "to_dict") else None,
        **adapter_record(lora_config_of(model), base),
    }, path)
    return path


def absolute_path(path: Optional[str]) -> Optional[str]:
    """``path`` made absolute (None stays None), so an adapter finds its base from any working directory."""
    return str(Path(path).resolve()) if path else None


# ----------------------------------------------------------------------------- reading


def is_adapter(raw: Any) -> bool:
    """True when a loaded file (see ``read_torch_file``) is an adapter file of one of the three kinds."""
    if not isinstance(raw, dict):
        return False
    if "lora_config" in raw or "lora_state_dict" in raw:
        return True
    keys = list(raw["state_dict"] if isinstance(raw.get("state_dict"), dict) else raw)
    return bool(keys) and all(str(k).endswith((*LORA_SUFFIXES, *MINIMIND_SUFFIXES)) for k in keys)


def adapter_from_raw(raw: Any, path: str | Path) -> LoRAFile:
    """The adapters of a loaded adapter file; ValueError naming ``path`` if it holds none."""
    if not isinstance(raw, dict):
        raise UserError(f"{path} is not a LoRA adapter file")
    if isinstance(raw.get("state_dict"), dict):  # Lightning checkpoint of the LoRA stage
        tensors = {k: v for k, v in strip_prefix(raw["state_dict"], STAGE_PREFIX).items() if k.endswith(LORA_SUFFIXES)}
        return _lora_file(path, tensors, raw)
    if isinstance(raw.get("lora_state_dict"), dict):
        return _lora_file(path, raw["lora_state_dict"], raw)
    return _lora_file(path, _from_minimind_names(raw, path), {})


def read_lora_file(path: str | Path) -> LoRAFile:
    """Read a LoRA stage checkpoint (a file, or a folder of a sharded strategy: FSDP ``state_dict_type="sharded"``,
    DeepSpeed), a ``save_lora`` file or a MiniMind LoRA ``.pth``."""
    path = Path(path)
    if not path.is_dir():
        return adapter_from_raw(read_torch_file(path, "LoRA adapter file"), path)
    raw = read_sharded_folder(path)
    if raw is None:
        raise UserError(f"the LoRA adapter {path} is a folder but not a checkpoint folder of FSDP (sharded) or "
                        "DeepSpeed; give an adapter file (.ckpt of the LoRA stage, save_lora file, MiniMind .pth)")
    return adapter_from_raw(raw, path)


def _lora_file(path: str | Path, tensors: dict[str, Tensor], raw: dict[str, Any]) -> LoRAFile:
    """Check the tensors and complete the settings (inferred from the names and shapes when absent)."""
    tensors = {strip_wrappers(k): v for k, v in tensors.items()}
    if not tensors or not all(k.endswith(LORA_SUFFIXES) for k in tensors):
        others = sorted(k for k in tensors if not k.endswith(LORA_SUFFIXES))[:5]
        raise UserError(f"{path} holds no LoRA adapter tensors" + (f" (found e.g. {others})" if others else ""))
    modules = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in tensors))  # file order
    unpaired = [m for m in modules if f"{m}.lora_A" not in tensors or f"{m}.lora_B" not in tensors]
    if unpaired:
        raise UserError(f"{path}: adapters without both lora_A and lora_B: {unpaired[:5]}")
    config = raw.get("lora_config")
    if config is None:  # MiniMind files: scale 1, targets from the names
        rank = tensors[f"{modules[0]}.lora_A"].shape[0]
        config = {"rank": int(rank), "alpha": None, "dropout": 0.0, "targets": targets_of(modules)}
    return LoRAFile(tensors, LoRAConfig(**config), raw.get("model_config"), raw.get("lora_base"),
                    raw.get("lora_base_absolute"))


def _from_minimind_names(raw: dict[str, Any], path: str | Path) -> dict[str, Tensor]:
    """MiniMind's ``<module>.lora.A.weight`` / ``.lora.B.weight`` -> ``<module>.lora_A`` / ``.lora_B``."""
    renamed = {}
    for key, value in raw.items():
        if not isinstance(value, Tensor):
            raise UserError(f"{path} is not a LoRA adapter file (entry {key!r} is not a tensor)")
        for theirs, ours in MINIMIND_SUFFIXES.items():
            if key.endswith(theirs):
                key = key[: -len(theirs)] + ours
        renamed[key] = value
    return renamed


def resolve_base(lora_file: LoRAFile, path: str | Path) -> str:
    """The base weights recorded with an adapter: as given, then absolute, then relative to the adapter's folder."""
    if not lora_file.base:
        raise UserError(f"the LoRA adapter {path} records no base model; pass the base checkpoint and --lora")
    for candidate in (lora_file.base, lora_file.base_absolute, Path(path).parent / lora_file.base):
        if candidate and Path(candidate).exists():
            return str(candidate)
    raise FileNotFoundError(f"the base model of the LoRA adapter {path} is not at {lora_file.base}; "
                            "pass the base checkpoint and --lora")


# ----------------------------------------------------------------------------- applying


def apply_adapter(model: nn.Module, lora_file: LoRAFile, path: str | Path = "<adapters>") -> nn.Module:
    """Add ``lora_file``'s adapters to ``model`` (unmerged) and return it.

    Raises ValueError naming the problem when the adapters do not fit the model: a different base
    config, a module the model lacks, or a shape that differs (an adapter trained on another base).
    """
    check_base_config(model, lora_file, path)
    check_adapter_fits(model, lora_file.tensors, path)
    if not lora_modules(model):
        apply_lora(model, lora_file.config)
    load_lora_tensors(model, lora_file.tensors, path)
    return model


def apply_lora_file(model: nn.Module, path: str | Path) -> nn.Module:
    """Add the adapters stored at ``path`` to ``model`` (unmerged) and return it."""
    return apply_adapter(model, read_lora_file(path), path)


def check_base_config(model: nn.Module, lora_file: LoRAFile, path: str | Path) -> None:
    """Raise ValueError when the file records a base config whose architecture differs from the model's."""
    config = getattr(model, "config", None)
    if lora_file.model_config is None or not hasattr(config, "to_dict"):
        return
    diff = architecture_diff(lora_file.model_config, config)
    if diff:
        raise UserError(f"the LoRA adapter {path} was trained on another base model (adapter != model: {diff})"
                         + (f"; its base was {lora_file.base}" if lora_file.base else ""))


def check_adapter_fits(model: nn.Module, tensors: dict[str, Tensor], path: str | Path) -> None:
    """Raise ValueError unless every adapter names a linear layer of the model with matching shapes."""
    problems = []
    for key, tensor in sorted(tensors.items()):
        module_name, kind = key.rsplit(".", 1)
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            problems.append(f"{key}: the model has no module {module_name}")
            continue
        if not isinstance(module, (nn.Linear, LoRALinear)):
            problems.append(f"{key}: {module_name} is a {type(module).__name__}, not a linear layer")
            continue
        rank = tensors[f"{module_name}.lora_A"].shape[0]
        expected = (rank, module.in_features) if kind == "lora_A" else (module.out_features, rank)
        if tuple(tensor.shape) != expected:
            problems.append(f"{key}: adapter shape {tuple(tensor.shape)}, the model needs {expected}")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise UserError(f"the LoRA adapter {path} does not fit this base model (wrong base?): "
                         + "; ".join(problems[:5]) + more)


def load_lora_tensors(model: nn.Module, tensors: dict[str, Tensor], path: str | Path = "<adapters>") -> None:
    """Copy adapter tensors into a model that already has adapters; every adapter must be covered."""
    own = lora_state_dict(model)
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise UserError(f"the LoRA adapter {path} does not match the model's adapters: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, tensor in tensors.items():
            params[key].copy_(tensor.to(params[key].dtype))
