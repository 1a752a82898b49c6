"""The Distill stage (a frozen teacher beside the student) and SFT's up-weighted reasoning tags."""
from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from helpers import (minimind_state_dict, packed_batch, random_documents, random_model, with_weights,
                     write_stage_checkpoint)
from minimind_pl.checkpoints import load_model, read_torch_file
from minimind_pl.checkpoints.minimind import save_minimind
from minimind_pl.config import ModelConfig
from minimind_pl.data import SFTDataModule
from minimind_pl.losses import IGNORE_INDEX, causal_lm_loss, token_weights, weighted_causal_lm_loss
from minimind_pl.stages import SFT, Distill

TEACHER = ModelConfig.from_preset("debug")  # 64 x 2, MiniMind's 6400-token vocabulary
STUDENT = ModelConfig.from_preset("debug", hidden_size=32, num_hidden_layers=1)


def trainer(steps: int, val_batches: int = 0) -> L.Trainer:
    """A quiet CPU trainer for a few steps."""
    return L.Trainer(accelerator="cpu", devices=1, max_steps=steps, limit_val_batches=val_batches,
                     num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)


@pytest.fixture(scope="module")
def files(shared_dir: Path, tmp_path_factory) -> dict[str, str]:
    """A slice of the shared SFT corpus and MiniMind's tokenizer (caches in a temporary folder)."""
    tmp = tmp_path_factory.mktemp("distill")
    lines = (shared_dir / "corpus" / "sft_real.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp / "train.jsonl").write_text("".join(lines[:160]), encoding="utf-8")
    (tmp / "val.jsonl").write_text("".join(lines[160:200]), encoding="utf-8")
    return {"train": str(tmp / "train.jsonl"), "val": str(tmp / "val.jsonl"), "dir": str(tmp),
            "tokenizer": str(shared_dir / "minimind")}


def datamodule(files: dict[str, str]) -> SFTDataModule:
    """Packed 32-token rows, 4 per batch, no workers."""
    return SFTDataModule(train_path=files["train"], val_path=files["val"], tokenizer=files["tokenizer"],
                         seq_len=32, batch_size=4, num_workers=0, cache_dir=str(Path(files["dir"]) / "cache"),
                         num_proc=1)


@pytest.fixture(scope="module")
def teacher_ckpt(files: dict[str, str]) -> str:
    """A debug-size teacher fine-tuned for a few steps, saved as a Lightning checkpoint."""
    L.seed_everything(0)
    stage = SFT(config=TEACHER, learning_rate=3e-3)
    fit = trainer(15)
    fit.fit(stage, datamodule=datamodule(files))
    path = str(Path(files["dir"]) / "teacher.ckpt")
    fit.save_checkpoint(path)
    return path


def fixed_batch(files: dict[str, str]) -> dict[str, torch.Tensor]:
    """The first validation batch."""
    dm = datamodule(files)
    dm.setup("validate")
    return next(iter(dm.val_dataloader()))


def test_distillation_lowers_kl_and_leaves_the_teacher_alone(files, teacher_ckpt):
    L.seed_everything(1)
    stage = Distill(config=STUDENT, teacher=teacher_ckpt, learning_rate=3e-3, alpha=0.5, temperature=1.5)
    teacher_before = {k: v.clone() for k, v in stage.teacher.state_dict().items()}
    batch = fixed_batch(files)
    with torch.no_grad():
        _, before = stage.compute_loss(batch)
    fit = trainer(15, val_batches=2)
    fit.fit(stage, datamodule=datamodule(files))
    with torch.no_grad():
        _, after = stage.compute_loss(batch)
    assert after["kl_loss"] < 0.9 * before["kl_loss"]
    metrics = fit.validate(stage, datamodule=datamodule(files), verbose=False)[0]
    assert {"val/kl", "val/loss", "val/ppl"} <= set(metrics)
    teacher = stage.teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())

    # the teacher is in no parameter list and no checkpoint; the student's checkpoint loads alone
    assert sum(p.numel() for p in stage.parameters()) == sum(p.numel() for p in stage.model.parameters())
    path = Path(files["dir"]) / "student.ckpt"
    fit.save_checkpoint(path)
    state = read_torch_file(path)["state_dict"]
    assert set(state) == {f"model.{k}" for k in stage.model.state_dict()}
    assert load_model(str(path), device="cpu").config == STUDENT


def test_teacher_needs_the_same_vocabulary(teacher_ckpt):
    with pytest.raises(ValueError, match="same tokenizer"):
        Distill(config=ModelConfig.from_preset("debug", vocab_size=1024), teacher=teacher_ckpt)
    with pytest.raises(ValueError, match=r"^the Distill stage needs a teacher: pass --model\.init_args\.teacher PATH$"):
        Distill(config=STUDENT).compute_loss({"input_ids": torch.ones(1, 4, dtype=torch.long),
                                              "labels": torch.ones(1, 4, dtype=torch.long)})


def test_a_teacher_trained_with_another_tokenizer_is_refused_unless_allowed(files, tmp_path):
    """Same vocabulary size, other ids: the teacher's checkpoint records another tokenizer's fingerprint than
    ``--data.tokenizer`` has, so its distributions would teach the student other text."""
    path = write_stage_checkpoint(random_model(seed=2), tmp_path / "teacher.ckpt", Path(files["tokenizer"]))
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["tokenizer_fingerprint"] = "f" * 64  # not MiniMind's tokenizer
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=f"the teacher {path} was trained with another tokenizer"):
        Distill(config=STUDENT, teacher=str(path), tokenizer=files["tokenizer"])
    with pytest.warns(UserWarning, match="another tokenizer"):
        stage = Distill(config=STUDENT, teacher=str(path), tokenizer=files["tokenizer"], allow_tokenizer_mismatch=True)
    assert stage.teacher.config.hidden_size == TEACHER.hidden_size


def test_sft_upweights_think_tags_in_training_only(files):
    stage = SFT(config=TEACHER, tokenizer=files["tokenizer"], special_token_weight=10.0)
    with pytest.warns(UserWarning, match="not single tokens"):  # <answer> is several tokens in MiniMind's
        think = stage.special_token_ids(torch.device("cpu"))
    assert think.tolist() == [25, 26]  # <think>, </think>
    ids = torch.tensor([[1, 25, 300, 26, 400, 2]])
    labels = torch.tensor([[IGNORE_INDEX, 25, 300, 26, 400, 2]])
    batch = {"input_ids": ids, "labels": labels}
    with torch.no_grad():
        logits = stage.model(ids).logits
        stage.train()
        weighted, _ = stage.compute_loss(batch)
        stage.eval()
        plain, _ = stage.compute_loss(batch)
    assert torch.allclose(weighted, weighted_causal_lm_loss(logits, labels, token_weights(labels, think, 10.0)))
    assert torch.allclose(plain, causal_lm_loss(logits, labels)) and weighted > plain



def test_loss_is_alpha_ce_plus_one_minus_alpha_t2_kl_of_the_documents_alone():
    """The distillation loss, by hand: alpha * CE + (1 - alpha) * T² * KL(teacher ∥ student) over labelled tokens.

    alpha and 1 - alpha differ, CE differs from T² KL, and the teacher differs from the student, so swapping
    the weights or losing a term changes the value. The batch is packed, and the expected value comes from
    each document run alone through student and teacher: neither may attend across documents.
    """
    alpha, temperature = 0.3, 2.0
    student, teacher = random_model(seed=1, hidden_size=32, num_hidden_layers=1), random_model(seed=2)
    with torch.no_grad():
        teacher.model.norm.weight.mul_(4)  # a confident teacher: sharper logits, a KL term that weighs
    stage = with_weights(Distill(config=student.config, alpha=alpha, temperature=temperature), student)
    stage.set_teacher(teacher)
    docs = random_documents([6, 9, 5], seed=3)
    ce, kl, count = 0.0, 0.0, 0
    with torch.no_grad():
        for doc in docs:  # labelled positions: all but each document's last token
            s, t = student(doc[None]).logits[0, :-1], teacher(doc[None]).logits[0, :-1]
            ce += F.cross_entropy(s, doc[1:], reduction="sum").item()
            log_p_teacher, log_p_student = torch.log_softmax(t / temperature, -1), torch.log_softmax(s / temperature, -1)
            kl += (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum().item()  # sum_v p_t (log p_t - log p_s)
            count += len(doc) - 1
        loss, logs = stage.compute_loss(packed_batch(docs))
    ce, kl = ce / count, temperature**2 * kl / count
    assert abs(ce - kl) > 0.5 and kl > 0.5  # a swap or a missing term would show
    assert logs["ce_loss"].item() == pytest.approx(ce, rel=1e-5)
    assert logs["kl_loss"].item() == pytest.approx(kl, rel=1e-5)
    assert loss.item() == pytest.approx(alpha * ce + (1 - alpha) * kl, rel=1e-5)


def test_an_moe_student_adds_its_router_loss_to_the_label_term():
    """In training, ``alpha * (CE + router loss) + (1 - alpha) * T² KL``, and the router loss is logged."""
    alpha = 0.3
    student = random_model(seed=1, hidden_size=32, num_hidden_layers=1, use_moe=True)
    stage = with_weights(Distill(config=student.config, alpha=alpha, temperature=2.0), student).train()
    stage.set_teacher(random_model(seed=2))
    with torch.no_grad():
        loss, logs = stage.compute_loss(packed_batch(random_documents([6, 9], seed=3)))
    assert logs["aux_loss"].item() > 0
    expected = alpha * (logs["ce_loss"] + logs["aux_loss"]) + (1 - alpha) * logs["kl_loss"]
    torch.testing.assert_close(loss, expected)


def test_alpha_and_temperature_out_of_range_are_refused_at_their_edges():
    for alpha in (-0.01, 1.01):
        with pytest.raises(ValueError, match=rf"^alpha must be in \[0, 1\], got {alpha}$"):
            Distill(config=STUDENT, alpha=alpha)
    with pytest.raises(ValueError, match=r"^temperature must be > 0, got 0$"):
        Distill(config=STUDENT, temperature=0)
    for settings in ({"alpha": 0.0, "temperature": 0.5}, {"alpha": 1.0, "temperature": 1e-3}):
        Distill(config=STUDENT, **settings)


def test_defaults_are_minimind_s_distillation_recipe_and_the_learning_rate_reaches_the_optimizer():
    """MiniMind's trainer/train_distillation.py: T 1.5, lr 5e-6 (alpha 0.5); a given learning rate is the one used."""
    stage = Distill(config=STUDENT)
    assert (stage.hparams.alpha, stage.hparams.temperature) == (0.5, 1.5)
    assert [group["lr"] for group in stage.optimizer_group_settings()] == [5e-6, 5e-6]
    stage = Distill(config=STUDENT, learning_rate=1e-3)
    assert [group["lr"] for group in stage.optimizer_group_settings()] == [1e-3, 1e-3]


def test_a_pth_teacher_is_built_with_the_given_preset(tmp_path):
    """A .pth holds no config: ``teacher_preset`` gives it. The shapes cannot tell the context length: the debug
    preset's is 512, the one read off the shapes is the default 32768."""
    path = save_minimind(minimind_state_dict(TEACHER, seed=2), tmp_path / "teacher.pth")
    assert Distill(config=STUDENT, teacher=str(path), teacher_preset="debug").teacher.config == TEACHER
    assert Distill(config=STUDENT, teacher=str(path)).teacher.config.max_position_embeddings == 32768


def test_the_teacher_s_size_is_reported_in_millions_with_two_decimals(caplog):
    """1,515,001 parameters (counted off the module, not the config) are 1.52M: just above a rounding edge, so
    a size off by even a millionth would print 1.51M."""
    shape = {"vocab_size": 20686, "hidden_size": 67, "head_dim": 16}
    teacher = random_model(seed=2, **shape)
    assert sum(p.numel() for p in teacher.parameters()) == 1_515_001
    stage = Distill(config=ModelConfig.from_preset("debug", hidden_size=32, num_hidden_layers=1,
                                                   vocab_size=shape["vocab_size"]))
    with caplog.at_level(logging.INFO):
        stage.set_teacher(teacher)
    assert [r.getMessage() for r in caplog.records if "teacher" in r.getMessage()] == [
        "distillation teacher: 1.52M parameters, frozen"]
