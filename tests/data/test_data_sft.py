"""SFT data: labels cover exactly the assistant turns (MiniMind's rule), seeded augmentations, tools."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest

from minimind_pl.data import DataFormatError, SFTDataModule
from minimind_pl.data.cache import cache_path
from minimind_pl.data.formats import format_named
from minimind_pl.data.packing import IGNORE_INDEX
from minimind_pl.chat_format import EMPTY_THINK
from minimind_pl.data.formats.sft import SYSTEM_PROMPTS, SFTEncoder, assistant_mask, find_pattern, sft_encoder
from minimind_pl.errors import UserError
from minimind_pl.tokenizer import Tokenizer

END = "<|im_end|>\n"


def _spans(mask: np.ndarray) -> list[tuple[int, int]]:
    edges = np.flatnonzero(np.diff(np.r_[0, mask.astype(np.int8), 0]))
    return list(zip(edges[::2], edges[1::2]))


def _label_texts(tok, ids, mask) -> list[str]:
    return [tok.decode(ids[a:b].tolist()) for a, b in _spans(mask)]


@pytest.fixture(scope="module")
def sft_dm(corpus, tok_dir, tmp_path_factory):
    dm = SFTDataModule(str(corpus / "sft_real.jsonl"), seq_len=256, batch_size=4, tokenizer=tok_dir,
                       cache_dir=str(tmp_path_factory.mktemp("sft_cache")), num_workers=0)
    dm.setup("fit")
    return dm


def test_labels_are_exactly_the_assistant_answers(sft_dm, corpus):
    tok = sft_dm.tokenizer
    cache = sft_dm.caches[str(corpus / "sft_real.jsonl")]
    lines = (corpus / "sft_real.jsonl").read_text(encoding="utf-8").splitlines()
    assert cache.n_docs == len(lines)
    with_system = kept_think = 0
    for i, line in enumerate(lines):
        conv = json.loads(line)["conversations"]
        ids, mask = cache.doc(i)
        text = tok.decode(ids.tolist())
        labels = _label_texts(tok, ids, mask)
        answers = [m["content"] for m in conv if m["role"] == "assistant"]
        assert len(labels) == len(answers)
        for label, answer in zip(labels, answers):
            if label.startswith(EMPTY_THINK):
                kept_think += 1
                label = label[len(EMPTY_THINK):]
            assert label == answer + END
        for m in conv:  # prompts never carry a loss
            if m["role"] != "assistant":
                assert all(m["content"] not in lab for lab in labels)
        with_system += text.startswith("<|im_start|>system\n")
        assert text.endswith(END)
    n = len(lines)
    assert 0.12 * n < with_system < 0.28 * n  # system_prompt_ratio=0.2
    assert 0.12 * n < kept_think < 0.28 * n  # empty_think_drop_ratio=0.8


def test_packed_sft_labels_follow_the_mask(sft_dm, corpus):
    cache = sft_dm.caches[str(corpus / "sft_real.jsonl")]
    stream_mask = np.asarray(cache.mask).astype(bool)
    ds = sft_dm.train_dataset
    n_labels = 0
    for r in range(len(ds)):
        s = ds[r]
        start = r * 256
        lab = s["labels"] != IGNORE_INDEX
        # label t targets stream token start + t + 1: only masked (assistant) tokens are targets
        targets = start + 1 + np.flatnonzero(lab)
        assert np.all(stream_mask[targets])
        n_labels += int(lab.sum())
    assert n_labels == int(stream_mask.sum())  # and every assistant token is learned once


def test_padded_sft_rows_learn_the_assistant_tokens_only(corpus, tok_dir, tmp_path):
    """``packing: false``: one conversation per row, cut at seq_len + 1 tokens; label t is token t + 1 where that
    token is an assistant token."""
    dm = SFTDataModule(str(corpus / "sft_real.jsonl"), seq_len=64, batch_size=4, tokenizer=tok_dir,
                       cache_dir=str(tmp_path), num_workers=0, packing=False)
    dm.setup("fit")
    cache = dm.caches[str(corpus / "sft_real.jsonl")]
    for i in range(0, cache.n_docs, 7):
        ids, mask = (np.asarray(a, np.int64) for a in cache.doc(i))
        n = min(ids.size, 65)
        expected = np.full(64, IGNORE_INDEX)
        expected[:n - 1] = np.where(mask[1:n] == 1, ids[1:n], IGNORE_INDEX)
        row = dm.train_dataset[i]
        assert row["labels"].tolist() == expected.tolist() and row["input_ids"][:n - 1].tolist() == ids[:n - 1].tolist()


def test_augmentations_deterministic_and_switchable(corpus, tok_dir, tmp_path):
    path = str(corpus / "sft_real.jsonl")
    a = SFTDataModule(path, seq_len=64, batch_size=2, tokenizer=tok_dir, cache_dir=str(tmp_path / "a"), num_workers=0)
    b = SFTDataModule(path, seq_len=64, batch_size=2, tokenizer=tok_dir, cache_dir=str(tmp_path / "b"), num_workers=0)
    ca, cb = a._cache(path, progress=False), b._cache(path, progress=False)
    assert np.array_equal(ca.tokens, cb.tokens) and np.array_equal(ca.mask, cb.mask)
    plain = SFTDataModule(path, seq_len=64, batch_size=2, tokenizer=tok_dir, cache_dir=str(tmp_path / "a"),
                          num_workers=0, system_prompt_ratio=0.0, empty_think_drop_ratio=0.0)
    cp = plain._cache(path, progress=False)
    tok = plain.tokenizer
    for i in range(0, cp.n_docs, 50):
        text = tok.decode(cp.doc(i)[0].tolist())
        assert not text.startswith("<|im_start|>system") and EMPTY_THINK in text
    always = SFTDataModule(path, seq_len=64, batch_size=2, tokenizer=tok_dir, cache_dir=str(tmp_path / "a"),
                           num_workers=0, system_prompt_ratio=1.0, empty_think_drop_ratio=1.0)
    cw = always._cache(path, progress=False)
    for i in range(0, cw.n_docs, 50):
        text = tok.decode(cw.doc(i)[0].tolist())
        assert EMPTY_THINK not in text
        assert any(text.startswith(f"<|im_start|>system\n{p}<|im_end|>\n") for p in SYSTEM_PROMPTS)


def test_tools_reasoning_and_multi_turn(tmp_path, tok_dir, write_jsonl):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "查询天气",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    records = [
        {"conversations": [
            {"role": "system", "content": "# Tools", "tools": json.dumps(tools, ensure_ascii=False)},
            {"role": "user", "content": "北京天气怎么样？"},
            {"role": "assistant", "content": "", "tool_calls": json.dumps([{"name": "get_weather", "arguments": {"city": "北京"}}], ensure_ascii=False)},
            {"role": "tool", "content": "{\"temp\": 20}"},
            {"role": "assistant", "content": "北京现在20度。"}]},
        {"conversations": [
            {"role": "user", "content": "1+1等于几？"},
            {"role": "assistant", "content": "等于2。", "reasoning_content": "这是简单的加法。"},
            {"role": "user", "content": "再加1呢？"},
            {"role": "assistant", "content": "等于3。"}]},
    ]
    path = write_jsonl(tmp_path / "sft.jsonl", records)
    dm = SFTDataModule(str(path), seq_len=64, batch_size=2, tokenizer=tok_dir, cache_dir=str(tmp_path),
                       num_workers=0, system_prompt_ratio=1.0, empty_think_drop_ratio=1.0)
    cache = dm._cache(str(path), progress=False)
    tok = dm.tokenizer
    ids, mask = cache.doc(0)
    text = tok.decode(ids.tolist())
    assert text.startswith("<|im_start|>system\n# Tools\n\n# Tools")  # tools: no random system prompt
    labels = _label_texts(tok, ids, mask)
    assert labels == ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>' + END,
                      "北京现在20度。" + END]
    ids, mask = cache.doc(1)
    labels = _label_texts(tok, ids, mask)
    assert labels == ["<think>\n这是简单的加法。\n</think>\n\n等于2。" + END, "等于3。" + END]


def _minimind_labels(ids: list, start: list, end: list) -> list:
    """MiniMind's SFTDataset.generate_labels loop, verbatim in behaviour (reference for the test)."""
    labels = [0] * len(ids)
    i = 0
    while i < len(ids):
        if ids[i:i + len(start)] == start:
            s = i + len(start)
            e = s
            while e < len(ids):
                if ids[e:e + len(end)] == end:
                    break
                e += 1
            for j in range(s, min(e + len(end), len(ids))):
                labels[j] = 1
            i = e + len(end) if e < len(ids) else len(ids)
        else:
            i += 1
    return labels


START, STOP = [1, 7, 8, 3], [2, 3]  # stand-ins for the ids of "<|im_start|>assistant\n" and "<|im_end|>\n"
MASKS_BY_HAND = {
    "a span at the very start": ([1, 7, 8, 3, 5, 2, 3], [0, 0, 0, 0, 1, 1, 1]),
    "a span right after another": ([1, 7, 8, 3, 5, 2, 3, 1, 7, 8, 3, 6, 2, 3],
                                   [0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1]),
    "a start inside a span, then a span": ([9, 1, 7, 8, 3, 1, 7, 8, 3, 5, 2, 3, 9, 1, 7, 8, 3, 6, 2, 3],
                                           [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1]),
    "an unclosed span runs to the end": ([4, 1, 7, 8, 3, 5, 6], [0, 0, 0, 0, 0, 1, 1]),
    "shorter than the start": ([1, 7], [0, 0]),
    "empty": ([], []),
}


@pytest.mark.parametrize("case", MASKS_BY_HAND)
def test_assistant_mask_by_hand(case):
    ids, expected = MASKS_BY_HAND[case]
    assert assistant_mask(ids, START, STOP).tolist() == expected


@pytest.mark.parametrize("ids, pattern, expected", [
    ([5, 5, 5], [5, 5], [0, 1]),  # overlapping occurrences
    ([3, 1, 3], [3], [0, 2]),  # a one-token pattern
    ([2, 3], [2, 3], [0]),  # the whole sequence
    ([1, 7, 8], [1, 7, 8, 3, 9], []),  # longer than the sequence
    ([1, 7, 8], [], []),
])
def test_find_pattern_finds_every_occurrence(ids, pattern, expected):
    assert find_pattern(np.asarray(ids, np.int64), np.asarray(pattern, np.int64)).tolist() == expected


def test_assistant_mask_matches_minimind_loop():
    rng = random.Random(0)
    start, end = [1, 7, 8, 3], [2, 3]
    for _ in range(300):
        ids = [rng.choice([1, 2, 3, 7, 8, 9]) for _ in range(rng.randint(0, 60))]
        assert assistant_mask(ids, start, end).tolist() == _minimind_labels(ids, start, end)


USER = {"role": "user", "content": "1+1?"}
GOOD = {"conversations": [USER, {"role": "assistant", "content": "2"}]}
EMPTY_ANSWERS = {
    "blank": ([USER, {"role": "assistant", "content": " \n"}],
              "message 1 (assistant) has blank content and no tool_calls, but every assistant turn is trained on"),
    "reasoning only": ([USER, {"role": "assistant", "content": "", "reasoning_content": "1+1 makes 2"}],
                       "message 1 (assistant) has blank content after its reasoning"),
    "think block only": ([USER, {"role": "assistant", "content": "<think>1+1 makes 2</think>\n"}],
                         "blank content after its reasoning"),
    "an earlier turn": ([USER, {"role": "assistant", "content": ""}, USER, {"role": "assistant", "content": "2"}],
                        "message 1 (assistant) has blank content"),
    "no tool calls in the list": ([USER, {"role": "assistant", "content": None, "tool_calls": "[]"}],
                                  "blank content and no tool_calls"),
}


@pytest.mark.parametrize("case", EMPTY_ANSWERS)
def test_blank_assistant_answers_are_refused_or_skipped(case, tmp_path, tok_dir, write_jsonl):
    conversation, message = EMPTY_ANSWERS[case]
    path = write_jsonl(tmp_path / "sft.jsonl", [GOOD, {"conversations": conversation}, GOOD])
    args = dict(seq_len=32, batch_size=2, tokenizer=tok_dir, cache_dir=str(tmp_path / "cache"), num_workers=0)
    with pytest.raises(DataFormatError) as err:
        SFTDataModule(str(path), **args).setup("fit")
    text = str(err.value)
    assert f"{path}, line 2: empty answer" in text and message in text and "--data.skip_invalid true" in text
    dm = SFTDataModule(str(path), skip_invalid=True, **args)
    dm.setup("fit")
    assert dm.stats["skipped_lines"] == 1 and dm.stats["train"]["documents"] == 2


def test_tool_calls_are_an_answer_without_content(tmp_path, tok_dir, write_jsonl):
    call = {"name": "add", "arguments": {"a": 1, "b": 1}}
    conversation = [USER, {"role": "assistant", "content": None, "tool_calls": [call]},
                    {"role": "tool", "content": "2"}, {"role": "assistant", "content": "2"}]
    path = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": conversation}])
    dm = SFTDataModule(str(path), seq_len=64, batch_size=2, tokenizer=tok_dir, cache_dir=str(tmp_path / "cache"),
                       num_workers=0, empty_think_drop_ratio=1.0)
    cache = dm._cache(str(path), progress=False)
    ids, mask = cache.doc(0)
    assert _label_texts(dm.tokenizer, ids, mask) == [
        '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 1}}\n</tool_call>' + END, "2" + END]


@pytest.fixture(scope="module")
def tok(tok_dir) -> Tokenizer:
    return Tokenizer.from_file(tok_dir)


def _rendered(encoder: SFTEncoder, conversation: list, line_no: int = 1) -> str:
    (ids, _), = encoder.encode_records([(line_no, {encoder.field: conversation})])[0]
    return encoder.tokenizer.decode(ids.tolist())


ANSWER = {"role": "assistant", "content": "2"}


def test_a_random_system_prompt_only_for_conversations_without_one_or_tools(tok):
    always = SFTEncoder(tok, system_prompt_ratio=1.0, empty_think_drop_ratio=1.0, system_prompts=("Be brief.",))
    for line_no in range(1, 20):
        assert _rendered(always, [USER, ANSWER], line_no).startswith(
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user")
    own = [{"role": "system", "content": "Be kind."}, USER, ANSWER]
    assert _rendered(always, own).startswith("<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user")
    tools = json.dumps([{"type": "function", "function": {"name": "add"}}])
    with_tools = [{**USER, "tools": tools}, ANSWER]  # MiniMind: tools anywhere, no random system prompt
    assert _rendered(always, with_tools).startswith("<|im_start|>user\n1+1?")


def test_the_system_prompts_and_the_seed_choose_the_cache(tok, tmp_path):
    def cache_of(**settings) -> str:
        return cache_path(tmp_path / "sft.jsonl", SFTEncoder(tok, **settings).settings()).name

    assert cache_of(system_prompts=("Be brief.",)) != cache_of() != cache_of(seed=7)
    assert cache_of(system_prompt_ratio=0.0, seed=7) != cache_of(system_prompt_ratio=0.0)  # drop ratio 0.8: random
    assert cache_of(system_prompt_ratio=1.0, empty_think_drop_ratio=0.0, seed=7) == cache_of(
        system_prompt_ratio=1.0, empty_think_drop_ratio=0.0)


def test_without_augmentation_no_system_prompt_and_think_blocks_kept(tok):
    plain = sft_encoder(tok, augment=False)
    for line_no in range(1, 30):
        assert _rendered(plain, [USER, ANSWER], line_no) == (
            "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n" + EMPTY_THINK + "2" + END)


@pytest.mark.parametrize("name", ["system_prompt_ratio", "empty_think_drop_ratio"])
def test_ratios_outside_0_1_are_refused(tok, name):
    for bad in (1.5, -0.1):
        with pytest.raises(UserError) as err:
            SFTEncoder(tok, **{name: bad})
        assert str(err.value) == f"{name} must be in [0, 1], got {bad} (--data.{name})"


def test_a_random_system_prompt_needs_prompts(tok):
    with pytest.raises(ValueError, match="^system_prompts is empty$"):
        SFTEncoder(tok, system_prompt_ratio=0.5, system_prompts=())
    plain = SFTEncoder(tok, system_prompt_ratio=0.0, empty_think_drop_ratio=1.0, system_prompts=())
    assert _rendered(plain, [USER, ANSWER]).startswith("<|im_start|>user")


class _WithoutToken:
    """A tokenizer that lacks one special token (delegates everything else)."""

    def __init__(self, tokenizer: Tokenizer, missing: str) -> None:
        self.tokenizer, self.missing = tokenizer, missing

    def token_to_id(self, token: str):
        return None if token == self.missing else self.tokenizer.token_to_id(token)

    def __getattr__(self, name: str):
        return getattr(self.tokenizer, name)


@pytest.mark.parametrize("missing", ["<|im_start|>", "<|im_end|>"])
def test_sft_needs_a_chatml_tokenizer(tok, missing):
    with pytest.raises(ValueError, match=r"^the tokenizer has no <\|im_start\|>/<\|im_end\|> tokens; "
                                         r"SFT needs a ChatML tokenizer$"):
        SFTEncoder(_WithoutToken(tok, missing))


def test_another_conversation_field(tok):
    encoder = SFTEncoder(tok, system_prompt_ratio=0.0, empty_think_drop_ratio=1.0, field="messages")
    assert _rendered(encoder, [USER, ANSWER]) == "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n2" + END
    assert encoder.encode_records([(1, {"conversations": [USER, ANSWER]})]) == [
        "missing 'messages' field (keys: conversations)"]


def test_an_answer_whose_start_merges_with_the_header_is_refused(tmp_path, tok_dir, write_jsonl):
    """Two leading spaces merge with the newline after ``assistant``: the turn's start cannot be found."""
    path = write_jsonl(tmp_path / "sft.jsonl", [GOOD, {"conversations": [USER, {"role": "assistant", "content": "  2"}]}])
    dm = SFTDataModule(str(path), seq_len=32, batch_size=2, tokenizer=tok_dir, cache_dir=str(tmp_path / "cache"),
                       num_workers=0, empty_think_drop_ratio=1.0)
    with pytest.raises(DataFormatError, match="line 2: no assistant tokens found in the rendered conversation"):
        dm.setup("fit")


def test_the_data_tools_judge_and_map_conversations_as_training_does():
    sft = format_named("sft")
    assert sft.check({"conversations": [USER]}) == "conversation has no assistant turn (nothing to learn)"
    assert sft.check({"conversations": [{"role": "robot", "content": "x"}, ANSWER]}).startswith(
        "invalid conversation: message 0 (role 'robot'): unknown role")
    assert sft.check({"conversations": [USER, {"role": "assistant", "content": ""}]}).startswith("empty answer")
    assert sft.check({"conversations": [ANSWER]}) is None
    record = {"id": 3, "conversations": [USER, ANSWER]}
    assert sft.map_texts(record, str.lower) == {"id": 3, "conversations": [{"role": "user", "content": "1+1?"},
                                                                           {"role": "assistant", "content": "2"}]}
    assert sft.map_texts({"conversations": [{"role": "user", "content": "Hi"}]}, str.upper) == {
        "conversations": [{"role": "user", "content": "HI"}]}
