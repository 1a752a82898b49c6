"""Direct Preference Optimization: prefer the chosen answer over the rejected one, relative to a frozen reference.

MiniMind's recipe (trainer/train_dpo.py): from the SFT weights, beta 0.15 (0.1 in its earlier recipe),
lr 4e-8, batch 4 pairs x 1024 tokens, 1 epoch; see ``configs/minimind3/dpo.yaml``. The loss is
``losses.dpo_loss`` on whole-answer log-probs (``losses.token_log_probs`` summed over the answer tokens),
plus the MoE router loss and an optional SFT term (``sft_weight`` x NLL of the chosen answers).

The reference is a frozen copy of the starting weights (``init_weights``), made when the stage is built
(a ``side_models.FrozenModel``: eval mode, no gradients, never updated, never saved, following the
policy's device and dtype); a resumed run (``--ckpt_path``) rebuilds it from ``init_weights`` and refuses to go on
when those are not the weights the run began from (checkpoints record a fingerprint of the reference). With
``precompute_reference`` its log-probs are computed once per pair at the start of fit (over the data
module's train and val pairs, keyed by pair index) and the reference model is released, so training
holds a single model.

With several devices every rank holds a whole reference and, with ``precompute_reference``, computes the
whole table. FSDP/DeepSpeed do not shard the reference: each device holds a full copy (with
``precompute_reference``, only until the table is computed).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from minimind_pl.errors import UserError
from minimind_pl.lightning_compat import has_trainer
from minimind_pl.losses import IGNORE_INDEX, dpo_loss, sequence_log_probs, token_log_probs
from minimind_pl.stages.base import Stage
from minimind_pl.stages.side_models import FrozenReference


def stack_pair(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen rows then rejected rows as one (2B, T) batch: ``(input_ids, labels)``."""
    inputs = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    return inputs, labels


def pair_log_probs(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole-answer log-probs ``(chosen (B,), rejected (B,))`` of a DPO batch under ``model`` (one forward)."""
    inputs, labels = stack_pair(batch)
    return sequence_log_probs(model(inputs).logits, labels).chunk(2)


@torch.no_grad()
def preference_accuracy(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> float:
    """Share of pairs whose chosen answer the model finds more likely than the rejected one.

    Args:
        model: a ``MiniMindForCausalLM`` (evaluated in eval mode; its mode is restored afterwards).
        batches: DPO batches, e.g. ``minimind_pl.data.dpo.pair_loader(path, tokenizer)``.
    """
    device, was_training = next(model.parameters()).device, model.training
    model.eval()
    wins = total = 0
    for batch in batches:
        chosen, rejected = pair_log_probs(model, {k: v.to(device) for k, v in batch.items()})
        wins += int((chosen > rejected).sum())
        total += chosen.numel()
    model.train(was_training)
    return wins / max(total, 1)


def reward_logs(loss: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """What DPO logs: its loss, mean rewards, mean margin and the share of pairs with a positive margin."""
    margin = chosen - rejected
    return {"dpo_loss": loss.detach(), "chosen_reward": chosen.mean(), "rejected_reward": rejected.mean(),
            "reward_margin": margin.mean(), "reward_accuracy": (margin > 0).float().mean()}


class DPO(FrozenReference, Stage):
    """Preference optimisation against a frozen copy of the starting model (see the module doc)."""

    VAL_METRICS = ("loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward")
    PROGRESS_METRICS = ("loss", "reward_accuracy")
    SAMPLE_STYLE = "chat"  # samples are chats, as after SFT

    def __init__(
        self,
        beta: float = 0.15,
        sft_weight: float = 0.0,
        precompute_reference: bool = False,
        learning_rate: float = 4e-8,
        **kwargs: Any,
    ) -> None:
        """Build the policy from ``init_weights`` and freeze a copy of it as the reference.

        Args:
            beta: DPO temperature: how far the policy may move from the reference (MiniMind: 0.15;
                0.1 in its earlier recipe).
            sft_weight: Weight of an extra NLL loss on the chosen answers (0 = pure DPO).
            precompute_reference: Compute the reference log-probs of every train/val pair once at the
                start of fit and release the reference model (one model in memory while training).
            learning_rate: Peak learning rate (MiniMind's DPO: 4e-8, to avoid forgetting).
            kwargs: The arguments of ``Stage`` (``config``, ``init_weights``, ...).
        """
        super().__init__(learning_rate=learning_rate, **kwargs)
        if beta <= 0:
            raise UserError(f"beta must be > 0, got {beta}")
        self.freeze_reference()
        self._reference_logps: dict[str, torch.Tensor] = {}

    # ---------------------------------------------------------------- reference
    def reference_model(self) -> nn.Module:
        """The frozen reference on the policy's device and in its dtype."""
        if self.reference.released:
            raise RuntimeError("the reference model was released after precomputing its log-probs, and these "
                               "batches have none (precompute_reference needs a DPODataModule)")
        return self.reference.follow(self.model)

    def reference_logps(self, batch: dict[str, torch.Tensor], split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs ``(chosen, rejected)`` of a batch: precomputed for ``split``, else computed now."""
        table = self._reference_logps.get(split)
        if table is not None:
            pair = table[batch["index"]]
            return pair[:, 0], pair[:, 1]
        with torch.no_grad():
            return pair_log_probs(self.reference_model(), batch)

    @torch.no_grad()
    def precompute_reference_logps(self, loaders: dict[str, Iterable], sizes: dict[str, int]) -> None:
        """Fill the per-split tables ``(pairs, 2)`` of reference log-probs from ordered loaders, then release
        the reference model.

        Args:
            loaders: per split ("train", "val"), batches carrying ``index``.
            sizes: per split, the number of pairs.
        """
        reference = self.reference_model()
        with self.trainer.precision_plugin.forward_context() if has_trainer(self) else contextlib.nullcontext():
            for split, loader in loaders.items():
                table = torch.full((sizes[split], 2), float("nan"), device=self.device)
                for batch in loader:
                    batch = {k: v.to(self.device) for k, v in batch.items()}
                    table[batch["index"]] = torch.stack(pair_log_probs(reference, batch), dim=1).float()
                if torch.isnan(table).any():
                    raise RuntimeError(f"the {split} loader did not cover every pair once")
                self._reference_logps[split] = table
        self.reference.release()
        rank_zero_info(f"[DPO] reference log-probs precomputed for {sizes}; reference model released")

    def on_fit_start(self) -> None:
        """Set up the fast path (``Stage.on_fit_start``); put the reference on the policy's device, or precompute
        its log-probs over the data module's pairs."""
        super().on_fit_start()
        if not self.hparams.precompute_reference:
            self.reference_model()
            return
        datamodule = self.trainer.datamodule
        if not hasattr(datamodule, "reference_dataloader"):
            raise TypeError("precompute_reference needs a data module with reference_dataloader() (DPODataModule)")
        datasets = {"train": datamodule.train_dataset, "val": datamodule.val_dataset}
        sizes = {split: len(ds) for split, ds in datasets.items() if ds is not None}
        self.precompute_reference_logps({s: datamodule.reference_dataloader(s) for s in sizes}, sizes)

    # -------------------------------------------------------------------- steps
    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """DPO loss (+ router loss, + ``sft_weight`` x NLL of the chosen answers) and the reward statistics.

        Precomputed reference log-probs are looked up in the train table while training, else in the val table.
        """
        inputs, labels = stack_pair(batch)
        out = self.model(inputs)
        token_logps = token_log_probs(out.logits, labels)
        policy_chosen, policy_rejected = token_logps.sum(dim=-1).chunk(2)
        ref_chosen, ref_rejected = self.reference_logps(batch, self._split())
        loss, chosen, rejected = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, self.hparams.beta)
        logs = reward_logs(loss, chosen, rejected)
        total = loss + out.aux_loss
        if self.hparams.sft_weight:
            n_chosen = len(policy_chosen)
            nll = -token_logps[:n_chosen].sum() / (labels[:n_chosen] != IGNORE_INDEX).sum().clamp(min=1)
            logs["sft_loss"] = nll.detach()
            total = total + self.hparams.sft_weight * nll
        return total, logs

    def _split(self) -> str:
        """Which precomputed table serves the current batch: "train" in the training loop, else "val"."""
        training = self.trainer.training if has_trainer(self) else self.training
        return "train" if training else "val"

    def validation_values(self, batch: dict[str, torch.Tensor], loss: torch.Tensor,
                          logs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``val/loss`` is the DPO loss alone; the reward statistics beside it."""
        return {**logs, "loss": logs["dpo_loss"]}

    def validation_weight(self, batch: dict[str, torch.Tensor]) -> int:
        """Batches count by their pairs."""
        return batch["index"].numel()
