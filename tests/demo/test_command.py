"""``python main.py demo`` end to end, shortened (the real demo's numbers are in README): its scorecard's values."""

import math
import re
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from minimind_pl.demo import command as demo
from minimind_pl.cli import main

# One epoch per stage (--max_epochs 1) shows no effect yet: the models answer in loops, LoRA renames nobody.
# A second pretraining and SFT epoch and 12 LoRA epochs (the renaming starts at about 10) make the scorecard's
# effects visible for about 8 s more (the LoRA data is small).
EPOCHS = {"pretrain": 2, "sft": 2, "lora": 12}
LIMITS = {"grpo": ["--trainer.limit_train_batches", "4"]}  # a few GRPO updates show the step runs; not its effect
# The vision part on a small image world: one SigLIP batch, a few VLM steps (the held-out questions stay all 192).
VISION_SIZES = {"caption": 64, "caption_val": 16, "sft": 64, "sft_val": 16}
HELDOUT_IMAGE_QUESTIONS = 3 * 4 * 4 * 4  # held-out colour+shape pairs x counts x corners x question kinds
# guessing among 3 shapes, 5 colours, 4 counts, 4 corners, each kind asked equally often
CHANCE = (1 / 3 + 1 / 5 + 1 / 4 + 1 / 4) / 4


def test_demo_runs_every_stage_and_its_scorecard_shows_learning(tmp_path, capsys, monkeypatch):
    fit_stage = demo.fit_stage

    def fit_stage_with_epochs(run, stage, *args, extra=None, **kwargs):
        extra = [*(extra or []), *(["--trainer.max_epochs", str(EPOCHS[stage])] if stage in EPOCHS else []),
                 *LIMITS.get(stage, [])]
        return fit_stage(run, stage, *args, extra=extra, **kwargs)

    monkeypatch.setattr(demo, "fit_stage", fit_stage_with_epochs)
    vision_step = demo.demo_vision_step
    monkeypatch.setattr(demo, "demo_vision_step",
                        lambda *args, **kwargs: vision_step(*args, **{**kwargs, "sizes": VISION_SIZES}))
    data = tmp_path / "data"
    checkpoints = main(["demo", "--out_dir", str(data), "--ckpt_dir", str(tmp_path / "ckpt"), "--max_epochs", "1",
                        "--vision", "true"])
    card = scorecard(capsys.readouterr().out)

    for stage in ("pretrain", "sft", "dpo", "grpo", "lora", "distill", "siglip", "vlm_pretrain", "vlm_sft"):
        assert checkpoints[stage] == str(tmp_path / "ckpt" / stage / "last.ckpt")
        assert (tmp_path / "ckpt" / stage / "last.ckpt").exists()

    # perplexities: each stage's last validation loss (TensorBoard), exponentiated; far below the untrained
    # model's (about the 1024-token vocabulary); chat data easier than prose
    ppl = {s: float(card.pop(f"validation perplexity after {s}")) for s in ("pretrain", "sft", "lora", "distill")}
    for stage, value in ppl.items():
        assert value == pytest.approx(math.exp(last_scalar(tmp_path / "ckpt" / stage, "val/loss")), abs=0.006)
    assert all(1.0 < p < 400 for p in ppl.values()), ppl
    assert ppl["sft"] < ppl["pretrain"] < 50, ppl
    assert all(1.0 < float(card.pop(f"validation perplexity after {s}")) < 1024 for s in ("vlm_pretrain", "vlm_sft"))

    # the vision part: the image world a user can look at and train on, the frozen tower's folder, the questions
    assert len(list((data / "images" / "sft").glob("*.png"))) == VISION_SIZES["sft"]
    assert (tmp_path / "ckpt" / "vision_tower" / "model.safetensors").is_file()
    for name in ("held-out image questions after vlm_sft", "same questions, image swapped, after vlm_sft"):
        correct_answers(card.pop(name), HELDOUT_IMAGE_QUESTIONS)
    assert card.pop("held-out image questions, chance") == f"{CHANCE:.0%}" == "26%"

    # every score is a share of the questions the demo really asks
    asked = {kind: len((data / f"{kind}.jsonl").read_text(encoding="utf-8").splitlines())
             for kind in ("heldout_qa", "identity_qa", "dpo_val", "arith_reworded", "arith_qa", "vlm_heldout_qa",
                          "vlm_heldout_swapped")}
    assert asked == {"heldout_qa": 36, "identity_qa": 12, "dpo_val": 120, "arith_reworded": 284, "arith_qa": 200,
                     "vlm_heldout_qa": HELDOUT_IMAGE_QUESTIONS, "vlm_heldout_swapped": HELDOUT_IMAGE_QUESTIONS}
    rows = {
        "held-out fact accuracy after {}": ("heldout_qa", ("pretrain", "sft", "lora", "distill")),
        "identity answers naming 'MiniMind' after {}": ("identity_qa", ("sft", "distill")),
        "identity answers naming 'Lumen' after {}": ("identity_qa", ("sft", "lora")),
        "held-out preference accuracy after {}": ("dpo_val", ("sft", "dpo")),
        "arithmetic, GRPO's sums reworded, after {}": ("arith_reworded", ("sft", "grpo")),
        "arithmetic, sums GRPO never saw, after {}": ("arith_qa", ("sft", "grpo")),
    }
    share = {}
    for name, (kind, stages) in rows.items():
        for stage in stages:
            share[name.format(stage)] = correct_answers(card.pop(name.format(stage)), asked[kind])
    assert share["identity answers naming 'Lumen' after sft"] == 0  # the SFT model never heard the name
    assert share["identity answers naming 'Lumen' after lora"] >= 3  # the adapter renames the assistant

    assert 0 < float(card.pop("total time").removesuffix(" min")) < 30
    assert not card, f"unexpected scorecard rows: {card}"


def last_scalar(stage_dir: Path, tag: str) -> float:
    """The last value of a scalar in a stage's TensorBoard log."""
    (log_dir,) = stage_dir.glob("version_*")
    return EventAccumulator(str(log_dir)).Reload().Scalars(tag)[-1].value


def scorecard(out: str) -> dict[str, str]:
    """The rows printed under ``=== scorecard ===``: name -> value (the two are at least two spaces apart)."""
    assert "=== scorecard ===" in out
    lines = out.split("=== scorecard ===", 1)[1].strip().splitlines()
    rows = [re.fullmatch(r"(\S.*?) {2,}(\S.*)", line.rstrip()) for line in lines]
    assert all(rows), lines
    return {row[1]: row[2] for row in rows}


def correct_answers(value: str, asked: int) -> int:
    """The number of right answers behind a ``"42% of 12 (±24)"`` value (one of k/12, rounded, with its spread)."""
    match = re.fullmatch(r"(\d+)% of (\d+) \(±\d+\)", value)
    assert match and int(match[2]) == asked, value
    right = [k for k in range(asked + 1) if demo.score_text(k / asked, asked) == value]
    assert right, f"{value} is no share of {asked} answers"
    return right[0]


@pytest.mark.parametrize("score, n, text", [(0.5, 100, "50% of 100 (±10)"), (0.0, 12, "0% of 12 (±12)"),
                                            (1.0, 12, "100% of 12 (±12)"), (0.9, 120, "90% of 120 (±5)")])
def test_each_share_comes_with_the_half_width_of_its_95_percent_wilson_interval(score, n, text):
    assert demo.score_text(score, n) == text
