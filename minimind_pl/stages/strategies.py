"""What a stage does differently under Lightning's sharded strategies (FSDP, DeepSpeed).

DDP and a single device need nothing here. FSDP and DeepSpeed need a GPU (Lightning refuses them on the CPU);
``bash bench/gpu_check.sh scaleout`` runs them on a GPU.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, Strategy
from torch import nn


def decays_weight(name: str) -> bool:
    """AdamW's weight decay applies to every weight but the norms' (and any bias).

    Decided by name, not by ``ndim``: under FSDP and DeepSpeed parameters are flat 1-d shards, where a shape
    rule would silently turn decay off.
    """
    return not (name.endswith("norm.weight") or name.endswith(".bias"))


def shards_parameters(strategy: Strategy) -> bool:
    """Whether a rank holds only a shard of the weights outside a forward pass (FSDP, DeepSpeed ZeRO-3): then
    every rank must take part in any forward, sample generation included."""
    if isinstance(strategy, FSDPStrategy):
        return True
    return isinstance(strategy, DeepSpeedStrategy) and strategy.config.get("zero_optimization", {}).get("stage") == 3


def clips_gradients_itself(strategy: Strategy) -> bool:
    """DeepSpeed's engine clips by ``gradient_clipping`` in its config (Lightning sets it from the Trainer)."""
    return isinstance(strategy, DeepSpeedStrategy)


def gradient_norm_clipped(trainer: Any, parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the gradients to ``max_norm`` and return their global norm before clipping (NaN/inf if any is).

    Under FSDP the norm must be taken over all ranks' shards, which only the root FSDP unit can do: the
    transformer itself (``wrap_for_fsdp``; Lightning then leaves the LightningModule unwrapped), else the
    LightningModule Lightning wrapped.
    """
    if isinstance(trainer.strategy, FSDPStrategy):
        from torch.distributed.fsdp import FullyShardedDataParallel

        root = next(m for m in trainer.model.modules() if isinstance(m, FullyShardedDataParallel))  # outermost first
        return root.clip_grad_norm_(max_norm)
    return torch.nn.utils.clip_grad_norm_(parameters, max_norm)


def wrap_for_fsdp(stage: Any) -> None:
    """FSDP units: one per transformer block, and one for the rest of the transformer (embedding, tied output head
    and final norm stay together: a tied weight cannot be split between units). Called from ``configure_model``,
    inside the strategy's ``enable_wrap`` context; wrapping the transformer itself lets sample generation call it
    directly on every rank."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import wrap

    if isinstance(stage.model, FullyShardedDataParallel):
        return  # already wrapped (configure_model runs again in a later fit)
    layers = stage.model.model.layers
    for index, block in enumerate(layers):
        layers[index] = wrap(block)
    stage.model = wrap(stage.model)
