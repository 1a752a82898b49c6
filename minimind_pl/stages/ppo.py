"""Proximal Policy Optimization with a critic (a value head on a copy of the transformer) and GAE.

MiniMind's recipe (``trainer/train_ppo.py``): one sampled answer per prompt; the reward on the answer's last token;
the critic (the starting weights' backbone plus a linear value head) gives per-token values; GAE with γ = 1,
λ = 0.95, advantages whitened over the batch's answer tokens; ``ppo_epochs`` (2) passes over the answers in
mini-batches of ``mini_batch_size`` (2), each an optimizer step on the clipped policy loss (ε = 0.2) + k3 KL to the
reference (0.02) + ``vf_coef`` (0.5) × the clipped value loss (0.2); the passes stop early once the approximate KL
to the sampling policy exceeds ``early_stop_kl`` (0.25), agreed over all ranks. Actor lr 3e-7, critic lr 5e-7
(here one optimizer with a parameter group per model).

The policy's and the critic's gradients are clipped apart (``clip_sets``), as MiniMind clips each model. The
critic applies the backbone's final norm once (MiniMind's ``CriticModel`` applies it a second time). A batch always
makes ``optimizer_steps_per_batch`` steps: after an early stop the rest change nothing, so step-counted checkpoints
stay regular.

The critic is trained and saved with the policy (``critic.*`` in the checkpoint, so a resumed run has it); every
tool reads only the policy (``model.*``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from minimind_pl.config import ModelConfig
from minimind_pl.errors import UserError
from minimind_pl.losses import final_token_rewards, generalized_advantages, ppo_losses, whiten
from minimind_pl.model import MiniMindForCausalLM, MiniMindModel
from minimind_pl.stages.base import split_by_decay
from minimind_pl.stages.rollouts import Rollouts, RolloutStage


class ValueModel(nn.Module):
    """A critic: the transformer's backbone and a linear value head, one value per position.

    Args:
        config: the backbone's architecture.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.model = MiniMindModel(config)
        self.value_head = nn.Linear(config.hidden_size, 1)

    @classmethod
    def from_policy(cls, policy: MiniMindForCausalLM) -> "ValueModel":
        """A critic whose backbone starts as a copy of ``policy``'s (MiniMind starts its critic from the SFT
        weights)."""
        critic = cls(policy.config)
        critic.model.load_state_dict(policy.model.state_dict())
        return critic

    def forward(self, input_ids: Tensor) -> Tensor:
        """input_ids (N, L) -> values (N, L)."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        hidden, _, _ = self.model(input_ids, positions)
        return self.value_head(hidden).squeeze(-1).float()


class PPO(RolloutStage):
    """PPO with a critic and GAE against a frozen copy of the starting model (see the module doc)."""

    OPTIMIZER_ARGUMENTS = (*RolloutStage.OPTIMIZER_ARGUMENTS, "critic_learning_rate")

    def __init__(
        self,
        ppo_epochs: int = 2,
        mini_batch_size: int = 2,
        clip_epsilon: float = 0.2,
        value_clip: float = 0.2,
        vf_coef: float = 0.5,
        kl_coef: float = 0.02,
        gamma: float = 1.0,
        lam: float = 0.95,
        early_stop_kl: float = 0.25,
        critic_learning_rate: float = 5e-7,
        **kwargs: Any,
    ) -> None:
        """Build the policy from ``init_weights``, the frozen reference, the critic and the rewards.

        Args:
            ppo_epochs: Passes over each batch of answers (MiniMind: 2).
            mini_batch_size: Answers per optimizer step within a pass (MiniMind: 2).
            clip_epsilon: The policy ratio's clip range (MiniMind: 0.2).
            value_clip: How far a value may move from its sampling-time value before the loss clips it (MiniMind: 0.2).
            vf_coef: Weight of the value loss (MiniMind: 0.5).
            kl_coef: Weight of the k3 KL to the reference in the policy loss (MiniMind: 0.02).
            gamma: GAE discount (MiniMind: 1.0).
            lam: GAE λ (MiniMind: 0.95).
            early_stop_kl: Stop a batch's passes once the approximate KL to the sampling policy exceeds this
                (MiniMind: 0.25).
            critic_learning_rate: Peak learning rate of the critic (MiniMind: 5e-7).
            kwargs: The arguments of ``RolloutStage`` and ``Stage`` (``rewards``, ``max_new_tokens``, ...).
        """
        super().__init__(**kwargs)
        if ppo_epochs < 1 or mini_batch_size < 1:
            raise UserError(f"ppo_epochs and mini_batch_size must be >= 1, got {ppo_epochs}, {mini_batch_size}")
        if clip_epsilon <= 0 or value_clip <= 0 or vf_coef < 0 or kl_coef < 0 or not 0 <= gamma <= 1 or not 0 <= lam <= 1:
            raise UserError(f"PPO needs clip_epsilon > 0, value_clip > 0, vf_coef >= 0, kl_coef >= 0 and gamma, lam in "
                            f"[0, 1]; got {clip_epsilon}, {value_clip}, {vf_coef}, {kl_coef}, {gamma}, {lam}")
        self.critic = ValueModel.from_policy(self.model)

    # ------------------------------------------------------------------ optimizer
    def parameter_groups(self) -> list[list[nn.Parameter]]:
        """The policy's two groups (decayed, not), then the critic's two."""
        policy = [(n, p) for n, p in self.named_parameters() if not n.startswith("critic.")]
        return split_by_decay(policy) + split_by_decay(self.critic.named_parameters())

    def optimizer_group_settings(self) -> list[dict[str, Any]]:
        """The policy's groups at ``learning_rate``, the critic's at ``critic_learning_rate``."""
        policy = super().optimizer_group_settings()
        return policy + [{**group, "lr": self.hparams.critic_learning_rate} for group in policy]

    def clip_sets(self) -> dict[str, list[int]]:
        """The policy's and the critic's gradients are clipped apart (MiniMind clips each model to 1.0); the critic's
        norm is logged as ``train/grad_norm_critic``."""
        return {"": [0, 1], "critic": [2, 3]}

    def optimizer_steps_per_batch(self) -> int:
        """``ppo_epochs`` passes of ``ceil(batch_size / mini_batch_size)`` steps (fewer when a pass stops early)."""
        datamodule = self.trainer.datamodule
        answers = getattr(datamodule, "batch_size", self.hparams.mini_batch_size)
        return self.hparams.ppo_epochs * math.ceil(answers / self.hparams.mini_batch_size)

    # ------------------------------------------------------------------ steps
    @torch.no_grad()
    def advantages(self, rollouts: Rollouts) -> tuple[Tensor, Tensor, Tensor]:
        """``(whitened advantages, returns, values)`` (N, L) of the answers: the reward on each answer's last token."""
        mask = rollouts.mask
        values = self.critic(rollouts.input_ids) * mask
        token_rewards = final_token_rewards(rollouts.rewards, mask)
        advantages, returns = generalized_advantages(token_rewards, values, mask, self.hparams.gamma, self.hparams.lam)
        return whiten(advantages, mask), returns, values

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Sample one answer per prompt, score it, estimate advantages, and make the PPO passes."""
        rollouts = self.make_rollouts(batch, 1, self.sampling)
        advantages, returns, old_values = self.advantages(rollouts)
        with torch.no_grad():
            old_logps, _ = self.policy_log_probs(rollouts)
        targets = {"old_logps": old_logps, "ref_logps": self.reference_log_probs(rollouts), "advantages": advantages,
                   "old_values": old_values, "returns": returns, "mask": rollouts.mask}
        steps = self.global_step + self.optimizer_steps_per_batch()
        for _ in range(self.hparams.ppo_epochs):
            loss, stats, stopped = self.ppo_pass(rollouts, targets)
            if stopped:
                break
        self.skip_updates(steps - self.global_step)  # every batch makes the same number of steps
        self.log_rollouts(rollouts, loss, stats)

    def ppo_pass(self, rollouts: Rollouts, targets: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor], bool]:
        """One pass over the answers in mini-batches, an optimizer step each; ``(last loss, its stats, stopped)``.

        A mini-batch whose approximate KL to the sampling policy (averaged over ranks, so all agree) exceeds
        ``early_stop_kl`` makes no update and ends the batch's passes; its remaining steps change nothing
        (``skip_updates``). MiniMind instead steps AdamW on zero gradients for the rest of the pass (momentum still
        moves the weights) and then stops.
        """
        hp = self.hparams
        for rows in torch.randperm(len(rollouts.samples), device=self.device).split(hp.mini_batch_size):
            logps, aux_loss = self.policy_log_probs(rollouts, rows)
            values = self.critic(rollouts.input_ids[rows])
            t = {name: value[rows] for name, value in targets.items()}
            policy_loss, value_loss, stats = ppo_losses(
                logps, t["old_logps"], t["ref_logps"], t["advantages"], values, t["old_values"], t["returns"],
                t["mask"], hp.clip_epsilon, hp.value_clip, hp.kl_coef)
            loss = policy_loss + hp.vf_coef * value_loss
            stats["value_loss"] = value_loss.detach()
            if self.trainer.strategy.reduce(stats["approx_kl"], reduce_op="mean") > hp.early_stop_kl:
                return loss, stats, True
            self.optimize(loss + aux_loss)
        return loss, stats, False
