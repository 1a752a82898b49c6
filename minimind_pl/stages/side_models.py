"""Frozen models held beside the one a stage trains: DPO's reference and distillation's teacher (and any
reference or reward model a new stage needs).

A side model is in eval mode, has no gradients and is never updated. It is held outside the module tree,
so it is not in ``state_dict()`` (checkpoints stay the trained model's), not in ``parameters()`` (the
optimizer never sees it) and not moved by Lightning: :meth:`FrozenModel.follow` moves it to the trained
model's device and dtype when it is first used. Under FSDP / DeepSpeed it is not sharded: each device
holds a whole copy.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from minimind_pl.model import MiniMindForCausalLM


class FrozenModel:
    """A frozen transformer that follows the trained model's device and dtype.

    Args:
        model: The transformer to freeze (frozen in place: eval mode, ``requires_grad`` off).
        role: What it is for, named in errors (e.g. ``"reference"``, ``"teacher"``).
    """

    def __init__(self, model: MiniMindForCausalLM, role: str) -> None:
        self._model: Optional[MiniMindForCausalLM] = model.eval().requires_grad_(False)
        self.role = role

    @classmethod
    def copy_of(cls, model: MiniMindForCausalLM, role: str) -> "FrozenModel":
        """A frozen copy of ``model``'s current weights (the original keeps training)."""
        copy = MiniMindForCausalLM(model.config)
        copy.load_state_dict(model.state_dict())
        return cls(copy, role)

    @property
    def model(self) -> MiniMindForCausalLM:
        """The frozen model where it is (RuntimeError once released)."""
        if self._model is None:
            raise RuntimeError(f"the {self.role} model was released")
        return self._model

    def follow(self, trained: nn.Module) -> MiniMindForCausalLM:
        """The frozen model on ``trained``'s device and in its dtype (moved on first use), in eval mode."""
        model, like = self.model, next(trained.parameters())
        own = next(model.parameters())
        if (own.device, own.dtype) != (like.device, like.dtype):
            model.to(device=like.device, dtype=like.dtype)
        return model.eval()

    @property
    def released(self) -> bool:
        """True once :meth:`release` has dropped the model."""
        return self._model is None

    def release(self) -> None:
        """Drop the model (its memory is freed once nothing else holds it)."""
        self._model = None
