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


# ----------------------------------------------------------------------------- reinforcement learning
# Per-token tensors below are (N, R): N sampled answers, R positions; ``mask`` (N, R) marks the answer tokens
# (through the first eos) that carry a loss. Log-probs come from ``token_log_probs``.


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is set, over ``dim`` (or everything); 0 where nothing is set."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantage: each reward against its group, ``(r - mean) / (std + eps)``.

    Args:
        rewards: (N,) rewards, the ``group_size`` answers to one prompt consecutive.
        group_size: answers per prompt (MiniMind: 6).
        eps: keeps a group whose answers all scored the same at advantage 0 (MiniMind: 1e-4).

    Returns:
        (N,) advantages. The std is the population std (MiniMind: ``unbiased=False``).
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.float().view(-1, group_size)  # (P, G)
    mean, std = grouped.mean(dim=1, keepdim=True), grouped.std(dim=1, unbiased=False, keepdim=True)
    return ((grouped - mean) / (std + eps)).reshape(-1)


def k3_kl(policy_logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL(policy ∥ reference) by Schulman's k3 estimator: ``exp(r - p) - (r - p) - 1`` (>= 0)."""
    delta = ref_logps - policy_logps
    return torch.exp(delta) - delta - 1


def clipped_surrogate(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                      epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped objective per token, ``min(ratio A, clip(ratio, 1-ε, 1+ε) A)`` (to maximise).

    Args:
        logps, old_logps: (N, R) log-probs of the sampled tokens now and when they were sampled.
        advantages: (N, R), or (N, 1) for one advantage per answer.
        epsilon: the clip range (MiniMind: 0.2).

    Returns:
        ``(objective (N, R), clipped (N, R) bool)``: where the ratio left ``[1-ε, 1+ε]``.
    """
    ratio = torch.exp(logps - old_logps)
    objective = torch.min(ratio * advantages, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * advantages)
    return objective, (ratio - 1).abs() > epsilon


def cispo_surrogate(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                    epsilon_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """CISPO's objective per token: ``sg(min(ratio, ε_high)) · A · log p`` (to maximise).

    The clipped importance weight is detached, so every token keeps a gradient (PPO's clip zeroes it).

    Returns:
        ``(objective (N, R), clipped (N, R) bool)``: where the ratio exceeded ``epsilon_high``.
    """
    ratio = torch.exp(logps - old_logps)
    weight = torch.clamp(ratio, max=epsilon_high).detach()
    return weight * advantages * logps, ratio > epsilon_high


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, beta: float = 0.1, loss_type: str = "cispo", epsilon: float = 0.2,
              epsilon_high: float = 5.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's policy loss (MiniMind's ``train_grpo.py``): ``-(surrogate - β · k3 KL)`` per token, averaged over each
    answer's tokens, then over the answers.

    Args:
        logps, old_logps, ref_logps: (N, R) log-probs of the answer tokens under the policy (with gradient), the
            policy that sampled them, and the frozen reference.
        advantages: (N,) one advantage per answer (``group_advantages``).
        mask: (N, R) answer tokens.
        beta: weight of the KL to the reference (MiniMind: 0.1).
        loss_type: ``"grpo"`` (PPO's clipped ratio, ``epsilon``) or ``"cispo"`` (ratio clamped at ``epsilon_high``
            and detached; MiniMind's default).

    Returns:
        ``(loss 0-d, stats)``: stats (detached) are ``kl`` (mean k3 KL per token) and ``clip_fraction``.
    """
    adv = advantages.unsqueeze(1).to(logps.dtype)  # (N, 1)
    if loss_type == "grpo":
        objective, clipped = clipped_surrogate(logps, old_logps, adv, epsilon)
    elif loss_type == "cispo":
        objective, clipped = cispo_surrogate(logps, old_logps, adv, epsilon_high)
    else:
        raise ValueError(f"loss_type must be 'grpo' or 'cispo', got {loss_type!r}")
    kl = k3_kl(logps, ref_logps)
    per_token = -(objective - beta * kl)  # (N, R)
    loss = masked_mean(per_token, mask, dim=1).mean()
    stats = {"kl": masked_mean(kl.detach(), mask), "clip_fraction": masked_mean(clipped.float(), mask)}
    return loss, stats


def final_token_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token rewards (N, R) with each answer's reward (N,) on its last masked position, 0 elsewhere (PPO)."""
    last = mask.float().cumsum(dim=1).argmax(dim=1)  # (N,) the first position holding the row's full count
    token_rewards = torch.zeros(mask.shape, dtype=rewards.dtype, device=rewards.device)
    token_rewards[torch.arange(len(last), device=last.device), last] = rewards
    return token_rewards * mask


def generalized_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                           lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016) over answer tokens.

    ``δ_t = r_t + γ V_{t+1} - V_t`` and ``A_t = δ_t + γ λ A_{t+1}``, with ``V`` 0 after the answer's last token.

    Args:
        rewards: (N, R) per-token rewards (PPO here: the answer's reward on its last token).
        values: (N, R) the critic's values of the answer tokens.
        mask: (N, R) answer tokens (one contiguous run per row).
        gamma, lam: discount and GAE λ (MiniMind: 1.0 and 0.95).

    Returns:
        ``(advantages (N, R), returns (N, R))`` with ``returns = advantages + values``; 0 outside the mask.
    """
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running  # 0 after the answer: no reward, no value
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``values`` shifted and scaled to mean 0, variance 1 over the masked entries; 0 elsewhere."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    return (values - mean) * torch.rsqrt(var + eps) * mask.to(values.dtype)


def ppo_losses(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor, advantages: torch.Tensor,
               values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_epsilon: float = 0.2, value_clip: float = 0.2, kl_coef: float = 0.02,
               ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's policy and value losses (MiniMind's ``train_ppo.py``), averaged over all answer tokens of the batch.

    Policy: ``-clipped_surrogate + kl_coef · k3 KL`` to the reference. Value: ``½ max((V - G)², (clip(V, V_old ± c)
    - G)²)``.

    Args:
        logps, old_logps, ref_logps: (N, R) answer-token log-probs (policy with gradient, sampling policy, reference).
        advantages: (N, R) whitened GAE advantages; values, old_values, returns: (N, R) the critic's values now
            (with gradient) and at sampling time, and the GAE returns.
        mask: (N, R) answer tokens.
        clip_epsilon, value_clip, kl_coef: MiniMind's 0.2, 0.2 and 0.02.

    Returns:
        ``(policy_loss, value_loss, stats)``: stats (detached) are ``approx_kl`` (½ mean squared log-ratio, to the
        sampling policy), ``kl`` (k3, to the reference) and ``clip_fraction``.
    """
    objective, clipped = clipped_surrogate(logps, old_logps, advantages, clip_epsilon)
    kl = k3_kl(logps, ref_logps)
    policy_loss = -masked_mean(objective, mask) + kl_coef * masked_mean(kl, mask)
    clipped_values = old_values + (values - old_values).clamp(-value_clip, value_clip)
    value_loss = 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped_values - returns) ** 2), mask)
    log_ratio = (logps - old_logps).detach()
    stats = {"approx_kl": masked_mean(0.5 * log_ratio ** 2, mask), "kl": masked_mean(kl.detach(), mask),
             "clip_fraction": masked_mean(clipped.float(), mask)}
    return policy_loss, value_loss, stats


def siglip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023): every image against every text of the batch.

    ``-1/|B| Σ_i Σ_j log σ(z_ij (t x_i·y_j + b))`` with x, y the L2-normalised embeddings, t = exp(``logit_scale``),
    b = ``logit_bias``, z_ij = +1 when i = j (image i's own text) and -1 otherwise. Each pair is its own binary
    problem, so no softmax over the batch is needed.

    Args:
        image_emb: (B, D) image embeddings (normalised here).
        text_emb: (B, D) text embeddings; row i belongs to image i.
        logit_scale: 0-d log temperature (the paper starts it at log 10, the bias at -10).
        logit_bias: 0-d bias.

    Returns:
        0-d float32 loss, summed over the B² pairs and divided by B.
    """
    x = F.normalize(image_emb.float(), dim=-1)
    y = F.normalize(text_emb.float(), dim=-1)
    logits = x @ y.T * logit_scale.float().exp() + logit_bias.float()  # (B, B): image i, text j
    signs = 2 * torch.eye(logits.shape[0], device=logits.device) - 1  # z: +1 on the diagonal, -1 elsewhere
    return F.softplus(-signs * logits).sum() / logits.shape[0]  # -log σ(v) = softplus(-v)
