"""Pretraining and supervised fine-tuning: next-token prediction on packed rows."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

from minimind_pl.chat_format import REASONING_TAGS
from minimind_pl.losses import IGNORE_INDEX, causal_lm_loss, token_weights, weighted_causal_lm_loss
from minimind_pl.stages.base import Stage


class Pretrain(Stage):
    """Causal language modelling on raw text (plus the MoE load-balancing loss when ``use_moe``)."""

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Cross entropy over labelled positions + the router's auxiliary loss."""
        out = self.forward_batch(batch)
        lm_loss = self.lm_loss(out.logits, batch["labels"])
        logs = {"lm_loss": lm_loss.detach()}
        if self.config.use_moe:
            logs["aux_loss"] = out.aux_loss.detach()
        return lm_loss + out.aux_loss, logs

    def lm_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The language-modelling term: mean cross entropy over labelled positions."""
        return self.training_loss(causal_lm_loss)(logits, labels)

    def validation_weight(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Batches count by their labelled tokens, so ``val/loss`` is the mean over tokens."""
        return (batch["labels"] != IGNORE_INDEX).sum()

    def validation_logs(self, means: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The means plus ``ppl`` = exp(loss) (clamped so a diverged run logs a finite number)."""
        return {**means, "ppl": torch.exp(means["loss"].clamp(max=30))}


class SFT(Pretrain):
    """Supervised fine-tuning: the same loss, on chat data whose labels cover only assistant turns.

    It differs from ``Pretrain`` only in rendering its sample prompts as a chat (and the optional tag
    weighting below); the data module makes the labels, and the recipe (MiniMind: lr 1e-5) lives in ``configs/*/sft.yaml``. For reasoning data
    (``<think>`` blocks), ``special_token_weight`` up-weights the tag tokens as MiniMind's
    ``train_distill_reason.py`` does (``configs/minimind3/reason.yaml``).
    """

    SAMPLE_STYLE = "chat"

    def __init__(self, special_token_weight: float = 1.0, special_tokens: tuple[str, ...] = REASONING_TAGS,
                 **kwargs: Any) -> None:
        """Build the stage.

        Args:
            special_token_weight: Training-loss weight of the positions whose target is one of
                ``special_tokens`` (MiniMind's reasoning recipe: 10); the loss is still divided by the
                number of labelled tokens. 1 means plain cross entropy. Validation always reports
                plain cross entropy, so its perplexity stays comparable.
            special_tokens: The tag strings to up-weight; each must be a single token of the tokenizer
                (others are skipped with a warning).
            kwargs: The arguments of ``Stage`` (``config``, ``init_weights``, ``learning_rate``, ...).
        """
        super().__init__(**kwargs)
        self._special_ids: torch.Tensor | None = None

    def lm_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross entropy, with ``special_tokens`` up-weighted while training when the weight is not 1."""
        weight = self.hparams.special_token_weight
        if weight == 1.0 or not self.training:
            return super().lm_loss(logits, labels)
        ids = self.special_token_ids(labels.device)
        return self.training_loss(weighted_causal_lm_loss)(logits, labels, token_weights(labels, ids, weight))

    def special_token_ids(self, device: torch.device) -> torch.Tensor:
        """Ids of ``special_tokens`` that are single tokens of the tokenizer, on ``device`` (cached)."""
        if self._special_ids is None:
            found = {tag: self.tokenizer.token_to_id(tag) for tag in self.hparams.special_tokens}
            missing = [tag for tag, i in found.items() if i is None]
            if missing:
                rank_zero_warn(f"not single tokens of the tokenizer, so not up-weighted: {missing}")
            self._special_ids = torch.tensor([i for i in found.values() if i is not None], dtype=torch.long)
        self._special_ids = self._special_ids.to(device)
        return self._special_ids
