"""The loss functions, on hand-made tensors (no model)."""

import math

import torch

from minimind_pl.losses import IGNORE_INDEX, causal_lm_loss, token_log_probs


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
