"""``python main.py generate``: teacher answers written as SFT jsonl, resumable."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from minimind_pl.cli import main
from minimind_pl.config import ModelConfig
from minimind_pl.data import SFTDataModule
from minimind_pl.chat_format import split_reasoning
from minimind_pl.commands.generate import answered_keys, pending_prompts, prompt_key, prompt_messages, sft_record
from minimind_pl.model import MiniMindForCausalLM


def test_split_reasoning_with_and_without_a_think_block():
    assert split_reasoning("  42 ") == ("42", None)
    assert split_reasoning("<think>\nadd them\n</think>\n\n42") == ("42", "add them")
    assert split_reasoning("add them\n</think>\n42") == ("42", "add them")  # prompt opened the block
    assert split_reasoning("<think>\n\n</think>\n\n42") == ("42", None)
    assert split_reasoning("still thinking", opened=True) == ("", "still thinking")  # cut before </think>
    record = sft_record([{"role": "user", "content": "6*7?"}], "<think>six sevens</think>42")
    assert record["conversations"][-1] == {"role": "assistant", "content": "42", "reasoning_content": "six sevens"}


def test_prompt_formats_and_errors():
    user = {"role": "user", "content": "hi"}
    assert prompt_messages({"prompt": "hi"}, "f:1") == [user]
    assert prompt_messages({"conversations": [user]}, "f:1") == [user]
    assert prompt_messages({"conversations": [user, {"role": "assistant", "content": "old"}]}, "f:1") == [user]
    with pytest.raises(ValueError, match="f:3"):
        prompt_messages({"conversations": [{"role": "system", "content": "s"}]}, "f:3")
    with pytest.raises(ValueError, match="f:4"):
        prompt_messages({"text": "x"}, "f:4")


def test_pending_counts_duplicates_and_cuts_a_torn_line(tmp_path):
    a, b = [{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]
    assert pending_prompts([a, a, b], Counter({prompt_key(a): 1})) == [a, b]
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps(sft_record(a, "x")) + "\n" + '{"conversations": [{"ro', encoding="utf-8")
    assert answered_keys(out) == Counter({prompt_key(a): 1})
    assert out.read_text(encoding="utf-8").endswith("}\n")


@pytest.fixture
def teacher(tmp_path) -> str:
    """A random debug model saved as a MiniMind .pth (its answers are noise, their format is not)."""
    torch.manual_seed(0)
    path = tmp_path / "teacher.pth"
    torch.save(MiniMindForCausalLM(ModelConfig.from_preset("debug")).state_dict(), path)
    return str(path)


def write_prompts(path: Path, sft_lines: list[str]) -> Path:
    """SFT lines (answered anew) plus a ``{"prompt": ...}`` line."""
    path.write_text("".join(sft_lines) + json.dumps({"prompt": "你好"}) + "\n", encoding="utf-8")
    return path


def run_generate(teacher: str, data: Path, out: Path, tokenizer: str) -> None:
    """The command line, greedy and short."""
    main(["generate", "--ckpt", teacher, "--preset", "debug", "--tokenizer", tokenizer, "--data", str(data),
          "--out", str(out), "--max_new_tokens", "6", "--temperature", "0", "--batch_size", "2", "--device", "cpu"])


def test_generate_writes_sft_jsonl_and_resumes(shared_dir, tmp_path, teacher, capsys):
    tokenizer = str(shared_dir / "minimind")
    lines = (shared_dir / "corpus" / "sft_real.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)[:4]
    out = tmp_path / "answers.jsonl"
    run_generate(teacher, write_prompts(tmp_path / "first.jsonl", lines[:2]), out, tokenizer)
    first = out.read_text(encoding="utf-8")
    assert len(first.splitlines()) == 3

    run_generate(teacher, write_prompts(tmp_path / "all.jsonl", lines), out, tokenizer)  # 2 new prompts
    text = out.read_text(encoding="utf-8")
    assert text.startswith(first) and len(text.splitlines()) == 5
    records = [json.loads(line) for line in text.splitlines()]
    expected = [json.loads(line)["conversations"][:-1] for line in lines] + [[{"role": "user", "content": "你好"}]]
    assert Counter(prompt_key(r["conversations"][:-1]) for r in records) == Counter(map(prompt_key, expected))
    assert all(r["conversations"][-1]["role"] == "assistant" for r in records)

    run_generate(teacher, tmp_path / "all.jsonl", out, tokenizer)  # nothing left to answer
    assert out.read_text(encoding="utf-8") == text

    # The random teacher answers some prompts with nothing: generate said so, and SFT skips exactly those.
    empty = sum(not r["conversations"][-1]["content"].strip() for r in records)
    assert 0 < empty < len(records) and "answers are empty" in capsys.readouterr().out
    dm = SFTDataModule(train_path=str(out), tokenizer=tokenizer, seq_len=64, batch_size=2, num_workers=0,
                       cache_dir=str(tmp_path / "cache"), num_proc=1, skip_invalid=True)
    dm.setup("fit")
    assert dm.stats["skipped_lines"] == empty
    batch = next(iter(dm.train_dataloader()))
    assert (batch["labels"] != -100).any()
