"""Low-rank adapters (LoRA): wrap chosen linear layers, save only the adapters, merge them back.

``LoRALinear`` replaces an ``nn.Linear`` in place and keeps the base weight under its old name
(``...q_proj.weight``) as a frozen parameter, beside two new trainable matrices ``lora_A`` (r, in) and
``lora_B`` (out, r). Its output is ``x W^T + (alpha / r) * dropout(x) A^T B^T``; ``B`` starts at zero,
so a fresh adapter leaves the model exactly as it was. Base checkpoints therefore still load into the
wrapped model, and an adapter file holds only ``*.lora_A`` / ``*.lora_B`` tensors.

Adapters are applied by module name: every linear layer whose last name component is in ``targets``.
The default is every attention and MLP projection (``DEFAULT_TARGETS``); MiniMind itself wraps only the
square matrices, which for minimind-3 are ``q_proj`` and ``o_proj`` (``MINIMIND_TARGETS``).

Adapter files read by ``read_lora_file`` / ``apply_lora_file``:

- a checkpoint of the ``LoRA`` stage (Lightning ``.ckpt``; adapter tensors under ``state_dict`` with the
  stage's ``model.`` prefix, the settings under ``lora_config``, the base under ``lora_base``),
- a file written by ``save_lora`` (``lora_state_dict``, ``lora_config``, ``model_config``, ``lora_base``),
- a MiniMind LoRA ``.pth`` (keys ``<module>.lora.A.weight`` / ``<module>.lora.B.weight``, scale 1).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MINIMIND_TARGETS = ("q_proj", "o_proj")  # MiniMind wraps the square matrices: these two for minimind-3
LORA_SUFFIXES = (".lora_A", ".lora_B")
_STAGE_PREFIX = "model."  # a Stage keeps the transformer as ``self.model``
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile wrappers in foreign files


@dataclass
class LoRAConfig:
    """Settings of a set of adapters, stored with every adapter file.

    Args:
        rank: Inner dimension r of the low-rank update B @ A.
        alpha: Scale numerator: the update is multiplied by alpha / r. None means alpha = r (scale 1,
            MiniMind's choice).
        dropout: Dropout on the adapter's input (training only).
        targets: Last name components of the linear layers to wrap (e.g. ``q_proj``).
    """

    rank: int = 8
    alpha: Optional[float] = None
    dropout: float = 0.0
    targets: tuple[str, ...] = field(default=DEFAULT_TARGETS)

    def __post_init__(self) -> None:
        """Normalise ``targets`` to a tuple and check the numbers."""
        self.targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError("LoRA targets must name at least one linear layer (e.g. q_proj)")

    @property
    def scaling(self) -> float:
        """alpha / r."""
        return (self.rank if self.alpha is None else self.alpha) / self.rank

    def to_dict(self) -> dict[str, Any]:
        """Plain-container form for checkpoints (``targets`` as a list)."""
        return {**asdict(self), "targets": list(self.targets)}


class LoRALinear(nn.Module):
    """A linear layer plus a trainable low-rank update: ``y = x W^T + b + s * dropout(x) A^T B^T``.

    The base ``weight`` (and ``bias``) keep their names and are frozen; ``lora_A`` starts as
    normal(0, 0.02) (MiniMind's init) and ``lora_B`` at zero, so the wrapped layer starts out identical.
    """

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: Optional[float] = None, dropout: float = 0.0) -> None:
        """Wrap ``base`` (its parameters are shared, not copied).

        Args:
            base: The linear layer to adapt.
            rank: Inner dimension r of the update.
            alpha: The update is scaled by alpha / r; None means alpha = r.
            dropout: Dropout on the adapter's input (training only).
        """
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha = rank, float(rank if alpha is None else alpha)
        self.scaling = self.alpha / rank
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **like).normal_(0.0, 0.02))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **like))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in) -> (..., out)."""
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + update * self.scaling

    def delta_weight(self) -> Tensor:
        """The update as a dense matrix, ``s * B @ A`` (out, in), computed in float32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding ``W + s * B @ A`` in the base weight's dtype."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        """Shown by ``print(model)``."""
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, alpha={self.alpha}"


# ----------------------------------------------------------------------------- applying and merging


def apply_lora(model: nn.Module, config: LoRAConfig = LoRAConfig()) -> list[str]:
    """Wrap every ``nn.Linear`` whose last name component is in ``config.targets``; freeze the rest.

    Returns the names of the wrapped modules. Raises ValueError when a target matches nothing (a typo,
    or MoE names), naming the linear layers the model has, or when the model already has adapters.
    """
    if lora_modules(model):
        raise ValueError("the model already has LoRA adapters; merge_lora(model) first to stack another")
    chosen = [(name, m) for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in config.targets]
    found = {name.rsplit(".", 1)[-1] for name, _ in chosen}
    if set(config.targets) - found:
        available = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"LoRA targets {sorted(set(config.targets) - found)} match no linear layer; "
                         f"the model's linear layers are named {available}")
    for name, module in chosen:
        _replace_module(model, name, LoRALinear(module, config.rank, config.alpha, config.dropout))
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith(LORA_SUFFIXES))
    return [name for name, _ in chosen]


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every ``LoRALinear`` by a plain ``nn.Linear`` with ``W + (alpha/r) B A``, in place.

    The result has exactly the base model's parameter names (ready for export); returns ``model``.
    """
    for name, module in lora_modules(model).items():
        _replace_module(model, name, module.merged())
    return model


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's adapters by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_config_of(model: nn.Module) -> LoRAConfig:
    """The ``LoRAConfig`` that produced the model's adapters (rank, alpha, dropout, targets)."""
    modules = lora_modules(model)
    if not modules:
        raise ValueError("the model has no LoRA adapters")
    first = next(iter(modules.values()))
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    return LoRAConfig(rank=first.rank, alpha=first.alpha, dropout=dropout, targets=targets_of(modules))


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the adapter tensors (``<module>.lora_A`` / ``<module>.lora_B``), detached."""
    return {k: v.detach() for k, v in model.state_dict().items() if k.endswith(LORA_SUFFIXES)}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, shared (tied) parameters counted once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Set the submodule at dotted path ``name`` to ``new``."""
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


# ----------------------------------------------------------------------------- adapter files


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


def save_lora(model: nn.Module, path: str | Path, base: Optional[str] = None) -> Path:
    """Write a standalone adapter file: the adapter tensors, their settings, the base config and path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = getattr(model, "config", None)
    torch.save({
        "lora_state_dict": {k: v.cpu() for k, v in lora_state_dict(model).items()},
        "lora_config": lora_config_of(model).to_dict(),
        "model_config": config.to_dict() if hasattr(config, "to_dict") else None,
        "lora_base": base,
        "lora_base_absolute": absolute_path(base),
    }, path)
    return path


def read_lora_file(path: str | Path) -> LoRAFile:
    """Read a LoRA stage checkpoint, a ``save_lora`` file or a MiniMind LoRA ``.pth``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA adapter file not found: {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file name
        raise ValueError(f"cannot read LoRA adapter file {path}: {err}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path} is not a LoRA adapter file")
    if isinstance(raw.get("state_dict"), dict):  # Lightning checkpoint of the LoRA stage
        tensors = {k[len(_STAGE_PREFIX):]: v for k, v in raw["state_dict"].items()
                   if k.startswith(_STAGE_PREFIX) and k.endswith(LORA_SUFFIXES)}
        return _lora_file(path, tensors, raw)
    if isinstance(raw.get("lora_state_dict"), dict):
        return _lora_file(path, raw["lora_state_dict"], raw)
    return _lora_file(path, _from_minimind_names(raw, path), {})


def _lora_file(path: Path, tensors: dict[str, Tensor], raw: dict[str, Any]) -> LoRAFile:
    """Check the tensors and complete the settings (inferred from the names and shapes when absent)."""
    tensors = {_strip_wrappers(k): v for k, v in tensors.items()}
    if not tensors or not all(k.endswith(LORA_SUFFIXES) for k in tensors):
        others = sorted(k for k in tensors if not k.endswith(LORA_SUFFIXES))[:5]
        raise ValueError(f"{path} holds no LoRA adapter tensors" + (f" (found e.g. {others})" if others else ""))
    modules = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in tensors))  # file order
    unpaired = [m for m in modules if f"{m}.lora_A" not in tensors or f"{m}.lora_B" not in tensors]
    if unpaired:
        raise ValueError(f"{path}: adapters without both lora_A and lora_B: {unpaired[:5]}")
    config = raw.get("lora_config")
    if config is None:  # MiniMind files: scale 1, targets from the names
        rank = tensors[f"{modules[0]}.lora_A"].shape[0]
        config = {"rank": int(rank), "alpha": None, "dropout": 0.0, "targets": targets_of(modules)}
    return LoRAFile(tensors, LoRAConfig(**config), raw.get("model_config"), raw.get("lora_base"),
                    raw.get("lora_base_absolute"))


def _from_minimind_names(raw: dict[str, Any], path: Path) -> dict[str, Tensor]:
    """MiniMind's ``<module>.lora.A.weight`` / ``.lora.B.weight`` -> ``<module>.lora_A`` / ``.lora_B``."""
    renamed = {}
    for key, value in raw.items():
        if not isinstance(value, Tensor):
            raise ValueError(f"{path} is not a LoRA adapter file (entry {key!r} is not a tensor)")
        for theirs, ours in ((".lora.A.weight", ".lora_A"), (".lora.B.weight", ".lora_B")):
            if key.endswith(theirs):
                key = key[: -len(theirs)] + ours
        renamed[key] = value
    return renamed


def _strip_wrappers(key: str) -> str:
    """Drop DDP / torch.compile prefixes that foreign files may carry."""
    while key.startswith(_WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def apply_lora_file(model: nn.Module, path: str | Path) -> nn.Module:
    """Add the adapters stored at ``path`` to ``model`` (unmerged) and return it.

    Raises ValueError naming the problem when the adapters do not fit the model: a different base
    config, a module the model lacks, or a shape that differs (an adapter trained on another base).
    """
    lora_file = read_lora_file(path)
    check_base_config(model, lora_file, path)
    check_adapter_fits(model, lora_file.tensors, path)
    if not lora_modules(model):
        apply_lora(model, lora_file.config)
    load_lora_tensors(model, lora_file.tensors, path)
    return model


def check_base_config(model: nn.Module, lora_file: LoRAFile, path: str | Path) -> None:
    """Raise ValueError when the file records a base config whose shapes differ from the model's."""
    config = getattr(model, "config", None)
    if lora_file.model_config is None or not hasattr(config, "to_dict"):
        return
    shape_fields = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "head_dim", "intermediate_size", "use_moe", "num_experts", "moe_intermediate_size")
    ours, theirs = config.to_dict(), lora_file.model_config
    diff = [f"{k}: adapter {theirs[k]!r} != model {ours[k]!r}" for k in shape_fields
            if k in theirs and theirs[k] != ours.get(k)]
    if diff:
        raise ValueError(f"the LoRA adapter {path} was trained on another base model ({', '.join(diff)})"
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
        raise ValueError(f"the LoRA adapter {path} does not fit this base model (wrong base?): "
                         + "; ".join(problems[:5]) + more)


def load_lora_tensors(model: nn.Module, tensors: dict[str, Tensor], path: str | Path = "<adapters>") -> None:
    """Copy adapter tensors into a model that already has adapters; every adapter must be covered."""
    own = lora_state_dict(model)
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(f"the LoRA adapter {path} does not match the model's adapters: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, tensor in tensors.items():
            params[key].copy_(tensor.to(params[key].dtype))


def adapter_size(model: nn.Module, bytes_per_value: int = 4) -> tuple[int, int]:
    """(number of adapter values, bytes at ``bytes_per_value`` each, 4 = float32)."""
    count = sum(t.numel() for t in lora_state_dict(model).values())
    return count, count * bytes_per_value


def is_lora_file(path: str | Path) -> bool:
    """True when ``path`` is an adapter file (LoRA checkpoint, ``save_lora`` or MiniMind LoRA file).

    Memory-maps the file, so asking about a full model checkpoint costs little.
    """
    path = Path(path)
    if not path.is_file():
        return False
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - not a readable torch file, so not an adapter either
        return False
    if not isinstance(raw, dict):
        return False
    if "lora_config" in raw or "lora_state_dict" in raw:
        return True
    keys = list(raw.get("state_dict", raw))
    return bool(keys) and all(str(k).endswith((*LORA_SUFFIXES, ".lora.A.weight", ".lora.B.weight")) for k in keys)


def resolve_base(lora_file: LoRAFile, path: str | Path) -> str:
    """The base weights recorded with an adapter: as given, then relative to the adapter's folder."""
    if not lora_file.base:
        raise ValueError(f"the LoRA adapter {path} records no base model; pass the base checkpoint and --lora")
    for candidate in (lora_file.base, lora_file.base_absolute, Path(path).parent / lora_file.base):
        if candidate and Path(candidate).exists():
            return str(candidate)
    raise FileNotFoundError(f"the base model of the LoRA adapter {path} is not at {lora_file.base}; "
                            "pass the base checkpoint and --lora")


def absolute_path(path: Optional[str]) -> Optional[str]:
    """``path`` made absolute (None stays None), so an adapter finds its base from any working directory."""
    return str(Path(path).resolve()) if path else None


def describe(trainable: int, total: int) -> str:
    """One line such as ``LoRA: 958,464 trainable parameters (1.47% of 65,068,416)``."""
    share = 100.0 * trainable / max(total, 1)
    return f"LoRA: {trainable:,} trainable parameters ({share:.2f}% of {total:,})"


def targets_of(module_names: Iterable[str]) -> tuple[str, ...]:
    """The distinct last name components of module names, in order (``q_proj``, ``o_proj``, ...)."""
    return tuple(dict.fromkeys(n.rsplit(".", 1)[-1] for n in module_names))


def base_and_adapter(ckpt: str, lora: Optional[str] = None) -> tuple[str, Optional[str]]:
    """Resolve what to load for inference: ``(base weights, adapter file or None)``.

    ``ckpt`` may itself be a LoRA stage checkpoint: then its recorded base is loaded and ``ckpt`` is
    the adapter. Otherwise ``ckpt`` is the base and ``lora`` (if any) the adapter.
    """
    if lora is None and is_lora_file(ckpt):
        return resolve_base(read_lora_file(ckpt), ckpt), ckpt
    return ckpt, lora
