"""Group Relative Policy Optimization, with PPO's clipped ratio (``grpo``) or CISPO's clamped weight (``cispo``).

MiniMind's recipe (``trainer/train_grpo.py``): per prompt a group of ``num_generations`` (6) sampled answers;
advantage = (reward − group mean) / (group std + 1e-4); per-token loss −(surrogate − β · k3 KL to the frozen
reference) with β = 0.1, averaged over each answer's tokens and then over the answers (``losses.grpo_loss``);
CISPO by default (ratio clamped at ε_high = 5, detached), or PPO's clip at ε = 0.2; lr 3e-7, 2 prompts per batch,
answers up to 1024 tokens at temperature 0.8; one update per batch of answers (``num_iterations`` 1), so the
sampling policy's log-probs are the policy's own, detached. With ``num_iterations`` > 1 the same answers make that
many updates, the ratio measured against the first.
"""

from __future__ import annotations

from typing import Any

from minimind_pl.errors import UserError
from minimind_pl.losses import group_advantages, grpo_loss
from minimind_pl.stages.rollouts import RolloutStage


class GRPO(RolloutStage):
    """GRPO / CISPO against a frozen copy of the starting model (see the module doc)."""

    LOSS_TYPES = ("cispo", "grpo")

    def __init__(
        self,
        num_generations: int = 6,
        loss_type: str = "cispo",
        beta: float = 0.1,
        epsilon: float = 0.2,
        epsilon_high: float = 5.0,
        num_iterations: int = 1,
        **kwargs: Any,
    ) -> None:
        """Build the policy from ``init_weights``, the frozen reference, and the rewards.

        Args:
            num_generations: Answers sampled per prompt: the group each reward is compared with (MiniMind: 6).
            loss_type: ``"cispo"`` (MiniMind's default: the importance ratio clamped above at ``epsilon_high`` and
                detached, times the token log-prob) or ``"grpo"`` (PPO's ratio clipped to 1 ± ``epsilon``).
            beta: Weight of the k3 KL to the reference (MiniMind: 0.1).
            epsilon: The clip range of ``grpo`` (MiniMind: 0.2).
            epsilon_high: The clamp of ``cispo`` (MiniMind: 5.0).
            num_iterations: Optimizer steps on each batch of answers (MiniMind: 1).
            kwargs: The arguments of ``RolloutStage`` and ``Stage`` (``rewards``, ``max_new_tokens``, ...).
        """
        super().__init__(**kwargs)
        if loss_type not in self.LOSS_TYPES:
            raise UserError(f"--model.loss_type must be one of {', '.join(self.LOSS_TYPES)}, got {loss_type!r}")
        if num_generations < 2 or num_iterations < 1:
            raise UserError(f"num_generations must be >= 2 (a group to compare with) and num_iterations >= 1, got "
                            f"{num_generations}, {num_iterations}")
        if beta < 0 or epsilon <= 0 or epsilon_high <= 0:
            raise UserError(f"GRPO needs beta >= 0, epsilon > 0 and epsilon_high > 0, got {beta}, {epsilon}, {epsilon_high}")
        if self.sampling.greedy:
            raise UserError("--model.temperature 0 samples the same answer num_generations times: every advantage "
                            "would be 0 and nothing would be learned; sample (temperature > 0)")

    def optimizer_steps_per_batch(self) -> int:
        """``num_iterations`` updates per batch of answers."""
        return self.hparams.num_iterations

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Sample a group of answers per prompt, score them, and make ``num_iterations`` updates on them."""
        hp = self.hparams
        rollouts = self.make_rollouts(batch, hp.num_generations, self.sampling)
        advantages = group_advantages(rollouts.rewards, hp.num_generations)  # (N,)
        ref_logps = self.reference_log_probs(rollouts)
        old_logps = None
        for _ in range(hp.num_iterations):
            logps, aux_loss = self.policy_log_probs(rollouts)
            old_logps = logps.detach() if old_logps is None else old_logps  # the sampling policy's
            loss, stats = grpo_loss(logps, old_logps, ref_logps, advantages, rollouts.mask, hp.beta, hp.loss_type,
                                    hp.epsilon, hp.epsilon_high)
            self.optimize(loss + aux_loss)
        self.log_rollouts(rollouts, loss, stats)
