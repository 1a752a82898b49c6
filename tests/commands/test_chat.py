"""``python main.py chat``: streamed answers equal plain greedy generation; the history is kept; pretrained
checkpoints continue raw text; the speed is printed; YaRN can be switched on."""

import re

import pytest

from minimind_pl.commands.chat import ChatSession
from minimind_pl.cli import main
from minimind_pl.generation import GREEDY, generate
from minimind_pl.tokenizer import Tokenizer

from helpers import greedy_chat_answer, random_model, write_stage_checkpoint


def tiny_checkpoint(tmp_path, tokenizer_dir, stage: str = "SFT", **overrides):
    """A random debug model and a stage-format checkpoint of it that records its tokenizer and stage."""
    model = random_model(**overrides)
    return model, write_stage_checkpoint(model, tmp_path / "tiny.ckpt", tokenizer_dir, stage=stage)


def test_prompt_prints_the_greedy_answer(tmp_path, shared_dir, capsys):
    tokenizer = Tokenizer.from_file(shared_dir / "minimind")
    model, ckpt = tiny_checkpoint(tmp_path, shared_dir / "minimind")
    main(["chat", "--ckpt", str(ckpt), "--prompt", "你好", "--max_new_tokens", "12", "--temperature", "0",
          "--device", "cpu"])
    assert capsys.readouterr().out == greedy_chat_answer(model, tokenizer, "你好", max_new_tokens=12) + "\n"


def test_session_keeps_history_and_streams_whole_characters(tmp_path, shared_dir):
    tokenizer = Tokenizer.from_file(shared_dir / "minimind")
    model, _ = tiny_checkpoint(tmp_path, shared_dir / "minimind")
    session = ChatSession(model, tokenizer, history_turns=1, max_new_tokens=6, sampling=GREEDY)
    first = "".join(session.stream_answer("你好"))
    assert "\ufffd" not in first
    text = tokenizer.decode(session.prompt_ids("再见"))
    assert "你好" in text and first.strip() in text and text.count("<|im_start|>user") == 2
    "".join(session.stream_answer("再见"))
    assert tokenizer.decode(session.prompt_ids("三")).count("<|im_start|>user") == 2  # only 1 turn kept


def greedy_continuation(model, tokenizer, text: str, max_new_tokens: int) -> str:
    """What ``chat`` should print for a pretrained model: ``<bos>`` + text continued greedily."""
    ids = generate(model, [[tokenizer.bos_id] + tokenizer.encode(text)], max_new_tokens=max_new_tokens,
                   do_sample=False, eos_token_id=tokenizer.eos_id)[0]
    return tokenizer.decode(ids)


@pytest.mark.parametrize("stage, mode, text_mode", [("Pretrain", "auto", True), ("SFT", "auto", False),
                                                    ("Pretrain", "chat", False), ("SFT", "text", True)])
def test_pretrained_checkpoints_continue_raw_text(tmp_path, shared_dir, capsys, stage, mode, text_mode):
    tokenizer = Tokenizer.from_file(shared_dir / "minimind")
    model, ckpt = tiny_checkpoint(tmp_path, shared_dir / "minimind", stage=stage)
    main(["chat", "--ckpt", str(ckpt), "--prompt", "很久以前", "--max_new_tokens", "8", "--temperature", "0",
          "--device", "cpu", "--mode", mode])
    captured = capsys.readouterr()
    expected = (greedy_continuation(model, tokenizer, "很久以前", 8) if text_mode
                else greedy_chat_answer(model, tokenizer, "很久以前", max_new_tokens=8))
    assert captured.out == expected + "\n"
    assert re.search(r"\[\d+ tokens, [\d.]+ tokens/s\]", captured.err)
    assert ("continuing raw text" in captured.err) == (text_mode and mode == "auto")


def test_text_mode_keeps_no_history(tmp_path, shared_dir):
    tokenizer = Tokenizer.from_file(shared_dir / "minimind")
    model, _ = tiny_checkpoint(tmp_path, shared_dir / "minimind")
    session = ChatSession(model, tokenizer, max_new_tokens=4, sampling=GREEDY, text_mode=True)
    "".join(session.stream_answer("第一"))
    assert session.prompt_ids("第二") == [tokenizer.bos_id] + tokenizer.encode("第二") and not session.history
    assert session.last_speed[0] > 0
