"""``python main.py chat``: streamed answers equal plain greedy generation; the history is kept."""

from minimind_pl.commands.chat import ChatSession
from minimind_pl.cli import main
from minimind_pl.generation import GREEDY
from minimind_pl.tokenizer import Tokenizer

from helpers import greedy_chat_answer, random_model, write_stage_checkpoint


def tiny_checkpoint(tmp_path, tokenizer_dir):
    """A random debug model and a stage-format checkpoint of it that records its tokenizer."""
    model = random_model()
    return model, write_stage_checkpoint(model, tmp_path / "tiny.ckpt", tokenizer_dir)


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
