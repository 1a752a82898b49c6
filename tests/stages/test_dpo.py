"""The DPO stage: loss at the start, reference handling (frozen, unsaved, precomputable) and a short real fit."""
import copy
import math
from itertools import islice

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from helpers import random_documents, random_model
from minimind_pl.config import ModelConfig
from minimind_pl.data import DPODataModule
from minimind_pl.stages import DPO
from minimind_pl.stages.dpo import preference_accuracy


@pytest.fixture(scope="module")
def pairs_file(shared_dir, tmp_path_factory):
    """The first 16 pairs of the shared real DPO corpus (poems: recitations and authors)."""
    path = tmp_path_factory.mktemp("dpo") / "dpo_real_16.jsonl"
    with open(shared_dir / "corpus" / "dpo_real.jsonl", encoding="utf-8") as f:
        path.write_text("".join(islice(f, 16)), encoding="utf-8")
    return path


def _datamodule(pairs_file, shared_dir, **kwargs):
    args = dict(seq_len=64, batch_size=4, val_path=str(pairs_file), tokenizer=str(shared_dir / "minimind"),
                num_workers=0, cache_dir=str(pairs_file.parent / "cache"))
    dm = DPODataModule(str(pairs_file), **{**args, **kwargs})
    dm.setup("fit")
    return dm


def _stage(seed=0, **kwargs):
    torch.manual_seed(seed)
    return DPO(config=ModelConfig.from_preset("debug"), **{"beta": 0.1, "learning_rate": 5e-3, **kwargs})


def test_loss_is_log2_at_start_and_precomputed_reference_gives_the_same_loss(pairs_file, shared_dir):
    dm = _datamodule(pairs_file, shared_dir)
    batch = next(iter(dm.train_dataloader()))
    live, pre = _stage(), _stage(precompute_reference=True)
    assert torch.equal(live.model.lm_head.weight, pre.model.lm_head.weight)
    loss, logs = live.compute_loss(batch)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-5) and logs["reward_accuracy"].item() == 0.0
    pre.precompute_reference_logps({"train": dm.reference_dataloader("train")}, {"train": len(dm.train_dataset)})
    assert pre.reference.released  # released: training holds one model
    with torch.no_grad():  # move the policy a little: both must still agree
        for module in (live, pre):
            module.model.lm_head.weight.add_(0.01)
    assert torch.allclose(live.compute_loss(batch)[0], pre.compute_loss(batch)[0], atol=1e-5)


def test_loss_is_the_dpo_formula_with_the_configured_beta_plus_the_sft_term():
    """By hand: mean -log sigmoid(beta * ((pc - rc) - (pr - rr))) + sft_weight * NLL of the chosen answer tokens.

    beta and sft_weight are not the defaults and the policy has moved away from the reference, so another
    beta, a flipped sign or a missing term changes the value.
    """
    beta, sft_weight = 0.37, 0.5
    stage = _stage(beta=beta, sft_weight=sft_weight).eval()
    reference = copy.deepcopy(stage.model)  # the starting weights, which the stage froze as its reference
    policy = random_model(seed=1)
    with torch.no_grad():
        policy.model.norm.weight.mul_(4)  # sharper logits: answer log-probs far from the reference's
    stage.model.load_state_dict(policy.state_dict())  # the policy moves
    prompts, answers = random_documents([3, 5], seed=2), random_documents([4, 6, 3, 5], seed=3)
    chosen, rejected = answers[:2], answers[2:]
    batch = {**pair_rows(prompts, chosen, "chosen", 12), **pair_rows(prompts, rejected, "rejected", 12),
             "index": torch.tensor([0, 1])}

    def answer_log_probs(model, prompt, answer):  # per answer token: log p(token | prompt, earlier tokens)
        row = torch.cat([prompt, answer])
        log_probs = torch.log_softmax(model(row[None]).logits[0].float(), -1)
        return log_probs[len(prompt) - 1:-1].gather(-1, answer[:, None]).squeeze(-1)

    with torch.no_grad():
        tokens = {k: [answer_log_probs(stage.model, p, a) for p, a in zip(prompts, v)]
                  for k, v in (("chosen", chosen), ("rejected", rejected))}
        ref = {k: [answer_log_probs(reference, p, a).sum() for p, a in zip(prompts, v)]
               for k, v in (("chosen", chosen), ("rejected", rejected))}
        margins = torch.stack([(pc.sum() - rc) - (pr.sum() - rr) for pc, rc, pr, rr
                               in zip(tokens["chosen"], ref["chosen"], tokens["rejected"], ref["rejected"])])
        dpo = -F.logsigmoid(beta * margins).mean().item()
        nll = -torch.cat(tokens["chosen"]).mean().item()  # over the chosen answers' tokens
        loss, logs = stage.compute_loss(batch)
    assert margins.abs().min() > 1.0 and nll > 1.0  # the reference and the SFT term both weigh
    assert logs["dpo_loss"].item() == pytest.approx(dpo, rel=1e-5)
    assert logs["sft_loss"].item() == pytest.approx(nll, rel=1e-5)
    assert loss.item() == pytest.approx(dpo + sft_weight * nll, rel=1e-5)


def pair_rows(prompts, answers, side: str, width: int) -> dict[str, torch.Tensor]:
    """``<side>_input_ids`` / ``<side>_labels``: prompt + answer rows right-padded to ``width``, as the DPO data
    module makes them (labels already shifted, -100 except where the target is an answer token)."""
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    labels = torch.full((len(prompts), width), -100)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        ids[i, :len(p) + len(a)] = torch.cat([p, a])
        labels[i, len(p) - 1:len(p) + len(a) - 1] = a
    return {f"{side}_input_ids": ids, f"{side}_labels": labels}


def test_reference_is_frozen_and_not_part_of_the_module():
    stage = _stage()
    reference = stage.reference_model()
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())
    assert all(k.startswith("model.") for k in stage.state_dict())
    assert len(list(stage.parameters())) == len(list(stage.model.parameters()))


def test_short_fit_on_real_pairs_raises_reward_accuracy_and_keeps_the_reference(pairs_file, shared_dir, tmp_path):
    dm = _datamodule(pairs_file, shared_dir)
    stage = _stage()
    reference_before = {k: v.clone() for k, v in stage.reference_model().state_dict().items()}
    before = preference_accuracy(stage.model, dm.reference_dataloader("train"))
    trainer = L.Trainer(accelerator="cpu", max_epochs=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        check_val_every_n_epoch=4, default_root_dir=tmp_path)
    trainer.fit(stage, datamodule=dm)
    assert trainer.callback_metrics["val/reward_accuracy"].item() >= 0.9  # val = the training pairs
    after = preference_accuracy(stage.model, dm.reference_dataloader("train"))
    assert after > before  # raw preference rises too (answer lengths differ, so it need not reach 1)
    reference_after = stage.reference_model().state_dict()
    assert all(torch.equal(reference_before[k], reference_after[k]) for k in reference_before)
    trainer.save_checkpoint(tmp_path / "dpo.ckpt")
    saved = torch.load(tmp_path / "dpo.ckpt", weights_only=True)["state_dict"]
    assert sorted(saved) == sorted(f"model.{k}" for k in stage.model.state_dict())


def test_fit_with_precomputed_reference_starts_at_log2(pairs_file, shared_dir, tmp_path):
    dm = _datamodule(pairs_file, shared_dir)
    stage = _stage(precompute_reference=True)
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            losses.append(trainer.callback_metrics["train/dpo_loss"].item())

    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=1,
                        limit_val_batches=1, callbacks=[Record()], default_root_dir=tmp_path)
    trainer.fit(stage, datamodule=dm)
    assert math.isclose(losses[0], math.log(2), rel_tol=1e-5)
    assert set(stage._reference_logps) == {"train", "val"} and stage.reference.released


def test_an_moe_policy_adds_its_router_loss():
    """In training the minimised loss is the DPO loss plus the MoE policy's router loss."""
    torch.manual_seed(0)
    stage = DPO(config=ModelConfig.from_preset("debug", use_moe=True), beta=0.1).train()
    prompts, answers = random_documents([3, 5], seed=2), random_documents([4, 6, 3, 5], seed=3)
    batch = {**pair_rows(prompts, answers[:2], "chosen", 12), **pair_rows(prompts, answers[2:], "rejected", 12),
             "index": torch.tensor([0, 1])}
    with torch.no_grad():
        aux = stage.model(stack_rows(batch)).aux_loss
        loss, logs = stage.compute_loss(batch)
    assert aux > 0
    torch.testing.assert_close(loss, logs["dpo_loss"] + aux)


def stack_rows(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The chosen rows, then the rejected rows, as one batch."""
    return torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])


def test_resuming_against_other_starting_weights_is_refused(pairs_file, shared_dir, tmp_path):
    """The reference is rebuilt from ``init_weights`` on resume: weights other than the run's own are refused,
    the run's own are accepted."""
    from helpers import write_stage_checkpoint
    from minimind_pl.errors import UserError

    starts = [write_stage_checkpoint(random_model(seed=seed), tmp_path / f"start{seed}.ckpt", shared_dir / "minimind")
              for seed in (1, 2)]

    def fit(start, max_steps, ckpt_path=None):
        trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                            default_root_dir=tmp_path, enable_checkpointing=False)
        stage = DPO(config=ModelConfig.from_preset("debug"), init_weights=str(start), learning_rate=1e-3)
        trainer.fit(stage, datamodule=_datamodule(pairs_file, shared_dir), ckpt_path=ckpt_path)
        return trainer

    fit(starts[0], 1).save_checkpoint(tmp_path / "run.ckpt")
    with pytest.raises(UserError, match="another reference model"):
        fit(starts[1], 2, tmp_path / "run.ckpt")
    assert fit(starts[0], 2, tmp_path / "run.ckpt").global_step == 2
