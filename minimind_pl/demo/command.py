"""``python main.py demo``: the whole pipeline on an embedded synthetic corpus, on the CPU, in minutes.

Each stage runs through the shipped ``configs/demo/<stage>.yaml`` and LightningCLI, exactly as a user's
``python main.py fit --config ...`` would; the demo only points the configs at its own data and output
folders. The scorecard reports what the models really answer (greedy decoding, substring check).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from minimind_pl.checkpoints import load_model
from minimind_pl.training_cli import run_lightning
from minimind_pl.data.dpo import pair_loader
from minimind_pl.data.jsonl import read_jsonl
from minimind_pl.commands.images import expanded_conversation, read_image, stacked
from minimind_pl.demo.corpus import score_answer, write_demo_corpus
from minimind_pl.demo.vision_world import chance_accuracy, write_vision_world
from minimind_pl.generation import GREEDY, generate
from minimind_pl.rewards import AnswerMatch
from minimind_pl.stats import wilson_half_width
from minimind_pl.stages.dpo import preference_accuracy
from minimind_pl.data.formats import jsonl_texts
from minimind_pl.tokenizer import Tokenizer, train_tokenizer

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "demo"


@dataclass
class DemoRun:
    """What the demo's steps share: its files, the checkpoint of each stage and the scorecard rows."""

    data_dir: Path
    ckpt_dir: Path
    corpus: dict[str, Path]
    tokenizer_dir: Path
    max_epochs: int | None = None
    checkpoints: dict[str, str] = field(default_factory=dict)
    val_ppl: dict[str, float] = field(default_factory=dict)
    scores: list[tuple[str, str]] = field(default_factory=list)


def fit_stage(run: DemoRun, stage: str, train: str, val: str, init_weights: str | None = None,
              extra: list[str] | None = None) -> str:
    """``python main.py fit --config configs/demo/<stage>.yaml`` on the demo's files; returns last.ckpt."""
    config = CONFIG_DIR / f"{stage}.yaml"
    if not config.exists():
        raise FileNotFoundError(f"demo config not found: {config} (run the demo from a source checkout)")
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(run.ckpt_dir / stage), "save_last": True}}]
    args = ["fit", "--config", str(config),
            "--data.init_args.train_path", str(run.corpus[train]),
            "--data.init_args.val_path", str(run.corpus[val]),
            "--data.init_args.tokenizer", str(run.tokenizer_dir),
            "--trainer.logger.init_args.save_dir", str(run.ckpt_dir),
            "--trainer.callbacks", json.dumps(callbacks)]
    if init_weights:
        args += ["--model.init_args.init_weights", init_weights]
    if run.max_epochs is not None:
        args += ["--trainer.max_epochs", str(run.max_epochs)]
    print(f"\n=== {stage}: python main.py {' '.join(args[:3])} ...", flush=True)
    cli = run_lightning(args + list(extra or []))
    ppl = cli.trainer.callback_metrics.get("val/ppl")
    if ppl is not None:
        run.val_ppl[stage] = float(ppl)
    run.checkpoints[stage] = cli.trainer.checkpoint_callback.last_model_path
    return run.checkpoints[stage]


def ask(ckpt: str, tokenizer: Tokenizer, questions: list[str], lora: str | None = None,
        max_new_tokens: int = 40) -> list[str]:
    """Greedy answers of a checkpoint to single-turn chat questions (batched, KV cache)."""
    model = load_model(ckpt, device="cpu", lora=lora)
    return greedy_replies(model, tokenizer, [[{"role": "user", "content": q}] for q in questions], max_new_tokens)


def greedy_replies(model, tokenizer: Tokenizer, conversations: list[list[dict]], max_new_tokens: int,
                   images: list | None = None) -> list[str]:
    """The model's greedy next turn after each conversation (batched, KV cache); ``images``: per conversation, its
    preprocessed images (N, 3, H, W), one per image placeholder run."""
    prompts = [tokenizer.encode_chat(c) for c in conversations]
    outputs = generate(model, prompts, max_new_tokens, GREEDY, tokenizer.eos_id, images=images)
    return [tokenizer.decode(o, skip_special_tokens=True).strip() for o in outputs]


def ask_about_images(ckpt: str, tokenizer: Tokenizer, records: list[dict], folder: Path,
                     max_new_tokens: int = 24) -> list[str]:
    """Greedy answers of a vision-language checkpoint (its recorded tower) to the first user turn of VLM jsonl
    records (``<image>`` tags, ``images`` relative to ``folder``)."""
    model = load_model(ckpt, device="cpu")
    conversations = [expanded_conversation(model, r["conversations"][:1], len(r["images"]), f"record {n + 1}")
                     for n, r in enumerate(records)]
    images = [stacked([read_image(model, folder / name) for name in r["images"]]) for r in records]
    return greedy_replies(model, tokenizer, conversations, max_new_tokens, images)


def read_records(path: Path) -> list[dict]:
    """All records of a jsonl file."""
    return [record for _, record in read_jsonl(path)]


def accuracy(answers: list[str], expected: list[str]) -> float:
    """Share of answers that contain their expected string (``score_answer``)."""
    return sum(score_answer(a, e) for a, e in zip(answers, expected)) / max(len(expected), 1)


def score_text(score: float, n: int) -> str:
    """``"83% of 24 (±15)"``: a share of ``n`` items and the half-width of its 95% Wilson interval in points, so a
    change between two lines can be told from noise (it stays above 0 at 0% and 100%)."""
    return f"{score:.0%} of {n} (±{100 * wilson_half_width(score, n):.0f})"


def record_score(run: DemoRun, name: str, score: float, n: int) -> float:
    """Add a scorecard row; returns ``score``."""
    run.scores.append((name, score_text(score, n)))
    return score


def score_facts(run: DemoRun, tokenizer: Tokenizer, stage: str, lora: str | None = None) -> float:
    """Held-out fact accuracy of a stage's model: facts seen in pretraining, never asked in SFT."""
    qa = read_records(run.corpus["heldout_qa"])
    answers = ask(run.checkpoints[stage], tokenizer, [r["question"] for r in qa], lora=lora)
    return record_score(run, f"held-out fact accuracy after {stage}", accuracy(answers, [r["answer"] for r in qa]),
                        len(qa))


def score_identity(run: DemoRun, tokenizer: Tokenizer, stage: str, key: str = "answer",
                   lora: str | None = None) -> list[str]:
    """Ask the identity questions; record how many answers name the expected assistant."""
    qa = read_records(run.corpus["identity_qa"])
    answers = ask(run.checkpoints[stage], tokenizer, [r["question"] for r in qa], lora=lora)
    record_score(run, f"identity answers naming '{qa[0][key]}' after {stage}", accuracy(answers, [r[key] for r in qa]),
                 len(qa))
    return answers


def show_chats(run: DemoRun, tokenizer: Tokenizer, stage: str, questions: list[str]) -> None:
    """Print a few example conversations with a stage's model."""
    print(f"\n--- example chats ({stage}) ---")
    for question, answer in zip(questions, ask(run.checkpoints[stage], tokenizer, questions)):
        print(f"user: {question}\nassistant: {answer}\n")


def demo_lora_step(run: DemoRun, tokenizer: Tokenizer, sft_ckpt: str) -> str:
    """LoRA: an identity adapter on the SFT model renames the assistant (Lumen / 流明).

    The scorecard shows the renamed identity answers before and after, and the held-out fact accuracy
    with the adapter (the frozen base keeps its knowledge). Returns the adapter checkpoint, which
    holds only the adapter tensors and finds its base by itself.
    """
    score_identity(run, tokenizer, "sft", key="lora_answer")
    adapter = fit_stage(run, "lora", "lora_identity", "sft_val", init_weights=sft_ckpt)
    score_identity(run, tokenizer, "lora", key="lora_answer")
    score_facts(run, tokenizer, "lora")
    show_chats(run, tokenizer, "lora", ["Who are you?", "你是谁？", "What is 3 + 4?"])
    return adapter


def demo_distill_step(run: DemoRun, tokenizer: Tokenizer, sft_ckpt: str) -> str:
    """White-box distillation: a 2-layer, 96-wide student learns the SFT data from the labels and the SFT
    model's distributions (``configs/demo/distill.yaml``). The scorecard sets its held-out fact accuracy
    and identity answers beside the teacher's. Returns the student's checkpoint (the teacher is not in it).
    """
    student = fit_stage(run, "distill", "sft", "sft_val", extra=["--model.init_args.teacher", sft_ckpt])
    score_facts(run, tokenizer, "distill")
    score_identity(run, tokenizer, "distill")
    return student


def score_preferences(run: DemoRun, stage: str) -> float:
    """Held-out preference accuracy of a stage's model: the share of dpo_val.jsonl pairs whose chosen answer
    it finds more likely than the rejected one."""
    pairs = pair_loader(run.corpus["dpo_val"], run.tokenizer_dir, seq_len=128)
    score = preference_accuracy(load_model(run.checkpoints[stage], device="cpu"), pairs)
    return record_score(run, f"held-out preference accuracy after {stage}", score, len(pairs.dataset))


def demo_dpo_step(run: DemoRun, sft_ckpt: str) -> str:
    """DPO: from the SFT model, prefer right facts, sums and identities over wrong ones
    (``configs/demo/dpo.yaml``). The scorecard shows the preference accuracy on held-out pairs before
    (SFT) and after (DPO). Returns the DPO checkpoint (the frozen reference is not in it)."""
    score_preferences(run, "sft")
    dpo = fit_stage(run, "dpo", "dpo", "dpo_val", init_weights=sft_ckpt)
    score_preferences(run, "dpo")
    return dpo


ARITHMETIC_SETS = {"arith_reworded": "GRPO's sums reworded", "arith_qa": "sums GRPO never saw"}


def score_arithmetic(run: DemoRun, tokenizer: Tokenizer, stage: str, key: str) -> float:
    """Arithmetic accuracy of a stage's model on one of ``ARITHMETIC_SETS`` (questions that are not GRPO's prompts),
    judged as GRPO's reward judges (the answer's last number is the result)."""
    records = read_records(run.corpus[key])
    answers = ask(run.checkpoints[stage], tokenizer, [r["conversations"][0]["content"] for r in records])
    judge = AnswerMatch(mode="numeric")
    score = sum(judge.is_right(a, r["gt"]) for a, r in zip(answers, records)) / len(records)
    return record_score(run, f"arithmetic, {ARITHMETIC_SETS[key]}, after {stage}", score, len(records))


def demo_grpo_step(run: DemoRun, tokenizer: Tokenizer, sft_ckpt: str) -> str:
    """GRPO: from the SFT model, sampled answers to arithmetic questions are rewarded when their result is right
    (``configs/demo/grpo.yaml``). The scorecard shows the arithmetic accuracy before (SFT) and after on questions
    that are not GRPO's prompts: its sums in other words, and sums it never saw. Returns the GRPO checkpoint (the
    frozen reference is not in it)."""
    for key in ARITHMETIC_SETS:
        score_arithmetic(run, tokenizer, "sft", key)
    grpo = fit_stage(run, "grpo", "grpo_arith", "arith_qa", init_weights=sft_ckpt)
    for key in ARITHMETIC_SETS:
        score_arithmetic(run, tokenizer, "grpo", key)
    return grpo


def score_image_questions(run: DemoRun, tokenizer: Tokenizer, stage: str, key: str, label: str) -> float:
    """Share of the held-out image questions of ``run.corpus[key]`` whose answer names what the shown picture holds."""
    records = read_records(run.corpus[key])
    answers = ask_about_images(run.checkpoints[stage], tokenizer, records, run.corpus[key].parent)
    return record_score(run, f"{label} after {stage}", accuracy(answers, [r["answer"] for r in records]),
                        len(records))


def demo_vision_step(run: DemoRun, tokenizer: Tokenizer, sft_ckpt: str, seed: int,
                     sizes: dict[str, int] | None = None) -> str:
    """MiniMind-V on the synthetic image world (``demo.vision_world``, written beside the text corpus): a tiny
    SigLIP tower trained on its captions (``configs/demo/siglip.yaml``), then frozen while VLM pretraining and VLM
    SFT teach the SFT model to read it (``configs/demo/vlm_pretrain.yaml``, ``vlm_sft.yaml``). The scorecard asks
    questions about pictures of colour+shape pairs no training picture shows, then the same questions with another
    picture (answered right only when the answer comes from the picture), beside chance. Returns the VLM SFT
    checkpoint (the tower is not in it: it records the tower's folder)."""
    files = write_vision_world(run.data_dir, seed=seed, sizes=sizes)
    run.corpus.update({path.stem: path for path in files.values()})
    tower = str(run.ckpt_dir / "vision_tower")
    fit_stage(run, "siglip", "vlm_caption", "vlm_caption_val", extra=["--model.init_args.tower_folder", tower])
    reads_tower = ["--model.init_args.vision_encoder", tower, "--data.init_args.vision_encoder", tower]
    pretrain = fit_stage(run, "vlm_pretrain", "vlm_caption", "vlm_caption_val", init_weights=sft_ckpt,
                         extra=reads_tower)
    vlm = fit_stage(run, "vlm_sft", "vlm_sft", "vlm_sft_val", init_weights=pretrain, extra=reads_tower)
    score_image_questions(run, tokenizer, "vlm_sft", "vlm_heldout_qa", "held-out image questions")
    score_image_questions(run, tokenizer, "vlm_sft", "vlm_heldout_swapped", "same questions, image swapped,")
    questions = read_records(run.corpus["vlm_heldout_qa"])
    run.scores.append(("held-out image questions, chance", f"{chance_accuracy(questions):.0%}"))
    return vlm


def print_scorecard(run: DemoRun, seconds: float) -> None:
    """The final table: validation perplexity per stage, then each score."""
    rows = [(f"validation perplexity after {s}", f"{p:.2f}") for s, p in run.val_ppl.items()] + run.scores
    width = max(len(name) for name, _ in rows)
    print("\n=== scorecard ===")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(f"{'total time':<{width}}  {seconds / 60:.1f} min")


def demo_command(out_dir: str = "data/demo", ckpt_dir: str = "checkpoints/demo", vocab_size: int = 1024,
                 seed: int = 0, max_epochs: int | None = None, vision: bool = False) -> dict[str, str]:
    """Run the whole pipeline on the embedded bilingual demo corpus on the CPU, then print a scorecard.

    Args:
        out_dir: Where the generated corpus and the trained tokenizer go.
        ckpt_dir: Where checkpoints and TensorBoard logs go (``tensorboard --logdir`` it).
        vocab_size: Vocabulary size of the demo tokenizer (the demo configs' model uses 1024).
        seed: Seed of the synthetic world.
        max_epochs: Override every stage's epochs (for a quicker, weaker run).
        vision: Also run the MiniMind-V part: a synthetic image world, a tiny SigLIP tower, VLM pretraining and VLM
            SFT (several more minutes on the CPU). Work in progress: its answers about pictures are still at chance.
    """
    start = time.perf_counter()
    data_dir = Path(out_dir)
    corpus = write_demo_corpus(data_dir, seed=seed)
    tokenizer_dir = data_dir / "tokenizer"
    print(f"corpus written to {data_dir}; training a {vocab_size}-token tokenizer", flush=True)
    tokenizer = train_tokenizer(jsonl_texts([corpus["pretrain"], corpus["sft"]]), vocab_size, tokenizer_dir, show_progress=False)
    run = DemoRun(data_dir, Path(ckpt_dir), corpus, tokenizer_dir, max_epochs=max_epochs)
    pretrain = fit_stage(run, "pretrain", "pretrain", "pretrain_val")
    fit_stage(run, "sft", "sft", "sft_val", init_weights=pretrain)
    score_facts(run, tokenizer, "pretrain")
    score_facts(run, tokenizer, "sft")
    score_identity(run, tokenizer, "sft")
    demo_dpo_step(run, run.checkpoints["sft"])
    demo_grpo_step(run, tokenizer, run.checkpoints["sft"])
    demo_lora_step(run, tokenizer, run.checkpoints["sft"])
    demo_distill_step(run, tokenizer, run.checkpoints["sft"])
    if vision:
        demo_vision_step(run, tokenizer, run.checkpoints["sft"], seed)
    show_chats(run, tokenizer, "sft", ["Who are you?", "What is 3 + 4?", "你是谁？", "5加2等于几？"])
    print_scorecard(run, time.perf_counter() - start)
    return dict(run.checkpoints)
