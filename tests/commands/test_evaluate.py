"""``eval``: loss, perplexity and bits per byte on text / conversations, multiple-choice accuracy."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minimind_pl.cli import main
from minimind_pl.config import ModelConfig
from minimind_pl.commands.evaluate import choice_prompts, language_modeling, multiple_choice, read_jsonl
from minimind_pl.model import MiniMindForCausalLM
from minimind_pl.tokenizer import Tokenizer

TEXTS = ["你好，世界。今天天气很好。", "MiniMind is a tiny language model.", "一二三四五六七八九十" * 8]
CONVERSATIONS = [
    [{"role": "user", "content": "1+1=?"}, {"role": "assistant", "content": "2"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你是谁？"},
     {"role": "assistant", "content": "我是MiniMind。", "reasoning_content": "自我介绍"}],
]
QUESTIONS = [
    {"question": "天空是什么颜色？", "A": "蓝色", "B": "绿色", "C": "红色", "D": "黑色", "answer": "A"},
    {"question": "1+1=?", "A": "3", "B": "2", "C": "11", "D": "0", "answer": "B"},
    {"question": "Which is a fruit?", "A": "car", "B": "stone", "C": "apple", "answer": "C"},
]


@pytest.fixture(scope="module")
def tokenizer(shared_dir: Path) -> Tokenizer:
    """MiniMind's tokenizer."""
    return Tokenizer.from_file(shared_dir / "minimind")


@pytest.fixture(scope="module")
def model() -> MiniMindForCausalLM:
    """A random debug-size model."""
    torch.manual_seed(0)
    return MiniMindForCausalLM(ModelConfig.from_preset("debug")).eval()


def write_jsonl(path: Path, rows: list) -> Path:
    """Write rows as jsonl."""
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def direct_nats(model, ids: list[int], scored: list[int]) -> float:
    """Summed NLL of the scored tokens, from one plain forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).logits[0].float()
    nll = F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
    return float((nll * torch.tensor(scored[1:], dtype=torch.float32)).sum())


def test_pretrain_metrics_and_windows(tmp_path, model, tokenizer):
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in TEXTS])
    records = list(read_jsonl(path))
    whole = language_modeling(model, tokenizer, records, "pretrain", str(path), batch_size=2, seq_len=500)
    ids = [[tokenizer.bos_id] + tokenizer.encode(t) + [tokenizer.eos_id] for t in TEXTS]
    nats = sum(direct_nats(model, seq, [0] + [1] * (len(seq) - 1)) for seq in ids)
    tokens = sum(len(seq) - 1 for seq in ids)
    num_bytes = sum(len(t.encode("utf-8")) for t in TEXTS)  # bos/eos are special: no bytes
    assert whole["tokens"] == tokens and whole["bytes"] == num_bytes and whole["documents"] == 3
    assert whole["loss"] == pytest.approx(nats / tokens, rel=1e-4)
    assert whole["perplexity"] == pytest.approx(math.exp(nats / tokens), rel=1e-4)
    assert whole["bits_per_byte"] == pytest.approx(nats / math.log(2) / num_bytes, rel=1e-4)
    windowed = language_modeling(model, tokenizer, records, "pretrain", str(path), batch_size=3, seq_len=7)
    assert (windowed["tokens"], windowed["bytes"]) == (tokens, num_bytes)  # every token scored once
    assert windowed["loss"] != pytest.approx(whole["loss"], rel=1e-6)  # shorter contexts: another number


def test_sft_scores_assistant_turns_only(tmp_path, model, tokenizer):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": c} for c in CONVERSATIONS])
    metrics = language_modeling(model, tokenizer, list(read_jsonl(path)), "sft", str(path))
    expected_tokens = 0
    for conversation in CONVERSATIONS:
        text = tokenizer.apply_chat_template(conversation)
        expected_tokens += sum(len(tokenizer.encode(part.split("<|im_end|>")[0])) + 2  # + <|im_end|> "\n"
                               for part in text.split("<|im_start|>assistant\n")[1:])
    assert metrics["tokens"] == expected_tokens
    assert 0 < metrics["bits_per_byte"] and math.isfinite(metrics["loss"])


@pytest.mark.parametrize("mc_format, chat", [("cloze", False), ("letter", True)])
def test_multiple_choice_matches_one_by_one_scoring(tmp_path, model, tokenizer, mc_format, chat):
    path = write_jsonl(tmp_path / "mc.jsonl", QUESTIONS)
    metrics = multiple_choice(model, tokenizer, list(read_jsonl(path)), str(path), mc_format, chat, batch_size=3)
    correct = 0
    for q in QUESTIONS:
        letters = [k for k in "ABCD" if k in q]
        prompt, continuations = choice_prompts(q, letters, mc_format)
        if chat:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        p = tokenizer.encode(prompt)
        scores = [-direct_nats(model, p + tokenizer.encode(c), [0] * len(p) + [1] * len(tokenizer.encode(c)))
                  for c in continuations]
        correct += letters[scores.index(max(scores))] == q["answer"]
    assert metrics["accuracy"] == pytest.approx(correct / len(QUESTIONS))
    assert metrics["questions"] == 3 and 0 <= metrics["acc_norm"] <= 1


def test_eval_command_end_to_end(tmp_path, model, tokenizer, shared_dir, capsys):
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": {"model." + k: v for k, v in model.state_dict().items()},
                "model_config": model.config.to_dict(),
                "hyper_parameters": {"tokenizer": str(shared_dir / "minimind")}}, ckpt)
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in TEXTS])
    metrics = main(["eval", "--ckpt", str(ckpt), "--data", str(text), "--device", "cpu"])
    assert set(metrics) >= {"loss", "perplexity", "bits_per_byte"}
    assert "bits/byte" in capsys.readouterr().out
    mc = write_jsonl(tmp_path / "mc.jsonl", QUESTIONS)
    metrics = main(["eval", "--ckpt", str(ckpt), "--data", str(mc), "--device", "cpu", "--limit", "2"])
    assert metrics["questions"] == 2 and "accuracy" in capsys.readouterr().out


def test_bad_data_names_file_and_line(tmp_path, model, tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{oops\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        list(read_jsonl(bad))
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"text": "fine"}, {"text": "   "}])
    with pytest.raises(ValueError, match=r"blank.jsonl:2"):
        language_modeling(model, tokenizer, list(read_jsonl(blank)), "pretrain", str(blank))
    wrong = write_jsonl(tmp_path / "mc.jsonl", [{"question": "q", "A": "x", "B": "y", "answer": "E"}])
    with pytest.raises(ValueError, match=r"mc.jsonl:1: answer 'E'"):
        multiple_choice(model, tokenizer, list(read_jsonl(wrong)), str(wrong))


def test_bad_data_files_end_in_one_error_line_before_the_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MINIMIND_DEBUG", raising=False)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    cases = [(tmp_path / "missing.jsonl", f"not found: {tmp_path / 'missing.jsonl'} (from --data)"),
             (tmp_path, f"{tmp_path} (from --data) is a directory, but a .jsonl or .parquet file is expected"),
             (empty, f"{empty} (from --data) holds no records")]
    for data, message in cases:
        with pytest.raises(SystemExit) as stop:  # the checkpoint does not exist: the data is checked first
            main(["eval", "--ckpt", str(tmp_path / "no.ckpt"), "--data", str(data)])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.startswith(f"error: {message}") and "Traceback" not in err
