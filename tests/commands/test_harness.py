"""``eval --harness``: lm-evaluation-harness on our model gives the numbers lm-eval's own Hugging Face backend gives
on the exported model, for a multiple-choice, a generation and a rolling-perplexity task over local data."""

import json
import math
from pathlib import Path

import pytest

from helpers import random_model, require_module, write_stage_checkpoint
from minimind_pl.checkpoints import save_hf_directory
from minimind_pl.commands.evaluate import eval_command
from minimind_pl.commands.harness import cut_at_stop_strings, harness_model, run_harness, task_manager
from minimind_pl.errors import UserError
from minimind_pl.tokenizer import Tokenizer

QUESTIONS = [
    {"question": "床前明月光，", "choices": ["疑是地上霜。", "举头望明月。", "低头思故乡。"], "answer": 0},
    {"question": "The capital of France is", "choices": [" Paris", " London", " Rome", " Berlin"], "answer": 0},
    {"question": "1 + 1 =", "choices": [" 2", " 3"], "answer": 0},
    {"question": "To be, or not to be:", "choices": [" that is the question.", " a cat."], "answer": 0},
]
TEXTS = [{"text": "学而时习之，不亦说乎？有朋自远方来，不亦乐乎？"},
         {"text": "Now is the winter of our discontent made glorious summer by this sun of York."}]
CONTEXT = 16
STOPS = ["。", "\n", "填", "脉"]
TASKS = {
    "mini_choice": {"output_type": "multiple_choice", "data": QUESTIONS, "doc_to_text": "{{question}}",
                    "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
                    "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]},
    "mini_generate": {"output_type": "generate_until", "data": QUESTIONS, "doc_to_text": "{{question}}",
                      "doc_to_target": "{{choices[0]}}",
                      # "填" and "脉": what this random model (seed 3) writes, so the stop strings really cut
                      "generation_kwargs": {"until": STOPS, "max_gen_toks": 6, "do_sample": False},
                      "metric_list": [{"metric": "exact_match"}]},
    "mini_rolling": {"output_type": "loglikelihood_rolling", "data": TEXTS, "doc_to_text": "",
                     "doc_to_target": "{{text}}",
                     "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"},
                                     {"metric": "bits_per_byte"}]},
}


def write_tasks(folder: Path) -> Path:
    """The three tasks as lm-eval YAML (JSON is YAML) over local jsonl files: nothing is downloaded."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, spec in TASKS.items():
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in spec["data"]), encoding="utf-8")
        task = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
                "test_split": "test", **{k: v for k, v in spec.items() if k != "data"}}
        (folder / f"{name}.yaml").write_text(json.dumps(task, ensure_ascii=False), encoding="utf-8")
    return folder


@pytest.fixture
def offline(tmp_path, monkeypatch):
    for variable in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(variable, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))


def metrics(results: dict) -> dict[str, float]:
    """task/metric -> value, lm-eval's result keys ("acc,none") without the filter suffix."""
    return {f"{task}/{key.split(',')[0]}": value for task, values in results["results"].items()
            for key, value in values.items() if "," in key and "_stderr" not in key and isinstance(value, float)}


def test_our_harness_results_equal_lm_evals_hf_backend(tmp_path, tokenizer_dir, offline):
    lm_eval = require_module("lm_eval")
    require_module("transformers")
    include = write_tasks(tmp_path / "tasks")
    model = random_model(3)
    ckpt = write_stage_checkpoint(model, tmp_path / "sft.ckpt", tokenizer_dir, stage="SFT")
    # a 16-token context: several rolling windows per text, truncated contexts (lm-eval's rules on both sides)
    ours = eval_command(str(ckpt), harness=",".join(TASKS), harness_include=str(include), batch_size=3,
                        seq_len=CONTEXT, device="cpu")
    hf_folder = save_hf_directory(model.state_dict(), model.config, Tokenizer.from_file(tokenizer_dir),
                                  tmp_path / "hf", dtype="float32")
    theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={hf_folder},dtype=float32,device=cpu,max_length={CONTEXT}",
                                     tasks=list(TASKS), task_manager=task_manager(str(include), builtin=False),
                                     batch_size=3, log_samples=True)
    ours_metrics, their_metrics = metrics(ours), metrics(theirs)
    assert set(ours_metrics) == set(their_metrics) and len(ours_metrics) == 6, (ours_metrics, their_metrics)
    for key, value in their_metrics.items():
        assert math.isclose(ours_metrics[key], value, rel_tol=1e-5, abs_tol=1e-6), (key, ours_metrics, their_metrics)
    assert 1 < ours_metrics["mini_rolling/word_perplexity"] < math.inf
    # the generated answers themselves, not only their (random model: zero) exact-match score
    our_samples = lm_eval.simple_evaluate(
        model=harness_model(model, Tokenizer.from_file(tokenizer_dir), batch_size=3, max_length=CONTEXT),
        tasks=["mini_generate"], task_manager=task_manager(str(include), builtin=False), log_samples=True)
    answers = [[sample["filtered_resps"] for sample in result["samples"]["mini_generate"]]
               for result in (our_samples, theirs)]
    assert answers[0] == answers[1] and any(answer != [""] for answer in answers[0]), answers
    assert not any(stop in answer[0] for answer in answers[0] for stop in STOPS), answers


def test_chat_template_reaches_the_prompts(tmp_path, tokenizer_dir, offline):
    require_module("lm_eval")
    manager = task_manager(str(write_tasks(tmp_path / "tasks")), builtin=False)  # only ours: indexed at once
    model, tokenizer = random_model(3), Tokenizer.from_file(tokenizer_dir)
    plain, chat = (metrics(run_harness(model, tokenizer, "mini_choice", manager, 4, 512, None, None, use_chat))
                   for use_chat in (False, True))
    # the same questions scored after <|im_start|>user ... <|im_start|>assistant: other log-likelihoods
    assert plain.keys() == chat.keys() == {"mini_choice/acc", "mini_choice/acc_norm"} and plain != chat


WINDOW = 10  # a context window short enough that the texts roll over several windows and prompts are cut


def answers(results: dict, task: str) -> list:
    """Each document's responses (log-likelihoods and is-greedy flags, or generated texts), in document order."""
    return [sample["filtered_resps"] for sample in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def test_each_answer_equals_the_hf_backends_across_windows_and_in_the_chat_template(tmp_path, tokenizer_dir,
                                                                                      offline):
    """Per document, not only the aggregate: every choice's log-likelihood (within 1e-4 nats) and is-greedy flag,
    every rolling sum over several 10-token windows and every generated text, plain and in the chat template
    (ours rendered by chat_format, lm-eval's HF backend through transformers' apply_chat_template)."""
    lm_eval = require_module("lm_eval")
    require_module("transformers")
    from lm_eval.models.huggingface import HFLM

    from minimind_pl.commands.harness import harness_model

    manager = task_manager(str(write_tasks(tmp_path / "tasks")), builtin=False)
    model, tokenizer = random_model(3), Tokenizer.from_file(tokenizer_dir)
    folder = save_hf_directory(model.state_dict(), model.config, tokenizer, tmp_path / "hf", dtype="float32")
    reference = HFLM(pretrained=str(folder), dtype="float32", device="cpu", batch_size=1, max_length=WINDOW)
    ours = harness_model(model, tokenizer, 3, WINDOW)
    for chat, tasks in ((False, list(TASKS)), (True, ["mini_choice", "mini_generate"])):
        mine, theirs = (lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, log_samples=True,
                                                apply_chat_template=chat) for lm in (ours, reference))
        for task in tasks:
            for a, b in zip(answers(mine, task), answers(theirs, task), strict=True):
                if task == "mini_generate":
                    assert a == b
                    continue
                for x, y in zip(a, b, strict=True):  # (logprob, is_greedy) per choice, or the rolling sum
                    x, y = (x, y) if isinstance(x, (tuple, list)) else ((x,), (y,))
                    assert x[0] == pytest.approx(y[0], abs=1e-4) and tuple(x[1:]) == tuple(y[1:]), (task, chat)
        if chat:
            assert mine["samples"]["mini_choice"][0]["arguments"][0][0].startswith("<|im_start|>user")
        assert any(text for (text,) in answers(mine, "mini_generate")), "nothing generated: texts compared prove little"
    rolled = [len(tokenizer.encode(text["text"])) for text in TEXTS]
    assert min(rolled) > 2 * WINDOW  # each text spans at least three windows


def test_unknown_task_names_the_include_folder(tmp_path, tokenizer_dir, offline):
    require_module("lm_eval")
    include = write_tasks(tmp_path / "tasks")
    with pytest.raises(UserError, match=f"unknown lm-eval task.*no_such_task.*{include}"):
        run_harness(random_model(0), Tokenizer.from_file(tokenizer_dir), "mini_choice,no_such_task",
                    task_manager(str(include), builtin=False), 4, 512, None, None, False)


def test_eval_needs_data_or_harness(tmp_path, tokenizer_dir):
    ckpt = write_stage_checkpoint(random_model(0), tmp_path / "sft.ckpt", tokenizer_dir, stage="SFT")
    with pytest.raises(UserError, match="--data FILE.*--harness TASKS"):
        eval_command(str(ckpt))


@pytest.mark.parametrize("text, stops, expected", [
    ("abc. def\nghi", [".", "\n"], "abc"),
    ("abc\n. def", [".", "\n"], "abc"),
    ("no stop here", ["。"], "no stop here"),
    ("empty stop", [""], "empty stop"),
])
def test_cut_at_the_earliest_stop_string(text, stops, expected):
    assert cut_at_stop_strings(text, stops) == expected
