"""The loss functions, on hand-made tensors (no model)."""

import math

import pytest
import torch

from minimind_pl.losses import IGNORE_INDEX, causal_lm_loss, token_log_probs
from minimind_pl.losses import (clipped_surrogate, final_token_rewards, generalized_advantages, group_advantages,
                                grpo_loss, k3_kl, masked_mean, ppo_losses, whiten)


def test_causal_lm_loss_is_mean_over_labelled_positions_only():
    logits = torch.randn(2, 3, 5)
    labels = torch.tensor([[1, IGNORE_INDEX, 4], [IGNORE_INDEX, IGNORE_INDEX, 0]])
    expected = torch.stack([
        -torch.log_softmax(logits[0, 0], -1)[1],
        -torch.log_softmax(logits[0, 2], -1)[4],
        -torch.log_softmax(logits[1, 2], -1)[0],
    ]).mean()
    assert torch.allclose(causal_lm_loss(logits, labels), expected, atol=1e-6)


def test_ignored_positions_do_not_change_the_loss():
    logits = torch.randn(1, 4, 7)
    labels = torch.tensor([[2, 3, IGNORE_INDEX, IGNORE_INDEX]])
    changed = logits.clone()
    changed[0, 2:] = 100 * torch.randn(2, 7)
    assert torch.allclose(causal_lm_loss(logits, labels), causal_lm_loss(changed, labels))


def test_uniform_logits_give_log_vocab():
    logits = torch.zeros(1, 3, 11)
    labels = torch.tensor([[0, 5, 10]])
    assert math.isclose(causal_lm_loss(logits, labels).item(), math.log(11), rel_tol=1e-6)


def test_all_ignored_is_zero_and_differentiable():
    logits = torch.randn(1, 2, 3, requires_grad=True)
    loss = causal_lm_loss(logits, torch.full((1, 2), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None


def test_token_log_probs_zero_where_ignored():
    logits = torch.randn(1, 3, 4)
    labels = torch.tensor([[1, IGNORE_INDEX, 2]])
    lp = token_log_probs(logits, labels)
    assert lp[0, 1] == 0
    assert torch.allclose(lp[0, 0], torch.log_softmax(logits[0, 0], -1)[1])


# ----------------------------------------------------------------------------- distillation (issue 7)

from minimind_pl.losses import distillation_loss, token_weights, weighted_causal_lm_loss  # noqa: E402


def test_distillation_loss_is_zero_for_equal_distributions():
    logits = torch.randn(2, 3, 9)
    labels = torch.tensor([[1, 2, 3], [4, IGNORE_INDEX, 5]])
    assert abs(distillation_loss(logits, logits.clone(), labels, temperature=1.5).item()) < 1e-6
    # a constant shift of the logits leaves the softmax, hence the KL, unchanged
    assert abs(distillation_loss(logits, logits + 3.0, labels, temperature=2.0).item()) < 1e-5


def test_distillation_loss_matches_kl_times_t_squared():
    student, teacher = torch.randn(1, 2, 6), torch.randn(1, 2, 6)
    labels = torch.tensor([[0, 1]])
    t = 1.5
    p = torch.softmax(teacher / t, -1)
    kl = (p * (torch.log(p) - torch.log_softmax(student / t, -1))).sum(-1).mean()
    assert torch.allclose(distillation_loss(student, teacher, labels, temperature=t), t**2 * kl, atol=1e-6)
    # T² scaling: the same softened distributions at temperature t and at 1 differ by exactly t²
    assert torch.allclose(distillation_loss(student / t, teacher / t, labels, temperature=1.0) * t**2,
                          distillation_loss(student, teacher, labels, temperature=t), atol=1e-6)


def test_distillation_loss_ignores_masked_positions_and_teacher_gradient():
    student = torch.randn(1, 3, 5, requires_grad=True)
    teacher = torch.randn(1, 3, 5, requires_grad=True)
    labels = torch.tensor([[2, IGNORE_INDEX, IGNORE_INDEX]])
    changed = teacher.detach().clone()
    changed[0, 1:] = 50 * torch.randn(2, 5)
    loss = distillation_loss(student, teacher, labels)
    assert torch.allclose(loss, distillation_loss(student, changed, labels))
    loss.backward()
    assert teacher.grad is None and torch.all(student.grad[0, 1:] == 0)
    assert distillation_loss(student, teacher, torch.full((1, 3), IGNORE_INDEX)).item() == 0.0


def test_weighted_causal_lm_loss_upweights_tags_but_divides_by_token_count():
    logits = torch.randn(1, 3, 8)
    labels = torch.tensor([[5, 7, IGNORE_INDEX]])
    ones = token_weights(labels, torch.tensor([3]), 10.0)
    assert torch.allclose(weighted_causal_lm_loss(logits, labels, ones), causal_lm_loss(logits, labels))
    weights = token_weights(labels, torch.tensor([7]), 10.0)
    assert weights.tolist() == [[1.0, 10.0, 1.0]]
    per_token = -torch.log_softmax(logits[0], -1)[[0, 1], [5, 7]]
    expected = (per_token[0] + 10 * per_token[1]) / 2
    assert torch.allclose(weighted_causal_lm_loss(logits, labels, weights), expected, atol=1e-6)


# ----------------------------------------------------------------------------- DPO (issue 6)

from minimind_pl.losses import dpo_loss, sequence_log_probs  # noqa: E402


def test_dpo_loss_is_log2_when_policy_equals_reference():
    logps = torch.tensor([-12.0, -3.5, -40.0]), torch.tensor([-10.0, -7.0, -41.0])
    loss, chosen, rejected = dpo_loss(*logps, *logps, beta=0.15)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6)
    assert torch.all(chosen == 0) and torch.all(rejected == 0)


def test_dpo_loss_matches_the_formula_and_rewards():
    pc, pr, rc, rr = torch.randn(4, 5).unbind()
    beta = 0.1
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta)
    expected = -torch.nn.functional.logsigmoid(beta * ((pc - pr) - (rc - rr))).mean()
    assert torch.allclose(loss, expected, atol=1e-6)
    assert torch.allclose(chosen, beta * (pc - rc)) and torch.allclose(rejected, beta * (pr - rr))


def test_raising_the_chosen_log_prob_lowers_the_dpo_loss():
    ref_c, ref_r = torch.tensor([-5.0]), torch.tensor([-6.0])
    pc = torch.tensor([-5.0], requires_grad=True)
    base, _, _ = dpo_loss(pc, ref_r, ref_c, ref_r, beta=0.15)
    base.backward()
    assert pc.grad.item() < 0  # gradient descent raises the chosen log-prob
    higher, _, _ = dpo_loss(pc.detach() + 1.0, ref_r, ref_c, ref_r, beta=0.15)
    lower_rejected, _, _ = dpo_loss(ref_c, ref_r - 1.0, ref_c, ref_r, beta=0.15)
    assert higher < base and lower_rejected < base


def test_sequence_log_probs_sums_only_labelled_tokens():
    logits = torch.randn(2, 4, 6)
    labels = torch.tensor([[1, 2, IGNORE_INDEX, IGNORE_INDEX], [IGNORE_INDEX, 0, 5, 3]])
    logp = torch.log_softmax(logits, -1)
    expected = torch.stack([logp[0, 0, 1] + logp[0, 1, 2], logp[1, 1, 0] + logp[1, 2, 5] + logp[1, 3, 3]])
    assert torch.allclose(sequence_log_probs(logits, labels), expected, atol=1e-6)


# ----------------------------------------------------------------------------- reinforcement learning

def test_group_advantages_compare_each_reward_with_its_own_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    std = math.sqrt(0.25 * 0.75)  # population std of (1, 0, 0, 0)
    expected = [0.75 / (std + 1e-4)] + [-0.25 / (std + 1e-4)] * 3 + [0.0] * 4  # an all-equal group gives 0
    assert group_advantages(rewards, 4).tolist() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(rewards, 3)


def test_k3_kl_is_the_schulman_estimator():
    policy, ref = torch.tensor([-1.0, -0.5]), torch.tensor([-2.0, -0.5])
    assert k3_kl(policy, ref).tolist() == pytest.approx([math.exp(-1) + 1 - 1, 0.0])


LOGPS = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]])
MASK = torch.tensor([[True, True], [True, False]])
ADVANTAGES = torch.tensor([1.0, -1.0])


def test_cispo_weights_each_token_log_prob_by_the_advantage():
    # ratio 1: per token -(A log p): row 0 (1 + 2) / 2, row 1 -0.5 -> mean 0.5
    loss, stats = grpo_loss(LOGPS, LOGPS, LOGPS, ADVANTAGES, MASK, beta=0.1, loss_type="cispo")
    assert float(loss) == pytest.approx(0.5)
    assert float(stats["kl"]) == 0.0 and float(stats["clip_fraction"]) == 0.0


def test_cispo_clamps_the_ratio_at_epsilon_high_and_keeps_the_gradient():
    logps = torch.tensor([[-1.0]], requires_grad=True)
    old = torch.tensor([[-1.0 - math.log(10.0)]])  # ratio 10
    loss, stats = grpo_loss(logps, old, logps.detach(), torch.tensor([1.0]), torch.tensor([[True]]), beta=0.0,
                            loss_type="cispo", epsilon_high=5.0)
    assert float(loss) == pytest.approx(5.0)  # -(5 * 1 * -1)
    loss.backward()
    assert float(logps.grad) == pytest.approx(-5.0)  # the clamped weight is detached: d/dlogp = -5
    assert float(stats["clip_fraction"]) == 1.0


@pytest.mark.parametrize("advantage, expected", [(1.0, -1.2), (-1.0, 1.5)])
def test_grpo_clips_the_ratio_on_the_side_the_advantage_pushes(advantage, expected):
    old = torch.tensor([[-1.0]])
    logps = old + math.log(1.5)  # ratio 1.5, clipped to 1.2
    loss, stats = grpo_loss(logps, old, logps, torch.tensor([advantage]), torch.tensor([[True]]), beta=0.0,
                            loss_type="grpo", epsilon=0.2)
    assert float(loss) == pytest.approx(expected)
    assert float(stats["clip_fraction"]) == 1.0


def test_grpo_adds_beta_times_the_kl_to_the_reference():
    ref = LOGPS - 1.0  # every token: delta -1
    loss, stats = grpo_loss(LOGPS, LOGPS, ref, torch.zeros(2), MASK, beta=0.1, loss_type="grpo")
    kl = math.exp(-1)  # k3 with delta -1
    assert float(loss) == pytest.approx(0.1 * kl) and float(stats["kl"]) == pytest.approx(kl)
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(LOGPS, LOGPS, ref, torch.zeros(2), MASK, loss_type="ppo")


def test_gae_discounts_the_final_reward_back_over_the_answer():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.5, 0.5, 9.0]])  # the last position is not in the answer: its value is ignored
    mask = torch.tensor([[True, True, True, False]])
    advantages, returns = generalized_advantages(rewards, values, mask, gamma=1.0, lam=0.95)
    assert advantages.tolist()[0] == pytest.approx([0.95 * 0.475, 0.475, 0.5, 0.0])
    assert returns.tolist()[0] == pytest.approx([0.95125, 0.975, 1.0, 0.0])


def test_gae_with_gamma_below_one_discounts_values_too():
    advantages, _ = generalized_advantages(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]]),
                                           torch.tensor([[True, True]]), gamma=0.5, lam=1.0)
    # delta_1 = 1, delta_0 = 0 + 0.5 * 0 - 1 = -1; A_0 = -1 + 0.5 * 1 = -0.5
    assert advantages.tolist()[0] == pytest.approx([-0.5, 1.0])


def test_whiten_and_masked_mean_ignore_what_is_masked_out():
    values, mask = torch.tensor([[1.0, 3.0, 100.0]]), torch.tensor([[True, True, False]])
    assert float(masked_mean(values, mask)) == 2.0
    assert whiten(values, mask).tolist()[0] == pytest.approx([-1.0, 1.0, 0.0], abs=1e-6)


def test_ppo_value_loss_clips_a_value_that_moved_too_far():
    one = torch.ones(1, 1)
    mask = torch.ones(1, 1, dtype=torch.bool)
    # value moved 0 -> 1, return 1: unclipped error 0, clipped (0.2 - 1)^2 = 0.64 -> the larger, halved
    policy_loss, value_loss, stats = ppo_losses(-one, -one, -one, one, one, 0 * one, one, mask,
                                                clip_epsilon=0.2, value_clip=0.2, kl_coef=0.02)
    assert float(value_loss) == pytest.approx(0.32)
    assert float(policy_loss) == pytest.approx(-1.0)  # ratio 1, advantage 1, no KL
    assert float(stats["approx_kl"]) == 0.0


def test_clipped_surrogate_marks_the_clipped_tokens():
    old = torch.zeros(1, 3)
    logps = torch.log(torch.tensor([[0.7, 1.0, 1.3]]))
    objective, clipped = clipped_surrogate(logps, old, torch.ones(1, 3), epsilon=0.2)
    assert objective.tolist()[0] == pytest.approx([0.7, 1.0, 1.2])
    assert clipped.tolist() == [[True, False, True]]


def test_final_token_rewards_put_each_reward_on_its_answers_last_token():
    mask = torch.tensor([[False, True, True, False], [True, False, False, False], [False, False, True, True]])
    rewards = final_token_rewards(torch.tensor([1.0, -2.0, 3.0]), mask)
    assert rewards.tolist() == [[0, 0, 1, 0], [-2, 0, 0, 0], [0, 0, 0, 3]]


# ----------------------------------------------------------------------------- hand-computed values (issue 24)

def test_a_single_labelled_token_is_its_own_mean():
    # one labelled token: every loss divides by 1, so the loss is that token's own value
    logits = torch.log(torch.tensor([[[0.25, 0.25, 0.5], [0.2, 0.3, 0.5]]]))
    labels = torch.tensor([[2, IGNORE_INDEX]])
    assert float(causal_lm_loss(logits, labels)) == pytest.approx(math.log(2))  # -log 0.5
    weights = torch.tensor([[3.0, 1.0]])
    assert float(weighted_causal_lm_loss(logits, labels, weights)) == pytest.approx(3 * math.log(2))
    teacher = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.2, 0.3, 0.5]]]))
    # KL(teacher || student) at T=1: .5 log(.5/.25) + .25 log(.25/.25) + .25 log(.25/.5) = .25 log 2
    assert float(distillation_loss(logits, teacher, labels)) == pytest.approx(0.25 * math.log(2), rel=1e-5)


def test_distillation_refuses_a_bad_temperature_and_another_vocabulary_with_the_numbers():
    student, labels = torch.zeros(1, 2, 6), torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"temperature must be > 0, got 0"):
        distillation_loss(student, student, labels, temperature=0)
    with pytest.raises(ValueError, match=r"student logits \(1, 2, 6\) and teacher logits \(1, 2, 7\) differ"):
        distillation_loss(student, torch.zeros(1, 2, 7), labels)


def test_clipped_surrogate_is_pessimistic_on_both_sides():
    # ratios .5 1 1.1 1.5 with advantages -1 -1 2 2, epsilon .2 (clip range [.8, 1.2]):
    # min(-.5, .8 * -1) = -.8; min(-1, -1) = -1; min(2.2, 2.2) = 2.2; min(3, 1.2 * 2) = 2.4
    logps = torch.log(torch.tensor([[0.5, 1.0, 1.1, 1.5]]))
    objective, clipped = clipped_surrogate(logps, torch.zeros(1, 4), torch.tensor([[-1.0, -1.0, 2.0, 2.0]]), 0.2)
    assert objective.tolist()[0] == pytest.approx([-0.8, -1.0, 2.2, 2.4])
    assert clipped.tolist() == [[True, False, False, True]]


def test_cispo_multiplies_weight_advantage_and_log_prob():
    # ratio 1 (weight 1), advantage 2, log p -.5: 1 * 2 * -.5 = -1; ratio 10 -> weight 5: 5 * 2 * -.5 = -5
    logps = torch.tensor([[-0.5, -0.5]])
    old = logps - torch.tensor([[0.0, math.log(10.0)]])
    loss, stats = grpo_loss(logps, old, logps, torch.tensor([2.0]), torch.tensor([[True, True]]), beta=0.0,
                            loss_type="cispo", epsilon_high=5.0)
    assert float(loss) == pytest.approx(3.0)  # -mean(-1, -5)
    assert float(stats["clip_fraction"]) == 0.5


def test_grpo_loss_defaults_are_minimind_s():
    # defaults: CISPO, epsilon_high 5, beta .1. Ratio 10 -> weight 5; log p -1, advantage 1: objective -5;
    # reference 1 below the policy: k3 = e^-1 + 1 - 1 = e^-1; loss -(-5 - .1 e^-1) = 5 + .1 e^-1
    logps, one = torch.tensor([[-1.0]]), torch.tensor([1.0])
    loss, _ = grpo_loss(logps, logps - math.log(10.0), logps - 1.0, one, torch.tensor([[True]]))
    assert float(loss) == pytest.approx(5 + 0.1 * math.exp(-1))
    # "grpo" with the default epsilon .2: ratio 1.5 clipped to 1.2, advantage 1, no KL -> -1.2
    loss, _ = grpo_loss(logps, logps - math.log(1.5), logps, one, torch.tensor([[True]]), loss_type="grpo")
    assert float(loss) == pytest.approx(-1.2)


def test_gae_uses_the_value_of_the_last_answer_token_and_minimind_s_defaults():
    rewards, values = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.25]])
    mask = torch.tensor([[True, True]])
    # gamma 1, lambda 1: delta_1 = 1 - .25 = .75; delta_0 = 0 + .25 - .5 = -.25; A_0 = -.25 + .75 = .5
    advantages, returns = generalized_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    assert advantages.tolist()[0] == pytest.approx([0.5, 0.75])
    assert returns.tolist()[0] == pytest.approx([1.0, 1.0])
    # defaults gamma 1, lambda .95: A_0 = -.25 + .95 * .75 = .4625
    assert generalized_advantages(rewards, values, mask)[0].tolist()[0] == pytest.approx([0.4625, 0.75])
    # a one-token answer: A = r - V
    assert generalized_advantages(torch.tensor([[1.0]]), torch.tensor([[0.25]]),
                                  torch.tensor([[True]]))[0].tolist() == [[0.75]]


def test_whiten_scales_to_unit_variance_and_leaves_constant_values_at_zero():
    mask = torch.tensor([[True, True, False]])
    # mean 3, population variance 4: (1 - 3) / 2 = -1, (5 - 3) / 2 = 1
    assert whiten(torch.tensor([[1.0, 5.0, 7.0]]), mask).tolist()[0] == pytest.approx([-1.0, 1.0, 0.0], abs=1e-6)
    assert whiten(torch.tensor([[2.0, 2.0, 7.0]]), mask).tolist() == [[0.0, 0.0, 0.0]]  # variance 0: not NaN


def test_ppo_kl_penalty_pulls_the_policy_towards_the_reference():
    # ratio 1 (old = new), advantage 0: the policy loss is kl_coef * k3 KL; the reference 1 below: k3 = e^-1
    logps, zero, mask = torch.tensor([[-1.0]]), torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool)
    policy_loss, _, stats = ppo_losses(logps, logps, logps - 1.0, zero, zero, zero, zero, mask, kl_coef=0.5)
    assert float(policy_loss) == pytest.approx(0.5 * math.exp(-1))  # a penalty: it raises the loss
    assert float(stats["kl"]) == pytest.approx(math.exp(-1))
    # MiniMind's default kl_coef .02
    assert float(ppo_losses(logps, logps, logps - 1.0, zero, zero, zero, zero, mask)[0]) == pytest.approx(
        0.02 * math.exp(-1))


def test_ppo_value_loss_and_stats_by_hand():
    # two tokens, old values 1 and 0, value_clip .2:
    #  token 0: V 0 (moved -1, clipped to .8), return 0: max(0, .8^2) = .64
    #  token 1: V 3 (moved +3, clipped to .2), return 0: max(9, .04) = 9
    # value loss ½ mean(.64, 9) = 2.41
    mask = torch.ones(1, 2, dtype=torch.bool)
    values, old_values, returns = torch.tensor([[0.0, 3.0]]), torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2)
    # log-ratios .5 and -.5, advantages 0: approx_kl = ½ mean(.25, .25) = .125;
    # ratios e^.5 = 1.65 and e^-.5 = .61 both leave [.8, 1.2]
    logps, old = torch.tensor([[0.5, -0.5]]), torch.zeros(1, 2)
    _, value_loss, stats = ppo_losses(logps - 1, old - 1, logps - 1, torch.zeros(1, 2), values, old_values, returns,
                                      mask, value_clip=0.2)
    assert float(value_loss) == pytest.approx(2.41)
    assert set(stats) == {"approx_kl", "kl", "clip_fraction"}
    assert float(stats["approx_kl"]) == pytest.approx(0.125) and float(stats["clip_fraction"]) == 1.0
    # defaults: clip_epsilon .2 and value_clip .2 (ratio e^.1 = 1.105 stays inside, advantage 1: objective 1.105)
    _, default_value_loss, _ = ppo_losses(logps - 1, old - 1, logps - 1, torch.zeros(1, 2), values, old_values,
                                          returns, mask)
    assert float(default_value_loss) == pytest.approx(2.41)
    ratio_one = torch.tensor([[0.1]])
    policy_loss, _, stats = ppo_losses(ratio_one, torch.zeros(1, 1), ratio_one, torch.ones(1, 1), torch.zeros(1, 1),
                                       torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool))
    assert float(policy_loss) == pytest.approx(-math.exp(0.1)) and float(stats["clip_fraction"]) == 0.0
    # ratio e^.5 = 1.65 with the default clip .2: objective 1.2
    policy_loss, _, _ = ppo_losses(torch.tensor([[0.5]]), torch.zeros(1, 1), torch.tensor([[0.5]]), torch.ones(1, 1),
                                   torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1),
                                   torch.ones(1, 1, dtype=torch.bool))
    assert float(policy_loss) == pytest.approx(-1.2)


def test_final_token_rewards_keep_the_rewards_precision():
    rewards = final_token_rewards(torch.tensor([0.1], dtype=torch.float64), torch.tensor([[True, True]]))
    assert rewards.dtype == torch.float64 and rewards.tolist() == [[0.0, 0.1]]


def test_siglip_loss_equals_the_papers_double_sum():
    """-1/|B| Σ_i Σ_j log σ(z_ij (t x_i·y_j + b)), written as a loop over pairs with math on Python floats."""
    from minimind_pl.losses import siglip_loss

    torch.manual_seed(0)
    images, texts = torch.randn(3, 4), torch.randn(3, 4)
    log_t, b = torch.tensor(math.log(10.0)), torch.tensor(-2.0)
    total = 0.0
    for i in range(3):
        x = [v / math.sqrt(sum(w * w for w in images[i].tolist())) for v in images[i].tolist()]
        for j in range(3):
            y = [v / math.sqrt(sum(w * w for w in texts[j].tolist())) for v in texts[j].tolist()]
            z = 1.0 if i == j else -1.0
            logit = 10.0 * sum(a * c for a, c in zip(x, y)) + b.item()
            total += -math.log(1 / (1 + math.exp(-z * logit)))
    assert siglip_loss(images, texts, log_t, b).item() == pytest.approx(total / 3, rel=1e-5)


def test_siglip_loss_by_hand_on_aligned_unit_vectors():
    """Two orthogonal unit pairs, t = 1, b = 0: each diagonal logit is 1, each off-diagonal one 0, so the loss is
    (2·log(1 + e⁻¹) + 2·log 2) / 2; scaling an embedding changes nothing (they are normalised)."""
    from minimind_pl.losses import siglip_loss

    eye = torch.eye(2)
    expected = math.log(1 + math.exp(-1)) + math.log(2)
    assert siglip_loss(eye, eye, torch.tensor(0.0), torch.tensor(0.0)).item() == pytest.approx(expected, rel=1e-6)
    assert siglip_loss(3 * eye, eye, torch.tensor(0.0), torch.tensor(0.0)).item() == pytest.approx(expected, rel=1e-6)
    swapped = eye.flip(0)  # every image now matches another's text: the loss grows
    assert siglip_loss(eye, swapped, torch.tensor(0.0), torch.tensor(0.0)).item() > expected
