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
from minimind_pl.commands.generate import (Prompt, answered_keys, pending_prompts, prompt_key, prompt_messages,
                                          sft_record)
from minimind_pl.model import MiniMindForCausalLM
from minimind_pl.tokenizer import Tokenizer
from minimind_pl.generation import generate

from helpers import random_vlm, tiny_tower_folder, write_stage_checkpoint


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
    pa, pb = Prompt(a), Prompt(b)
    assert pending_prompts([pa, pa, pb], Counter({prompt_key(a): 1})) == [pa, pb]
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


def test_open_thinking_cut_by_the_budget_keeps_the_reasoning_out_of_the_answer(shared_dir, tmp_path, teacher):
    """With ``--open_thinking`` the reply starts inside the prompt's ``<think>`` block; six tokens of a random
    teacher never close it, so every reply is reasoning only (or nothing): its answer is empty, not the reasoning."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": "你好"}\n', encoding="utf-8")
    out = tmp_path / "out.jsonl"
    main(["generate", "--ckpt", teacher, "--preset", "debug", "--tokenizer", str(shared_dir / "minimind"),
          "--data", str(prompts), "--out", str(out), "--max_new_tokens", "6", "--temperature", "0",
          "--open_thinking", "true", "--device", "cpu"])
    answers = [json.loads(line)["conversations"][-1] for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(answers) == 2 and all("</think>" not in a.get("reasoning_content", "") for a in answers)
    assert [a["content"] for a in answers] == ["", ""] and any(a.get("reasoning_content") for a in answers)


@pytest.mark.parametrize("cut", [False, True], ids=["complete last line", "cut last line"])
def test_resume_keeps_a_complete_last_line_and_drops_only_a_cut_one(shared_dir, tmp_path, teacher, capsys, cut):
    a, b = [{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": "b"}\n', encoding="utf-8")
    line_a, line_b = (json.dumps(sft_record(m, f"answer {m[0]['content']}"), ensure_ascii=False) for m in (a, b))
    out = tmp_path / "out.jsonl"
    out.write_text(line_a + "\n" + (line_b[:-9] if cut else line_b), encoding="utf-8")  # no final newline
    run_generate(teacher, prompts, out, str(shared_dir / "minimind"))
    printed = capsys.readouterr().out
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    assert lines[0] == line_a + "\n" and len(lines) == 2 and lines[1].endswith("\n")
    if cut:  # b is answered again, by the teacher
        assert f"line 2 of {out} was cut off by a stopped run" in printed
        record = json.loads(lines[1])["conversations"]
        assert record[:-1] == b and record[-1]["content"] != "answer b"
    else:  # kept as it was: nothing to answer
        assert lines[1] == line_b + "\n" and "2 already answered" in printed and "cut off" not in printed


def test_bad_files_end_in_one_error_line(tmp_path, teacher, capsys, monkeypatch):
    monkeypatch.delenv("MINIMIND_DEBUG", raising=False)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": \n', encoding="utf-8")
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "a"}\n', encoding="utf-8")
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"text": "not an answer"}\n', encoding="utf-8")
    cases = [
        (tmp_path / "missing.jsonl", tmp_path / "o.jsonl", f"not found: {tmp_path / 'missing.jsonl'} (from --data)"),
        (tmp_path, tmp_path / "o.jsonl", f"{tmp_path} (from --data) is a directory, but a .jsonl file is expected"),
        (prompts, tmp_path / "o.jsonl", f"{prompts}:2: not valid JSON"),
        (good, tmp_path, f"{tmp_path} (from --out) is a directory, but a jsonl file (the answers) is expected"),
        (good, foreign, f"{foreign}:1: not an answer line of this tool"),
    ]
    for data, out, message in cases:
        with pytest.raises(SystemExit) as stop:
            main(["generate", "--ckpt", teacher, "--data", str(data), "--out", str(out)])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.startswith(f"error: {message}") and "Traceback" not in err


def test_generate_answers_image_rows_and_keeps_their_images(shared_dir, tmp_path, capsys):
    """A MiniMind-V teacher: an image row and a text row batched; each answer is the row's greedy answer alone,
    the image row's line keeps its image (relative to --out), and a second run finds both answered."""
    from PIL import Image

    tokenizer = Tokenizer.from_file(shared_dir / "minimind")
    model = random_vlm(tiny_tower_folder(tmp_path / "tower"))
    ckpt = write_stage_checkpoint(model, tmp_path / "vlm.ckpt", shared_dir / "minimind", stage="SFT")
    (tmp_path / "data" / "img").mkdir(parents=True)
    Image.new("RGB", (24, 40), (200, 40, 90)).save(tmp_path / "data" / "img" / "a.png")
    image_row = {"conversations": [{"role": "user", "content": "看<image>说"}], "images": ["img/a.png"]}
    data = tmp_path / "data" / "prompts.jsonl"
    data.write_text(json.dumps(image_row, ensure_ascii=False) + "\n" + json.dumps({"prompt": "你好"}) + "\n",
                    encoding="utf-8")
    out = tmp_path / "out" / "answers.jsonl"
    args = ["generate", "--ckpt", str(ckpt), "--data", str(data), "--out", str(out), "--max_new_tokens", "6",
            "--temperature", "0", "--batch_size", "2", "--device", "cpu"]
    main(args)
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert lines[0]["images"] == ["../data/img/a.png"] and "images" not in lines[1]
    pixels = model.tower.image_spec(Image.open(tmp_path / "data" / "img" / "a.png"))[None]
    for line, content, images in [(lines[0], "看" + "<|image_pad|>" * 16 + "说", pixels), (lines[1], "你好", None)]:
        ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                             add_generation_prompt=True))
        alone = generate(model, [ids], max_new_tokens=6, do_sample=False, eos_token_id=tokenizer.eos_id,
                         images=[images])[0]
        assert split_reasoning(tokenizer.decode(alone))[0] == line["conversations"][-1]["content"]
    main(args)
    assert "2 already answered" in capsys.readouterr().out


def test_image_rows_need_matching_tags(tmp_path):
    from minimind_pl.commands.generate import read_prompts

    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"conversations": [{"role": "user", "content": "x"}], "images": ["a.png"]}) + "\n")
    with pytest.raises(ValueError, match=r"p.jsonl:1: 0 <image> tag\(s\) but 1 image"):
        read_prompts(data)
