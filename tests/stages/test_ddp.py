"""Every stage under DDP with two CPU processes (gloo), through ``python main.py fit`` as a user runs it: the
same learning as one process on the same global batches, exact resume, and MoE without unused parameters."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import REPO, run_python, tiny_run
from minimind_pl.checkpoints import open_checkpoint
from minimind_pl.losses import causal_lm_loss
from minimind_pl.tokenizer import Tokenizer

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2"]


def fit_process(args: list[str]) -> None:
    result = run_python([str(REPO / "main.py"), *args])
    assert result.returncode == 0, result.stderr[-4000:]


def weights(path) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in open_checkpoint(str(path)).weights.items()}


def held_out_loss(checkpoint, shared_dir) -> float:
    """Mean next-token loss of a checkpoint's model on the first lines of the validation corpus."""
    tokenizer = Tokenizer.from_file(str(shared_dir / "minimind"))
    lines = (shared_dir / "corpus" / "pretrain_real_val.jsonl").read_text(encoding="utf-8").splitlines()[:16]
    ids = [[tokenizer.bos_id] + tokenizer.encode(json.loads(line)["text"])[:63] for line in lines]
    model = open_checkpoint(str(checkpoint)).build_model()
    with torch.no_grad():
        losses = [causal_lm_loss(model(torch.tensor([row[:-1]])).logits, torch.tensor([row[1:]])) for row in ids]
    return float(torch.stack(losses).mean())


def test_two_processes_learn_what_one_process_learns_from_the_same_global_batches(tmp_path, shared_dir):
    """2 ranks x 2 rows = 1 process x 4 rows: the sampler deals each global batch across the ranks, so both runs
    see the same rows per optimizer step. They are not bit-identical: DDP averages the two ranks' mean losses
    where one process takes the mean over all labelled tokens, and the ranks hold slightly different numbers of
    labelled tokens (a document's last token has none). Adam turns those small differences in the gradients of
    rarely seen embedding rows into visible weight differences, so the runs are compared where it matters: the
    loss of the trained models on held-out text agrees to 1e-4 relative after 6 steps (measured: 5e-6), while
    training moved it 100 times more than that."""
    steps = ["--trainer.val_check_interval", "6"]
    fit_process(tiny_run(tmp_path / "one", shared_dir, "pretrain", "pretrain_real.jsonl", 6,
                         [*QUIET, *steps, "--data.batch_size", "4"], keep_checkpoints=True))
    fit_process(tiny_run(tmp_path / "two", shared_dir, "pretrain", "pretrain_real.jsonl", 6,
                         [*QUIET, *steps, *DDP, "--data.batch_size", "2"]))
    one = held_out_loss(tmp_path / "one" / "ckpt" / "last.ckpt", shared_dir)
    two = held_out_loss(tmp_path / "two" / "ckpt" / "last.ckpt", shared_dir)
    early = held_out_loss(tmp_path / "one" / "ckpt" / "epoch=0-step=2.ckpt", shared_dir)
    assert abs(one - two) <= 1e-4 * one, (one, two)
    assert early - one > 100 * abs(one - two), (early, one, two)


def test_a_resumed_ddp_run_ends_with_the_straight_runs_weights(tmp_path, shared_dir):
    """The straight run's step-2 checkpoint, resumed by both ranks (loader position, RNG, schedule), ends where
    the straight run ended."""
    fit_process(tiny_run(tmp_path / "a", shared_dir, "pretrain", "pretrain_real.jsonl", 4, [*QUIET, *DDP],
                         keep_checkpoints=True))
    fit_process(tiny_run(tmp_path / "b", shared_dir, "pretrain", "pretrain_real.jsonl", 4,
                         [*QUIET, *DDP, "--ckpt_path", str(tmp_path / "a" / "ckpt" / "epoch=0-step=2.ckpt")]))
    a, b = weights(tmp_path / "a" / "ckpt" / "last.ckpt"), weights(tmp_path / "b" / "ckpt" / "last.ckpt")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("stage, data, extra", [
    ("sft", "sft_real.jsonl", []),
    ("dpo", "dpo_real.jsonl", ["--data.seq_len", "128"]),
    ("pretrain", "pretrain_real.jsonl", ["--model.config.use_moe", "true", "--model.config.num_experts", "4",
                                         "--model.config.num_experts_per_tok", "1"]),
], ids=["sft", "dpo", "moe-pretrain"])
def test_stages_train_under_ddp(tmp_path, shared_dir, stage, data, extra):
    """No find_unused_parameters: MoE experts all take part in every step (grouped matmul), and DPO's reference
    model stays outside the DDP module."""
    fit_process(tiny_run(tmp_path, shared_dir, stage, data, 3, [*QUIET, *DDP, *extra]))
    trained = weights(tmp_path / "ckpt" / "last.ckpt")
    assert all(torch.isfinite(v).all() for v in trained.values())


def test_grpo_ranks_sample_their_own_answers_and_stay_in_step(tmp_path, shared_dir):
    """Each rank answers its own prompts; two updates per batch (two manual backwards) are all-reduced, so both
    ranks end with the same weights, and those are the checkpoint's."""
    prompts = tmp_path / "prompts.jsonl"
    lines = (shared_dir / "corpus" / "sft_real.jsonl").read_text(encoding="utf-8").splitlines()[:16]
    firsts = [next(m["content"] for m in json.loads(line)["conversations"] if m["role"] == "user") for line in lines]
    prompts.write_text("".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in firsts), "utf-8")
    callbacks = json.dumps([{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                             "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True}},
                            {"class_path": "helpers.SaveRankWeights", "init_args": {"dirpath": str(tmp_path / "ranks")}}])
    args = tiny_run(tmp_path, shared_dir, "grpo", "sft_real.jsonl", 4, [
        *QUIET, *DDP, "--data.train_path", str(prompts), "--data.val_fraction", "0", "--data.batch_size", "2",
        "--model.rewards", '[{"class_path": "helpers.CJKShare"}]', "--model.max_new_tokens", "6",
        "--model.num_generations", "3", "--model.num_iterations", "2", "--trainer.callbacks", callbacks])
    result = run_python([str(REPO / "main.py"), *args], env={"PYTHONPATH": str(REPO / "tests")})
    assert result.returncode == 0, result.stderr[-4000:]
    rank0, rank1 = (torch.load(tmp_path / "ranks" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    saved = weights(tmp_path / "ckpt" / "last.ckpt")
    assert all(torch.equal(saved[k], rank0[k].float()) for k in saved)
