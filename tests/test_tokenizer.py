"""Tests for minimind_pl.tokenizer: loading, encode/decode, streaming, chat template parity, training."""
import copy
import hashlib
import json
import pickle
import shutil
import time
from pathlib import Path

import pytest

from helpers import require_module
from minimind_pl.data.formats import jsonl_texts
from minimind_pl.tokenizer import (
    ADDED_TOKENS, CONTROL_TOKENS, Tokenizer, train_tokenizer,
)
from minimind_pl.commands.tokenizer import tokenizer_command
from minimind_pl.errors import UserError

TEXTS = [
    "你好，世界！今天天气不错。",
    "Hello world, it's a test.  Two spaces\tand a tab\n",
    "混合 mixed 文本 with emoji 😀🚀 and 𠀀 rare CJK, ümlauts, and Ω≈ç√.",
    "<|im_start|>user\n问<|im_end|>\n<think>\n想\n</think>\n<tool_call>x</tool_call>",
    "",
]

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "查询天气 <b>&'\"",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALC = {"type": "function", "function": {"name": "calc", "description": "Evaluate math",
                                         "parameters": {"type": "object", "properties": {"expr": {"type": "string"}}}}}

# (messages, kwargs) pairs in MiniMind's data format: JSON-string tools / tool_calls allowed.
CASES = [
    ([{"role": "user", "content": "hi"}], {}),
    ([{"role": "user", "content": "hi"}], {"add_generation_prompt": True}),
    ([{"role": "user", "content": "hi"}], {"add_generation_prompt": True, "open_thinking": True}),
    ([{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "1+1?"},
      {"role": "assistant", "content": "2"}, {"role": "user", "content": "2+2?"}],
     {"add_generation_prompt": True, "open_thinking": False}),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": "\n\nr1\n"},
      {"role": "user", "content": "q2"}, {"role": "assistant", "content": "\n\nb"}], {}),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>\nreason\n</think>\n\nanswer"}], {}),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "pre<think>a<think>b\n</think>x</think>\n\ny"}], {}),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "x</think>", "reasoning_content": "given"}], {}),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "</think>"}], {}),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "thinking": "alias"}], {}),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": None}], {}),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "mid system"}, {"role": "user", "content": "b"}], {}),
    ([{"role": "system", "content": "# Tools", "tools": json.dumps([WEATHER], ensure_ascii=False)},
      {"role": "user", "content": "北京天气？"},
      {"role": "assistant", "content": "",
       "tool_calls": json.dumps([{"name": "get_weather", "arguments": {"city": "北京"}}], ensure_ascii=False)},
      {"role": "tool", "content": '{"temp": 20}'}, {"role": "assistant", "content": "20度。"}], {}),
    ([{"role": "system", "content": "sys", "tools": [WEATHER, CALC]}, {"role": "user", "content": "two things"},
      {"role": "assistant", "content": "Let me check.", "tool_calls": [
          {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
          {"name": "calc", "arguments": {"expr": "6*7", "unicode": "é<>&"}}]},
      {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "42"}, {"role": "tool", "content": "third"}],
     {"add_generation_prompt": True, "open_thinking": True}),
    ([{"role": "user", "content": "no system, tools given"},
      {"role": "assistant", "content": None, "tool_calls": [{"name": "calc", "arguments": {"expr": "1"}}]},
      {"role": "tool", "content": "1"}], {"tools": [CALC], "add_generation_prompt": True}),
    ([{"role": "tool", "content": "first is a tool"}, {"role": "user", "content": "u"}], {}),
    ([{"role": "user", "content": "<tool_response>x</tool_response>"},
      {"role": "assistant", "content": "\n", "tool_calls": [{"name": "calc", "arguments": {}}]}], {}),
    ([{"role": "system", "content": "only system"}], {"add_generation_prompt": True}),
]


def load_examples(shared_dir):
    """chat_examples.jsonl as (messages, kwargs) pairs."""
    cases = []
    for line in (shared_dir / "minimind" / "chat_examples.jsonl").read_text(encoding="utf-8").splitlines():
        ex = json.loads(line)
        kwargs = {k: ex[k] for k in ("tools", "add_generation_prompt", "open_thinking") if k in ex}
        cases.append((ex["messages"], kwargs))
    return cases


def minimind_style(messages, kwargs):
    """Prepare inputs for transformers as MiniMind's SFTDataset.create_chat_prompt does."""
    tools = kwargs.get("tools")
    out = []
    for message in copy.deepcopy(messages):
        if message.get("role") == "system" and message.get("tools") and tools is None:
            tools = json.loads(message["tools"]) if isinstance(message["tools"], str) else message["tools"]
        if message.get("tool_calls") and isinstance(message["tool_calls"], str):
            message["tool_calls"] = json.loads(message["tool_calls"])
        out.append(message)
    return out, {**kwargs, "tools": tools}


@pytest.fixture(scope="module")
def mm_dir(shared_dir):
    """MiniMind's original tokenizer directory."""
    return shared_dir / "minimind"


@pytest.fixture(scope="module")
def mm(mm_dir):
    """MiniMind's tokenizer loaded by our Tokenizer."""
    return Tokenizer.from_file(mm_dir)


@pytest.fixture(scope="module")
def hf(mm_dir):
    """MiniMind's tokenizer loaded by transformers (reference)."""
    transformers = require_module("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(mm_dir))


@pytest.fixture(scope="module")
def trained_dir(shared_dir, tmp_path_factory):
    """A 6400-token tokenizer trained on pretrain_real.jsonl (also checks it trains in seconds)."""
    out = tmp_path_factory.mktemp("trained_tok")
    start = time.perf_counter()
    train_tokenizer(jsonl_texts([shared_dir / "corpus" / "pretrain_real.jsonl"]), 6400, out, show_progress=False)
    assert time.perf_counter() - start < 30
    return out


# ----------------------------------------------------------------------------- loading
def test_loads_minimind_tokenizer(mm, mm_dir):
    assert mm.vocab_size == 6400
    assert (mm.pad_id, mm.bos_id, mm.eos_id) == (0, 1, 2)
    ids = [mm.token_to_id(t) for t in ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
                                       "<think>", "</think>")]
    assert ids == [21, 22, 23, 24, 25, 26]
    assert mm.token_to_id("not-a-token-xyz") is None
    raw = (mm_dir / "tokenizer.json").read_bytes() + (mm_dir / "tokenizer_config.json").read_bytes()
    assert mm.fingerprint == hashlib.sha256(raw).hexdigest()


def test_pickle_and_save_roundtrip(mm, tmp_path):
    clone = pickle.loads(pickle.dumps(mm))
    assert clone.fingerprint == mm.fingerprint and clone.encode(TEXTS[2]) == mm.encode(TEXTS[2])
    again = Tokenizer.from_file(mm.save(tmp_path / "copy"))
    assert again.fingerprint == mm.fingerprint


# ----------------------------------------------------------------------------- encode / decode
def test_encode_decode_roundtrip(mm):
    for text in TEXTS:
        assert mm.decode(mm.encode(text)) == text
    assert mm.encode_batch(TEXTS) == [mm.encode(t) for t in TEXTS]
    assert mm.encode("<|im_start|>")[0] == 1 and mm.encode("<think>") == [25]


def test_encode_decode_match_transformers(mm, hf):
    for text in TEXTS:
        ids = mm.encode(text)
        assert ids == hf(text, add_special_tokens=False)["input_ids"]
        for skip in (False, True):
            assert mm.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_stream_decoder_never_breaks_characters(mm):
    text = "中文😀🚀𠀀 end"
    ids = mm.encode(text)
    assert len(ids) > len(text.split())  # multi-byte characters span several tokens
    dec = mm.stream_decoder()
    pieces = [dec.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + dec.flush() == text
    assert any(p == "" for p in pieces)  # some tokens completed no character


def test_stream_decoder_flush_and_skip(mm):
    partial = [i for i in mm.encode("😀")][:-1]
    dec = mm.stream_decoder()
    assert "".join(dec.push(i) for i in partial) == ""
    assert dec.flush() == "\ufffd"
    ids = mm.encode("<|im_start|>hi<think><|im_end|>")
    dec = mm.stream_decoder(skip_special_tokens=True)
    assert "".join(dec.push(i) for i in ids) == mm.decode(ids, skip_special_tokens=True) == "hi<think>"


# ----------------------------------------------------------------------------- chat template parity
def test_chat_examples_match_transformers(mm, hf, shared_dir):
    for messages, kwargs in load_examples(shared_dir):
        ref_messages, ref_kwargs = minimind_style(messages, kwargs)
        expected = hf.apply_chat_template(ref_messages, tokenize=False, **ref_kwargs)
        assert mm.apply_chat_template(messages, **kwargs) == expected


@pytest.mark.parametrize("index", range(len(CASES)))
def test_own_cases_match_transformers(mm, hf, index):
    messages, kwargs = CASES[index]
    ref_messages, ref_kwargs = minimind_style(messages, kwargs)
    expected = hf.apply_chat_template(ref_messages, tokenize=False, **ref_kwargs)
    assert mm.apply_chat_template(messages, **kwargs) == expected


def test_tojson_filter_matches_transformers(mm, hf, tmp_path):
    template = "{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ raise_exception is defined }}|{{ bos_token }}"
    directory = Path(shutil.copytree(mm.save(tmp_path / "t"), tmp_path / "t2"))
    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = template
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    ours = Tokenizer.from_file(directory)
    transformers = require_module("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(directory))
    value = {"b": "<&>'é", "a": [1, 2.5, None, True]}
    msgs = [{"role": "user", "content": "x"}]
    assert ours.apply_chat_template(msgs, x=value) == ref.apply_chat_template(msgs, tokenize=False, x=value)


def test_trained_template_renders_like_minimind(trained_dir, hf, shared_dir):
    ours = Tokenizer.from_file(trained_dir)
    transformers = require_module("transformers")
    ref_trained = transformers.AutoTokenizer.from_pretrained(str(trained_dir))
    for messages, kwargs in load_examples(shared_dir) + CASES:
        ref_messages, ref_kwargs = minimind_style(messages, kwargs)
        expected = hf.apply_chat_template(ref_messages, tokenize=False, **ref_kwargs)
        assert ours.apply_chat_template(messages, **kwargs) == expected
        assert ref_trained.apply_chat_template(ref_messages, tokenize=False, **ref_kwargs) == expected


# ----------------------------------------------------------------------------- errors
def test_missing_and_corrupt_files(mm, tmp_path):
    with pytest.raises(FileNotFoundError, match="directory"):
        Tokenizer.from_file(tmp_path / "nope")
    directory = mm.save(tmp_path / "tok")
    (directory / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="corrupt JSON.*tokenizer_config.json"):
        Tokenizer.from_file(directory)
    (directory / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_file(directory)


@pytest.mark.parametrize("template, match", [
    ("{% if %}", "syntax error"),
    ("{{ raise_exception('bad conversation') }}", "bad conversation"),
    ("{{ messages[0].content + 1 }}", "failed to render"),
])
def test_bad_template(mm, tmp_path, template, match):
    directory = mm.save(tmp_path / "tok")
    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = template
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        Tokenizer.from_file(directory).apply_chat_template([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("messages, match", [
    ([], "empty"),
    ([{"role": "user", "content": "ok"}, {"role": "robot", "content": "x"}], r"message 1 \(role 'robot'\).*unknown role"),
    ([{"role": "user"}], r"message 0 \(role 'user'\).*content"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": 3}], r"message 1 \(role 'assistant'\).*string"),
    ([{"role": "system", "content": "s", "tools": "[{broken"}], r"message 0 \(role 'system'\).*tools.*JSON"),
    (["just a string"], "message 0 must be a dict"),
])
def test_bad_messages(mm, messages, match):
    with pytest.raises(ValueError, match=match):
        mm.apply_chat_template(messages)


# ----------------------------------------------------------------------------- training
def test_trained_tokenizer_layout(trained_dir):
    tok = Tokenizer.from_file(trained_dir)
    assert tok.vocab_size == 6400 and (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert [tok.token_to_id(t) for t in ADDED_TOKENS] == list(range(len(ADDED_TOKENS)))
    assert not any(tok.is_special(tok.token_to_id(t)) for t in CONTROL_TOKENS)
    assert tok.is_special(0) and tok.is_special(20)
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text


def test_trained_tokenizer_loads_in_transformers(trained_dir):
    transformers = require_module("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(trained_dir))
    tok = Tokenizer.from_file(trained_dir)
    assert (ref.pad_token_id, ref.bos_token_id, ref.eos_token_id) == (0, 1, 2)
    for text in TEXTS:
        assert ref(text, add_special_tokens=False)["input_ids"] == tok.encode(text)


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_iter_texts_and_bad_line(tmp_path):
    good = _write_jsonl(tmp_path / "a.jsonl", [
        {"text": "pretrain"},
        {"conversations": [{"role": "user", "content": "u"},
                           {"role": "assistant", "content": "a", "reasoning_content": "r"}]},
    ])
    assert list(jsonl_texts([good])) == ["pretrain", "u", "a", "r"]
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "ok"}\n\n{oops\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"b.jsonl:3: not valid JSON"):
        list(jsonl_texts([bad]))
    with pytest.raises(UserError, match=r"not found: .*missing.jsonl \(from --data\)"):
        list(jsonl_texts([tmp_path / "missing.jsonl"]))
    unknown = _write_jsonl(tmp_path / "c.jsonl", [{"text": "ok"}, {"body": "no known field"}])
    with pytest.raises(UserError, match=r"c.jsonl:2: not a record of a known format"):
        list(jsonl_texts([unknown]))
    with pytest.raises(TypeError, match="jsonl_texts"):  # the old call, with file paths, fails loudly
        train_tokenizer([good], 400, tmp_path / "x", show_progress=False)


def test_tokenizer_trains_on_every_format_once_per_text(tmp_path):
    """RL prompts count, a DPO pair's shared prompt counts once, a line of two formats is read as its format."""
    data = _write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "p1", "gt": "4"},
        {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
         "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}]},
        {"text": "t", "conversations": [{"role": "user", "content": "not read"}]},
    ])
    assert list(jsonl_texts([data])) == ["p1", "q", "good", "bad", "t"]


def test_tokenizer_command_small(tmp_path, capsys):
    data = _write_jsonl(tmp_path / "d.jsonl", [{"text": f"sample {i} 文本 text"} for i in range(50)]
                        + [{"conversations": [{"role": "user", "content": "你好"}]}])
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(jsonl_texts([data]), 100, tmp_path / "x", show_progress=False)
    tokenizer_command([str(data)], vocab_size=400, out=str(tmp_path / "tok"))
    report = capsys.readouterr().out
    assert "chars/token" in report and "saved to" in report
    tok = Tokenizer.from_file(tmp_path / "tok")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n"


def test_tokenizer_command_names_a_folder_given_as_data(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "hi"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"\(from --data\) is a directory.*a\.jsonl"):
        tokenizer_command([str(tmp_path)], vocab_size=400, out=str(tmp_path / "tok"))
