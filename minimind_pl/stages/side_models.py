"""Frozen models held beside the one a stage trains: DPO's reference and distillation's teacher (and any
reference or reward model a new stage needs).

A side model is in eval mode, has no gradients and is never updated. It is held outside the module tree,
so it is not in ``state_dict()`` (checkpoints stay the trained model's), not in ``parameters()`` (the
optimizer never sees it) and not moved by Lightning: :meth:`FrozenModel.follow` moves it to the trained
model's device and dtype when it is first used. Under FSDP / DeepSpeed it is not sharded: each device
holds a whole copy.
"""

from __future__ import annotations

import hashlib
from typing import Any, Optional

import torch
from torch import nn

from minimind_pl.errors import UserError

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


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over a model's parameter names and bytes (order of ``state_dict``)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class FrozenReference:
    """Mixin for a stage (a ``Stage`` subclass) that measures its policy against a frozen copy of its starting
    weights (DPO, the RL stages): it makes the copy, records a fingerprint of it in every checkpoint and refuses to
    resume against other weights (``init_weights`` retrained or changed since the run began). List it before
    ``Stage`` in the bases."""

    def freeze_reference(self) -> None:
        """Freeze a copy of ``self.model`` as ``self.reference`` and fingerprint it (call in ``__init__``)."""
        self.reference = FrozenModel.copy_of(self.model, "reference")
        #: sha256 of the reference's weights, recorded in checkpoints so a resume keeps the same reference.
        self.reference_fingerprint = weights_fingerprint(self.reference.model)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Also record which reference the run measures itself against (a fingerprint of its weights)."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["reference_fingerprint"] = self.reference_fingerprint

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse to resume against another reference than the run had (``init_weights`` retrained or changed)."""
        super().on_load_checkpoint(checkpoint)
        recorded = checkpoint.get("reference_fingerprint")
        if recorded is not None and recorded != self.reference_fingerprint:
            raise UserError(f"the checkpoint to resume was trained against another reference model than "
                            f"--model.init_weights {self.hparams.init_weights} gives now (its weights changed since, "
                            "or another file is named): resume with the run's own starting weights")
