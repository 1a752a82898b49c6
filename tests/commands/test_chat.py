"""``python main.py chat``: streamed answers equal plain greedy generation; the history is kept; pretrained
checkpoints continue raw text; the speed is printed; YaRN can be switched on."""

import re

import pytest
import torch

from minimind_pl.commands.chat import ChatSession
from minimind_pl.cli import main
from minimind_pl.generation import GREEDY, generate
from minimind_pl.tokenizer import Tokenizer

from helpers import greedy_chat_answer, random_model, random_vlm, tiny_tower_folder, write_stage_checkpoint


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


# ----------------------------------------------------------------------------- images (MiniMind-V)

PAD = "<|image_pad|>" * 16  # the tiny VLM's placeholder text for one image


def draw(path, colour):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (40, 30), colour)
    ImageDraw.Draw(image).ellipse((5, 5, 25, 20), fill=(255 - colour[0], 90, 200))
    image.save(path)
    return path


@pytest.fixture()
def vlm_checkpoint(tmp_path, shared_dir):
    model = random_vlm(tiny_tower_folder(tmp_path / "tower"))
    return model, write_stage_checkpoint(model, tmp_path / "vlm.ckpt", shared_dir / "minimind", stage="SFT")


def greedy_with_images(model, tokenizer, messages, paths, max_new_tokens):
    """Reference: the conversation rendered with each <image> written out as 16 × <|image_pad|> by hand, the
    pictures preprocessed by the tower folder's spec, greedy generation."""
    from PIL import Image

    text = tokenizer.apply_chat_template([{**m, "content": m["content"].replace("<image>", PAD)} for m in messages],
                                         add_generation_prompt=True)
    pixels = torch.stack([model.tower.image_spec(Image.open(p)) for p in paths])
    ids = generate(model, [tokenizer.encode(text)], max_new_tokens=max_new_tokens, do_sample=False,
                   eos_token_id=tokenizer.eos_id, images=[pixels])[0]
    return tokenizer.decode(ids)


def test_chat_shows_repeated_images_with_the_question(tmp_path, shared_dir, capsys, vlm_checkpoint):
    model, ckpt = vlm_checkpoint
    tokenizer = Tokenizer.from_file(shared_dir / "minimind")
    red, blue = draw(tmp_path / "red.png", (220, 20, 20)), draw(tmp_path / "blue.jpg", (10, 30, 240))
    main(["chat", "--ckpt", str(ckpt), "--image", str(red), "--image", str(blue), "--prompt", "描述",
          "--max_new_tokens", "8", "--temperature", "0", "--device", "cpu"])
    expected = greedy_with_images(model, tokenizer, [{"role": "user", "content": "<image>\n<image>\n描述"}],
                                  [red, blue], 8)
    assert capsys.readouterr().out == expected + "\n"


def test_images_stay_in_the_conversation(tmp_path, shared_dir, vlm_checkpoint):
    model, _ = vlm_checkpoint
    tokenizer = Tokenizer.from_file(shared_dir / "minimind")
    session = ChatSession(model, tokenizer, history_turns=1, max_new_tokens=5, sampling=GREEDY)
    red = draw(tmp_path / "red.png", (220, 20, 20))
    first = "".join(session.stream_answer("这是什么<image>?", [session.read_image(str(red))]))
    ids, images = session.prompt("颜色呢")  # the first turn again: its placeholders in place, its image
    assert ids.count(12) == 16 and len(images) == 1 and torch.equal(images[0], session.read_image(str(red)))
    second = "".join(session.stream_answer("颜色呢"))
    assert second == greedy_with_images(model, tokenizer, [
        {"role": "user", "content": "这是什么<image>?"}, {"role": "assistant", "content": first},
        {"role": "user", "content": "颜色呢"}], [red], 5)
    "".join(session.stream_answer("再见"))
    ids, images = session.prompt("三")  # the image's turn left the kept history, and its image with it
    assert 12 not in ids and images == []


def test_chat_refuses_images_a_model_cannot_read(tmp_path, shared_dir, capsys):
    red = draw(tmp_path / "red.png", (220, 20, 20))
    _, ckpt = tiny_checkpoint(tmp_path, shared_dir / "minimind")
    with pytest.raises(SystemExit):
        main(["chat", "--ckpt", str(ckpt), "--image", str(red), "--prompt", "x", "--device", "cpu"])
    assert "text model" in capsys.readouterr().err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    model = random_vlm(tiny_tower_folder(tmp_path / "tower"))
    ckpt = write_stage_checkpoint(model, tmp_path / "vlm.ckpt", shared_dir / "minimind", stage="SFT")
    with pytest.raises(SystemExit):
        main(["chat", "--ckpt", str(ckpt), "--image", str(broken), "--prompt", "x", "--device", "cpu"])
    assert "broken.png" in capsys.readouterr().err
    session = ChatSession(model, Tokenizer.from_file(shared_dir / "minimind"))
    with pytest.raises(Exception, match="2 <image> tag"):
        session.prompt("<image><image>", [session.read_image(str(red))])


def test_session_image_command_attaches_to_the_next_question(tmp_path, shared_dir, capsys, monkeypatch,
                                                             vlm_checkpoint):
    model, ckpt = vlm_checkpoint
    tokenizer = Tokenizer.from_file(shared_dir / "minimind")
    red = draw(tmp_path / "red.png", (220, 20, 20))
    lines = iter([f"/image {red}", f"/image {tmp_path / 'missing.png'}", "描述", ""])
    monkeypatch.setattr("builtins.input", lambda _: next(lines))
    main(["chat", "--ckpt", str(ckpt), "--max_new_tokens", "6", "--temperature", "0", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "(1 image(s) attached to the next question)" in out and "missing.png" in out  # a bad one: reported
    answer = greedy_with_images(model, tokenizer, [{"role": "user", "content": "<image>\n描述"}], [red], 6)
    assert "model> " + answer + "\n" in out


def test_chat_with_tools_runs_the_calls_shows_them_and_answers_with_the_result(shared_dir):
    """A scripted model calls the calculator, then answers once a tool response is in its prompt: the terminal shows
    the call, the tool's real result, and the answer; the model's second prompt holds that result."""
    import io

    from scripted_model import TOOL_RESPONSE, ScriptedModel
    from minimind_pl.tools import Toolbox, builtin_tools

    tokenizer = Tokenizer.from_file(shared_dir / "minimind")
    call = '<tool_call>\n{"name": "calculate_math", "arguments": {"expression": "256*37"}}\n</tool_call>'
    model = ScriptedModel(tokenizer.encode(call), eos=tokenizer.eos_id, after_tool=tokenizer.encode("It is 9472."))
    session = ChatSession(model, tokenizer, max_new_tokens=64, sampling=GREEDY)
    out = io.StringIO()
    episode = session.answer_with_tools("256*37?", Toolbox(builtin_tools()), out)
    assert out.getvalue() == (call + "\n" + '[tool] calculate_math({"expression": "256*37"}) -> {"result": "9472"}\n'
                              "It is 9472.\n")
    assert TOOL_RESPONSE in model.prompts[1] and '{"result": "9472"}' in tokenizer.decode(model.prompts[1])
    assert "# Tools" in tokenizer.decode(model.prompts[0]) and episode.answer == "It is 9472."
    assert session.history == [{"role": "user", "content": "256*37?"}, {"role": "assistant", "content": "It is 9472."}]
    cut = io.StringIO()
    session.answer_with_tools("again", Toolbox(builtin_tools()), cut, max_turns=1)
    assert cut.getvalue().endswith("[tool] still calling tools after 1 replies: no final answer\n")


def test_chat_tools_flag_offers_the_builtin_tools(tmp_path, shared_dir, capsys):
    _, ckpt = tiny_checkpoint(tmp_path, shared_dir / "minimind")
    main(["chat", "--ckpt", str(ckpt), "--prompt", "你好", "--max_new_tokens", "4", "--temperature", "0",
          "--device", "cpu", "--tools", "true"])
    assert capsys.readouterr().out.endswith("\n")
