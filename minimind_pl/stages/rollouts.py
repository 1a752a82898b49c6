"""What the RL stages share: sampling answers to a batch of prompts, scoring them, and optimising on them.

``RolloutStage`` is a ``Stage`` with Lightning's manual optimisation: a training step samples answers with the
KV-cache ``generation.generate`` (batched, no gradients, the model in eval mode), scores them with the stage's
``rewards`` (``minimind_pl.rewards``), computes the frozen reference's log-probs, and then makes one or more
optimizer steps on those answers (``optimize``: backward, clipping with the non-finite step skip, AdamW, the
schedule). Under DDP each rank samples answers to its own prompts; Lightning re-arms the gradient all-reduce before
every manual backward, so several updates per batch stay in sync. FSDP and DeepSpeed are refused (generation
would need every shard on every step).

Trainer settings: manual optimisation does its own clipping (``max_grad_norm``), so the Trainer's
``gradient_clip_val`` must be null and ``accumulate_grad_batches`` 1 (the shipped configs say so).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from minimind_pl.data.prompts import prompt_lists
from minimind_pl.errors import UserError
from minimind_pl.generation import GREEDY, SamplingSettings, generate
from minimind_pl.lightning_compat import every_n_train_steps
from minimind_pl.losses import IGNORE_INDEX, token_log_probs
from minimind_pl.rewards import Reward, Sample, minimind_rewards, total_rewards
from minimind_pl.stages.base import Stage
from minimind_pl.stages.side_models import FrozenReference
from minimind_pl.stages.strategies import clips_gradients_itself, shards_parameters


@dataclass
class Rollouts:
    """N sampled answers, as rows the losses read (L = the longest prompt + answer, minus one).

    Args:
        input_ids: (N, L) prompt and answer tokens, right-padded (causal attention never sees the padding).
        labels: (N, L) the answer tokens, shifted (``labels[:, t]`` follows ``input_ids[:, t]``); -100 elsewhere.
        rewards: (N,) the weighted sum of the rewards.
        parts: each reward's (N,) scores, by name.
        samples: what the rewards saw (prompt and answer texts, ground truth).
        answer_tokens: tokens per answer (eos included), a host list.
        tokens: prompt and answer tokens of all rows (no padding), for tokens/s.
    """

    input_ids: Tensor
    labels: Tensor
    rewards: Tensor
    parts: dict[str, Tensor]
    samples: list[Sample]
    answer_tokens: list[int]
    tokens: int

    @property
    def mask(self) -> Tensor:
        """(N, L) bool: the answer tokens that carry a loss."""
        return self.labels != IGNORE_INDEX


def with_stop(answers: list[list[int]], max_new_tokens: int, eos_id: int) -> list[list[int]]:
    """The answers with the eos that ended them put back (``generate`` leaves it out), so stopping is learned too;
    an answer cut at ``max_new_tokens`` has none."""
    return [a + [eos_id] if len(a) < max_new_tokens else a for a in answers]


def answer_rows(prompts: list[list[int]], answers: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded ``(input_ids, labels)`` (N, L) of prompt + answer sequences; labels only on the answer."""
    sequences = [p + a for p, a in zip(prompts, answers)]
    width = max(len(s) for s in sequences) - 1
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    for row, (prompt, sequence) in enumerate(zip(prompts, sequences)):
        n = len(sequence) - 1
        input_ids[row, :n] = torch.tensor(sequence[:-1])
        labels[row, len(prompt) - 1:n] = torch.tensor(sequence[len(prompt):])
    return input_ids, labels


class RolloutStage(FrozenReference, Stage):
    """Base of the RL stages (GRPO, PPO): rollouts, rewards, a frozen reference, manual optimisation.

    Subclasses implement ``training_step`` from ``make_rollouts``, ``policy_log_probs`` and ``optimize``, and say
    how many optimizer steps a batch makes (``optimizer_steps_per_batch``).
    """

    SAMPLE_STYLE = "chat"
    VAL_METRICS = ("reward", "answer_length")
    PROGRESS_METRICS = ("reward",)

    def __init__(
        self,
        rewards: Optional[list[Reward]] = None,
        max_new_tokens: int = 1024,
        temperature: float = 0.8,
        top_p: float = 0.85,
        top_k: int = 50,
        max_grad_norm: float = 1.0,
        rollout_log_every_n_steps: int = 50,
        learning_rate: float = 3e-7,
        **kwargs: Any,
    ) -> None:
        """Build the policy from ``init_weights`` and freeze a copy of it as the reference.

        Args:
            rewards: What an answer is scored by, summed with each reward's ``weight`` (``minimind_pl.rewards``:
                ``AnswerMatch``, ``LengthShaping``, ``ThinkingFormat``, ``RepetitionPenalty``, ``RewardModel``, or
                your own ``Reward`` subclass). Default: MiniMind's rule-based terms (length, thinking format,
                repetition); MiniMind adds a reward model.
            max_new_tokens: The longest answer sampled, in tokens (MiniMind: 1024).
            temperature: Sampling temperature of the answers (MiniMind: 0.8).
            top_p: Nucleus sampling of the answers (MiniMind's generate: 0.85).
            top_k: Top-k sampling of the answers (MiniMind's generate: 50).
            max_grad_norm: Clip the gradient norm of each update to this (MiniMind: 1.0); the Trainer's
                ``gradient_clip_val`` must stay null (manual optimisation).
            rollout_log_every_n_steps: Log one prompt with its sampled answers and rewards as TensorBoard text every
                this many optimizer steps (0 = never).
            learning_rate: Peak learning rate (MiniMind's GRPO and PPO actor: 3e-7).
            kwargs: The arguments of ``Stage`` (``config``, ``init_weights``, ...).
        """
        super().__init__(learning_rate=learning_rate, **kwargs)
        if max_new_tokens < 1 or max_grad_norm <= 0:
            raise UserError(f"max_new_tokens must be >= 1 and max_grad_norm > 0, got {max_new_tokens}, {max_grad_norm}")
        self.automatic_optimization = False
        self.rewards = list(rewards) if rewards is not None else minimind_rewards()
        if not self.rewards:
            raise UserError("--model.rewards is empty: give at least one reward")
        # the checkpoint records the rewards as a config names them (objects would not load with weights_only)
        self.hparams["rewards"] = [r.describe() for r in self.rewards]
        self.sampling = SamplingSettings(temperature=temperature, top_p=top_p, top_k=top_k)
        self.freeze_reference()

    # ------------------------------------------------------------------ set-up
    def on_fit_start(self) -> None:
        """Refuse sharded strategies and checkpoint intervals a batch's steps would jump over; put the reference and
        any reward model on the training device."""
        strategy = self.trainer.strategy
        if shards_parameters(strategy) or clips_gradients_itself(strategy):
            raise UserError(f"RL stages run on one device or under DDP, not {type(strategy).__name__}: sampling "
                            "answers needs whole weights on every rank (--trainer.strategy ddp)")
        steps = self.optimizer_steps_per_batch()
        for callback in self.trainer.checkpoint_callbacks:
            every = every_n_train_steps(callback)
            if every and every % steps:
                raise UserError(f"each batch makes {steps} optimizer steps, so a checkpoint every {every} steps would "
                                f"be skipped: make every_n_train_steps a multiple of {steps}")
        super().on_fit_start()
        self.reference.follow(self.model)
        for reward in self.rewards:
            reward.to(self.device)

    # ------------------------------------------------------------------ rollouts
    def make_rollouts(self, batch: dict[str, Any], answers_per_prompt: int, sampling: SamplingSettings) -> Rollouts:
        """Sample ``answers_per_prompt`` answers to every prompt of ``batch`` (consecutive) and score them."""
        tokenizer, max_new, n = self.tokenizer, self.hparams.max_new_tokens, answers_per_prompt
        asked = prompt_lists(batch)
        prompts = [p for p in asked for _ in range(n)]
        answers = generate(self.model, prompts, max_new, sampling, tokenizer.eos_id)
        texts = [(text, gt) for text, gt in zip(tokenizer.decode_batch(asked), batch["gt"]) for _ in range(n)]
        samples = [Sample(text, answer, gt) for (text, gt), answer in
                   zip(texts, tokenizer.decode_batch(answers, skip_special_tokens=True))]
        answers = with_stop(answers, max_new, tokenizer.eos_id)
        totals, parts = total_rewards(self.rewards, samples)
        input_ids, labels = answer_rows(prompts, answers, tokenizer.pad_id)
        as_tensor = lambda values: torch.tensor(values, dtype=torch.float32, device=self.device)  # noqa: E731
        return Rollouts(input_ids.to(self.device), labels.to(self.device), as_tensor(totals),
                        {name: as_tensor(v) for name, v in parts.items()}, samples, [len(a) for a in answers],
                        sum(len(p) + len(a) for p, a in zip(prompts, answers)))

    def policy_log_probs(self, rollouts: Rollouts, rows: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """``(log-probs (n, L), router loss)`` of the answer tokens under the trained policy (with gradient)."""
        input_ids, labels = rollouts.input_ids, rollouts.labels
        if rows is not None:
            input_ids, labels = input_ids[rows], labels[rows]
        out = self.model(input_ids)
        return token_log_probs(out.logits, labels), out.aux_loss

    @torch.no_grad()
    def reference_log_probs(self, rollouts: Rollouts) -> Tensor:
        """(N, L) log-probs of the answer tokens under the frozen reference."""
        return token_log_probs(self.reference.follow(self.model)(rollouts.input_ids).logits, rollouts.labels)

    # ------------------------------------------------------------------ optimisation
    def optimize(self, loss: Tensor) -> None:
        """One optimizer step on ``loss``: backward, clip (skipping a non-finite step), AdamW, the schedule."""
        optimizer = self.optimizers()
        self.nonfinite.note_loss(loss)
        self.manual_backward(loss)
        self.configure_gradient_clipping(optimizer.optimizer, self.hparams.max_grad_norm, "norm")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.lr_schedulers().step()

    def skip_updates(self, count: int) -> None:
        """Count ``count`` optimizer steps that change nothing (no gradients: AdamW leaves every weight and moment),
        so a batch that stops early still makes its steps and step-counted checkpoints stay regular."""
        optimizer = self.optimizers()
        for _ in range(count):
            optimizer.zero_grad(set_to_none=True)
            optimizer.step()
            self.lr_schedulers().step()

    # ------------------------------------------------------------------ logging
    def log_rollouts(self, rollouts: Rollouts, loss: Tensor, stats: dict[str, Tensor]) -> None:
        """Log the loss, mean reward and its parts, the answers' length and ``stats``; now and then the texts.
        Count the batch's tokens for ``train/tokens_per_sec``."""
        self._tokens_since_log += rollouts.tokens
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False)
        self.log("train/reward", rollouts.rewards.mean(), on_step=True, on_epoch=False)
        for name, scores in rollouts.parts.items():
            self.log(f"train/reward/{name}", scores.mean(), on_step=True, on_epoch=False)
        self.log("train/answer_length", sum(rollouts.answer_tokens) / len(rollouts.answer_tokens),
                 on_step=True, on_epoch=False)
        for name, value in stats.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=False)
        every = self.hparams.rollout_log_every_n_steps
        if every and self.global_rank == 0 and (self.global_step - 1) // every != self._last_text_log:
            self._last_text_log = (self.global_step - 1) // every
            self.log_rollout_text(rollouts)

    _last_text_log = -1

    def log_rollout_text(self, rollouts: Rollouts) -> None:
        """The first prompt of the batch with its answers and rewards, as TensorBoard text."""
        experiment = getattr(self.logger, "experiment", None)
        if not hasattr(experiment, "add_text"):
            return
        prompt = rollouts.samples[0].prompt
        lines = [f"**prompt** {prompt}"] + [
            f"**reward {float(r):.3f}** {s.completion}"
            for s, r in zip(rollouts.samples, rollouts.rewards.tolist()) if s.prompt == prompt]
        experiment.add_text("rollouts", "\n\n".join(lines), global_step=self.global_step)

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Greedy answers to the validation prompts: their mean reward and length (``val/reward``)."""
        rollouts = self.make_rollouts(batch, 1, GREEDY)
        lengths = torch.tensor(rollouts.answer_tokens, dtype=torch.float32, device=self.device)
        self.val_metrics["reward"].update(rollouts.rewards)
        self.val_metrics["answer_length"].update(lengths)
