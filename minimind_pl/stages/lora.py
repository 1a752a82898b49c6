"""LoRA fine-tuning: train low-rank adapters on chat data while the base model stays frozen.

MiniMind's recipe (trainer/train_lora.py): from the SFT weights, lr 1e-4, batch 32 x 340 tokens,
10 epochs, rank 8 on the square projections; see ``configs/minimind3/lora.yaml``. This stage defaults
to all attention and MLP projections (``lora_targets``), with MiniMind's choice one line away.

Checkpoints hold only the adapter tensors plus what finds the base (``lora_base`` = ``init_weights``,
``model_config``), so they are a few MB; ``--ckpt_path`` resumes because the base comes back from
``init_weights`` and the checkpoint is loaded non-strictly, after checking that it covers every adapter.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from minimind_pl.checkpoints.adapters import adapter_record
from minimind_pl.checkpoints.files import STAGE_PREFIX
from minimind_pl.errors import UserError
from minimind_pl.lora import DEFAULT_TARGETS, LORA_SUFFIXES, LoRAConfig, apply_lora, count_parameters, describe, lora_state_dict
from minimind_pl.stages.pretrain import SFT


class LoRA(SFT):
    """Supervised fine-tuning of LoRA adapters only; every base weight is frozen (bit-identical after fit)."""

    def __init__(
        self,
        lora_rank: int = 8,
        lora_alpha: Optional[float] = None,
        lora_dropout: float = 0.0,
        lora_targets: tuple[str, ...] = DEFAULT_TARGETS,
        learning_rate: float = 1e-4,
        **kwargs: Any,
    ) -> None:
        """Build the transformer, load ``init_weights`` into it, then add the adapters.

        Args:
            lora_rank: Rank r of every adapter (MiniMind: 8).
            lora_alpha: The update is scaled by alpha / r; None means alpha = r (scale 1, as MiniMind).
            lora_dropout: Dropout on the adapters' input.
            lora_targets: Last name components of the linear layers to adapt. Default: every attention
                and MLP projection. MiniMind's own choice is the square ones: ``[q_proj, o_proj]``.
            learning_rate: Peak learning rate (MiniMind's LoRA: 1e-4).
            kwargs: The arguments of ``Stage`` (``config``, ``init_weights``, ...).
        """
        super().__init__(learning_rate=learning_rate, **kwargs)
        self.lora = LoRAConfig(rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout, targets=tuple(lora_targets))
        apply_lora(self.model, self.lora)
        self.strict_loading = False  # checkpoints hold the adapters only; the base comes from init_weights
        if not self.hparams.get("init_weights"):
            rank_zero_warn("LoRA stage without --model.init_weights: the adapters train on a random base model")

    def configure_model(self) -> None:
        """Under DeepSpeed, save only what trains: its checkpoint folders bypass ``on_save_checkpoint``'s filter."""
        super().configure_model()
        if isinstance(self.trainer.strategy, DeepSpeedStrategy):
            self.trainer.strategy.exclude_frozen_parameters = True

    def on_fit_start(self) -> None:
        """Set up the fast path (``Stage.on_fit_start``) and report how many parameters train, and their share."""
        super().on_fit_start()
        rank_zero_info(describe(*count_parameters(self.model)))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the adapter tensors, plus the adapter settings and the base they belong to."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k.endswith(LORA_SUFFIXES)}
        checkpoint.update(adapter_record(self.lora, self.hparams.get("init_weights")))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check that a checkpoint to resume from holds these adapters (it may lack the base weights)."""
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("lora_config")
        if saved is None:
            raise UserError("this checkpoint was not written by the LoRA stage (no lora_config); to start "
                             "from full weights use --model.init_weights, --ckpt_path only resumes a LoRA run")
        if LoRAConfig(**saved) != self.lora:
            raise UserError(f"the checkpoint's adapters ({saved}) differ from this run's ({self.lora.to_dict()})")
        expected = {STAGE_PREFIX + k for k in lora_state_dict(self.model)}
        missing = sorted(expected - set(checkpoint["state_dict"]))
        if missing:
            raise UserError(f"the checkpoint lacks {len(missing)} adapter tensors, e.g. {missing[:3]}")

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter tensors in the transformer's names (``model.layers.0.self_attn.q_proj.lora_A``, ...)."""
        return lora_state_dict(self.model)
