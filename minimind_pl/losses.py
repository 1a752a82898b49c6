"""Training losses as pure functions of tensors: no model, no Lightning.

Every stage computes its objective through one of these, so each can be tested on hand-made tensors.
Label convention (shared with the data modules): ``labels[:, t]`` is the target of position ``t``
(already shifted) and ``IGNORE_INDEX`` marks positions that carry no loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over the positions whose label is not ``IGNORE_INDEX``.

    Args:
        logits: (B, T, V) scores for the next token at every position.
        labels: (B, T) target ids, already shifted; ``IGNORE_INDEX`` is skipped.

    Returns:
        0-d tensor. If no position carries a label, the loss is 0 (not NaN) and still differentiable.
    """
    logits_2d = logits.reshape(-1, logits.size(-1)).float()  # (B*T, V), fp32 for a stable log-softmax
    summed = F.cross_entropy(logits_2d, labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    count = (labels != IGNORE_INDEX).sum().clamp(min=1)
    return summed / count


def token_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each label token; 0 where the label is ``IGNORE_INDEX``.

    Args:
        logits: (B, T, V).
        labels: (B, T), already shifted.

    Returns:
        (B, T) float32 log-probs.
    """
    mask = labels != IGNORE_INDEX
    safe_labels = labels.masked_fill(~mask, 0)
    log_probs = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    picked = log_probs.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return picked * mask


def weighted_causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy with a weight per position, normalised by the number of labelled positions.

    MiniMind's reasoning recipe (``train_distill_reason.py``): the loss of each labelled token is
    multiplied by its weight (e.g. 10 on ``<think>`` / ``</think>``), and the sum is divided by the
    number of labelled tokens, not by the sum of the weights. With all weights 1 this equals
    ``causal_lm_loss``.

    Args:
        logits: (B, T, V) scores for the next token at every position.
        labels: (B, T) target ids, already shifted; ``IGNORE_INDEX`` is skipped.
        weights: (B, T) weight of each position's loss (ignored where the label is ``IGNORE_INDEX``).

    Returns:
        0-d tensor (0 if no position carries a label).
    """
    per_token = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )  # (B*T,), 0 where ignored
    count = (labels != IGNORE_INDEX).sum().clamp(min=1)
    return (per_token * weights.reshape(-1).to(per_token.dtype)).sum() / count


def token_weights(labels: torch.Tensor, token_ids: torch.Tensor, weight: float) -> torch.Tensor:
    """(B, T) float weights: ``weight`` where the label is one of ``token_ids``, 1 elsewhere.

    Args:
        labels: (B, T) target ids.
        token_ids: 1-d tensor of the ids to up-weight (on the labels' device).
        weight: Weight of those positions.
    """
    hit = torch.isin(labels, token_ids)
    return 1.0 + (weight - 1.0) * hit.float()


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``T² · KL(teacher ∥ student)`` of the temperature-softened next-token distributions.

    Averaged over the positions whose label is not ``IGNORE_INDEX`` (the answer tokens), as MiniMind's
    ``train_distillation.py`` (``kl_div(..., reduction="batchmean")`` over the selected positions). The
    ``T²`` factor keeps the gradient scale independent of the temperature (Hinton et al., 2015). No
    gradient flows into the teacher's logits.

    Args:
        student_logits: (B, T, V) scores of the model being trained.
        teacher_logits: (B, T, V) scores of the frozen teacher on the same inputs (same vocabulary).
        labels: (B, T) target ids, already shifted; only their mask (``!= IGNORE_INDEX``) is used.
        temperature: Softmax temperature T (> 0) applied to both distributions (MiniMind: 1.5).

    Returns:
        0-d tensor, 0 when the distributions are equal or no position carries a label.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape (same vocabulary needed)")
    student_log_probs = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_log_probs = torch.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    per_token = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="none").sum(-1)  # (B, T)
    mask = labels != IGNORE_INDEX
    return temperature**2 * (per_token * mask).sum() / mask.sum().clamp(min=1)


def sequence_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each row's labelled tokens: the sum of ``token_log_probs`` over the row.

    Args:
        logits: (B, T, V).
        labels: (B, T), already shifted; ``IGNORE_INDEX`` positions add nothing.

    Returns:
        (B,) float32.
    """
    return token_log_probs(logits, labels).sum(dim=-1)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimization (Rafailov et al. 2023): ``-log sigmoid(beta * (policy margin - ref margin))``.

    The margin is ``log p(chosen) - log p(rejected)`` of whole answers (``sequence_log_probs``). Equal
    policy and reference give ``log 2``; raising the chosen answer's log-prob lowers the loss.

    Args:
        policy_chosen_logps: (B,) log-probs of the chosen answers under the trained model.
        policy_rejected_logps: (B,) log-probs of the rejected answers under the trained model.
        ref_chosen_logps: (B,) log-probs of the chosen answers under the frozen reference.
        ref_rejected_logps: (B,) log-probs of the rejected answers under the frozen reference.
        beta: strength of the implicit KL penalty (MiniMind: 0.15; 0.1 in its earlier recipe).

    Returns:
        ``(loss, chosen_rewards, rejected_rewards)``: the mean loss (0-d) and the implicit rewards
        ``beta * (policy - ref)`` of each answer, (B,) each, detached (for logging).
    """
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    loss = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio)).mean()
    return loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
