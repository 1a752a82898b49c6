"""The Pretrain / SFT stage's loss: packed documents stay apart, RoPE positions and the MoE router loss count."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from helpers import packed_batch, random_documents, random_model, with_weights
from minimind_pl.stages import SFT, Pretrain

LENGTHS = [5, 9, 4, 7]  # uneven, so no document lines up with another's positions


def test_packed_documents_give_the_loss_of_the_documents_alone():
    """A packed row trains each document as if it were alone: attention stops at document boundaries."""
    model = random_model(seed=1)
    docs = random_documents(LENGTHS, seed=2)
    batch = packed_batch(docs)
    with torch.no_grad():
        summed = sum(F.cross_entropy(model(d[None]).logits[0, :-1], d[1:], reduction="sum") for d in docs)
        alone = summed / sum(len(d) - 1 for d in docs)  # token-weighted over every labelled position
        for stage in (Pretrain(config=model.config), SFT(config=model.config)):
            loss, logs = with_weights(stage, model).compute_loss(batch)
            assert math.isclose(loss.item(), alone.item(), rel_tol=1e-5), type(stage).__name__
            assert torch.equal(logs["lm_loss"], loss)
        # documents that could see each other would score otherwise: the check above is not vacuous
        leaky = causal_lm_loss_of(model, batch["input_ids"], batch["labels"])
    assert abs(leaky - alone.item()) > 1e-3


def test_the_batch_position_ids_reach_rope():
    """Rows carry their own RoPE positions, and the stage's loss is the model's at those positions.

    RoPE scores depend only on the offset between two positions, so positions that restart per document
    give the same loss as counting on (the packing test above cannot see them); spaced-out positions can.
    """
    model = random_model(seed=1)
    (doc,) = random_documents([12], seed=3)
    positions = 3 * torch.arange(12)[None]
    batch = {"input_ids": doc[None], "labels": torch.cat([doc[1:], torch.tensor([-100])])[None],
             "position_ids": positions, "doc_ids": torch.zeros(1, 12, dtype=torch.long)}
    with torch.no_grad():
        logits = model(doc[None], position_ids=positions).logits[0, :-1]
        expected = F.cross_entropy(logits, doc[1:]).item()
        loss, _ = with_weights(Pretrain(config=model.config), model).compute_loss(batch)
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)
    assert abs(causal_lm_loss_of(model, doc[None], batch["labels"]) - expected) > 1e-3  # positions matter here


def test_moe_router_loss_is_added_and_logged():
    """With experts, training minimises cross entropy plus the load-balancing loss, and logs that loss."""
    coef = 0.1
    model = random_model(seed=4, use_moe=True, num_experts=4, num_experts_per_tok=2, router_aux_loss_coef=coef)
    docs = random_documents([10, 6], seed=5)
    batch = packed_batch(docs)
    stage = with_weights(Pretrain(config=model.config), model).train()  # the router loss exists in training only
    router_probs = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, i, out: router_probs.append(out.float().softmax(-1)))
             for layer in stage.model.model.layers]
    with torch.no_grad():
        loss, logs = stage.compute_loss(batch)
    for hook in hooks:
        hook.remove()
    # MiniMind's load balancing per layer: E * coef * sum_e (share of tokens routed to e) * (mean probability of e)
    aux = 0.0
    for probs in router_probs:  # (tokens, E)
        chosen = F.one_hot(probs.topk(2, dim=-1).indices, 4).sum(1).float()  # (tokens, E), top-2 marks
        aux += 4 * coef * (chosen.mean(0) * probs.mean(0)).sum().item()
    with torch.no_grad():
        ce = F.cross_entropy(stage.model(batch["input_ids"], position_ids=batch["position_ids"],
                                         doc_ids=batch["doc_ids"]).logits[0], batch["labels"][0]).item()
    assert len(router_probs) == model.config.num_hidden_layers and aux > 0.05
    assert math.isclose(logs["aux_loss"].item(), aux, rel_tol=1e-5)
    assert math.isclose(logs["lm_loss"].item(), ce, rel_tol=1e-5)
    assert math.isclose(loss.item(), ce + aux, rel_tol=1e-5)


def causal_lm_loss_of(model, input_ids: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean cross entropy of a row under plain causal attention with positions 0, 1, 2, ..."""
    logits = model(input_ids).logits
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100).item()
