"""Low-rank adapters (LoRA): wrap chosen linear layers, save only the adapters, merge them back.

``LoRALinear`` replaces an ``nn.Linear`` in place and keeps the base weight under its old name
(``...q_proj.weight``) as a frozen parameter, beside two new trainable matrices ``lora_A`` (r, in) and
``lora_B`` (out, r). Its output is ``x W^T + (alpha / r) * dropout(x) A^T B^T``; ``B`` starts at zero,
so a fresh adapter leaves the model exactly as it was. Base checkpoints therefore still load into the
wrapped model, and an adapter file holds only ``*.lora_A`` / ``*.lora_B`` tensors.

Adapters are applied by module name: every linear layer whose last name component is in ``targets``.
The default is every attention and MLP projection (``DEFAULT_TARGETS``); MiniMind itself wraps only the
square matrices, which for minimind-3 are ``q_proj`` and ``o_proj`` (``MINIMIND_TARGETS``).

Adapter files (writing, reading, putting them on a model) are :mod:`minimind_pl.checkpoints.adapters`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minimind_pl.errors import UserError

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MINIMIND_TARGETS = ("q_proj", "o_proj")  # MiniMind wraps the square matrices: these two for minimind-3
LORA_SUFFIXES = (".lora_A", ".lora_B")


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
            raise UserError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise UserError("LoRA targets must name at least one linear layer (e.g. q_proj)")

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
        raise UserError("the model already has LoRA adapters; merge_lora(model) first to stack another")
    chosen = [(name, m) for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in config.targets]
    found = {name.rsplit(".", 1)[-1] for name, _ in chosen}
    if set(config.targets) - found:
        available = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise UserError(f"LoRA targets {sorted(set(config.targets) - found)} match no linear layer; "
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
        raise UserError("the model has no LoRA adapters")
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


# ----------------------------------------------------------------------------- reporting


def adapter_size(model: nn.Module, bytes_per_value: int = 4) -> tuple[int, int]:
    """(number of adapter values, bytes at ``bytes_per_value`` each, 4 = float32)."""
    count = sum(t.numel() for t in lora_state_dict(model).values())
    return count, count * bytes_per_value


def describe(trainable: int, total: int) -> str:
    """One line such as ``LoRA: 958,464 trainable parameters (1.47% of 65,068,416)``."""
    share = 100.0 * trainable / max(total, 1)
    return f"LoRA: {trainable:,} trainable parameters ({share:.2f}% of {total:,})"


def targets_of(module_names: Iterable[str]) -> tuple[str, ...]:
    """The distinct last name components of module names, in order (``q_proj``, ``o_proj``, ...)."""
    return tuple(dict.fromkeys(n.rsplit(".", 1)[-1] for n in module_names))
