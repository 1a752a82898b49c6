"""PromptDataModule: MiniMind's rlaif lines and plain prompts, ground truths, thinking, truncation, bad lines."""
import json
import re

import numpy as np
import pytest
import torch

from minimind_pl.data import DataFormatError, PromptDataModule
from minimind_pl.data.formats import format_named
from minimind_pl.data.packing import DocumentStream
from minimind_pl.data.prompts import PromptDataset, prompt_lists
from minimind_pl.errors import UserError


def _msg(role, content):
    return {"role": role, "content": content}


RECORDS = [
    {"conversations": [_msg("user", "3加4等于几？"), _msg("assistant", "")], "gt": "7"},  # MiniMind's rlaif line
    {"prompt": "What is 10 - 2?", "gt": 8},
    {"conversations": [_msg("system", "Be brief."), _msg("user", "Hi"), _msg("assistant", "Hello!"),
                       _msg("user", "Name a river in 中国.")]},  # ends with a user turn, no gt
]


def _module(tmp_path, tokenizer_dir, records, cache_dir=None, **kwargs):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records),
                    encoding="utf-8")
    dm = PromptDataModule(str(path), tokenizer=tokenizer_dir, batch_size=3, num_workers=0,
                          cache_dir=str(cache_dir or tmp_path / "cache"), **kwargs)
    dm.setup("fit")
    return dm


def _batch(dm):
    return next(iter(dm.ordered_dataloader("train")))


def test_prompts_render_as_the_model_is_asked_with_their_ground_truths(tmp_path, tokenizer_dir):
    dm = _module(tmp_path, tokenizer_dir, RECORDS)
    batch = _batch(dm)
    texts = [dm.tokenizer.decode(p) for p in prompt_lists(batch)]
    tok = dm.tokenizer
    assert texts[0] == tok.apply_chat_template([_msg("user", "3加4等于几？")], add_generation_prompt=True)
    assert texts[1] == tok.apply_chat_template([_msg("user", "What is 10 - 2?")], add_generation_prompt=True)
    assert texts[2] == tok.apply_chat_template(RECORDS[2]["conversations"], add_generation_prompt=True)
    assert all(t.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") for t in texts)  # thinking off
    assert batch["gt"] == ["7", "8", None]
    lengths = batch["prompt_lengths"].tolist()
    ids = batch["prompt_ids"]
    assert ids.shape == (3, max(lengths))  # left padding: each prompt ends at the last column
    for row, n in enumerate(lengths):
        assert (ids[row, : ids.shape[1] - n] == tok.pad_id).all()
    assert batch["index"].tolist() == [0, 1, 2]


def test_thinking_ratio_opens_a_think_block_and_long_prompts_keep_their_end(tmp_path, tokenizer_dir):
    dm = _module(tmp_path, tokenizer_dir, RECORDS, thinking_ratio=1.0)
    assert all(dm.tokenizer.decode(p).endswith("<think>\n") for p in prompt_lists(_batch(dm)))
    full = prompt_lists(_batch(_module(tmp_path / "a", tokenizer_dir, RECORDS)))
    cut = prompt_lists(_batch(_module(tmp_path / "b", tokenizer_dir, RECORDS, seq_len=8)))
    assert [len(p) for p in cut] == [8, 8, 8] and all(c == f[-8:] for c, f in zip(cut, full))


def test_the_thinking_draw_is_seeded_per_line(tmp_path, tokenizer_dir):
    records = [{"prompt": f"Question {i}?"} for i in range(40)]
    opened = [[dm.tokenizer.decode(p).endswith("<think>\n") for p in prompt_lists(b)]
              for dm in [_module(tmp_path / str(k), tokenizer_dir, records, thinking_ratio=0.5) for k in range(2)]
              for b in [next(iter(torch.utils.data.DataLoader(dm.train_dataset, batch_size=40,
                                                               collate_fn=dm.collate_fn)))]]
    assert opened[0] == opened[1] and 5 < sum(opened[0]) < 35


NOT_A_PROMPT = "expected a JSON object with a 'prompt' string or a non-empty 'conversations' list of messages"
ANSWERED = "the prompt ends with an answered assistant turn: leave the last assistant turn empty"
NO_USER_TURN = "empty prompt (no user turn with text)"
CALL = {"name": "add", "arguments": {"a": 1}}


@pytest.mark.parametrize("record, message", [
    ({"conversations": [_msg("user", "Q?"), _msg("assistant", "Already answered.")]}, ANSWERED),
    ({"conversations": [_msg("user", "Q?"), {"role": "assistant", "content": "", "tool_calls": [CALL]}]}, ANSWERED),
    ({"conversations": [_msg("system", "x"), _msg("assistant", "")]}, NO_USER_TURN),
    ({"conversations": [_msg("user", " "), _msg("assistant", "")]}, NO_USER_TURN),
    ({"conversations": [_msg("user", None), _msg("assistant", "")]}, NO_USER_TURN),
    ({"conversations": [_msg("user", "Q?"), _msg("robot", "x"), _msg("assistant", "")]},
     "invalid conversation: message 1 (role 'robot'): unknown role"),
    ({"prompt": "  "}, "'prompt' must be a non-empty string"),
    ({"prompt": "Q?", "gt": [1, 2]}, "'gt' must be a string or a number, got list"),
    ({"conversations": [_msg("user", "Q?"), _msg("assistant", "")], "gt": {"a": 1}},
     "'gt' must be a string or a number, got dict"),
    ({"text": "a pretraining line"}, NOT_A_PROMPT),
    (["a", "list"], NOT_A_PROMPT),
    ({"conversations": []}, NOT_A_PROMPT),
    ({"conversations": ["Q?", _msg("assistant", "")]}, NOT_A_PROMPT),
    ("{not json", "not valid JSON"),
])
def test_bad_prompts_name_file_and_line(tmp_path, tokenizer_dir, record, message):
    with pytest.raises(DataFormatError, match=rf"prompts\.jsonl, line 3: {re.escape(message)}"):
        _module(tmp_path, tokenizer_dir, [RECORDS[0], RECORDS[1], record])
    dm = _module(tmp_path, tokenizer_dir, [RECORDS[0], RECORDS[1], record], skip_invalid=True)
    assert len(dm.train_dataset) == 2 and dm.stats["skipped_lines"] == 1


def test_a_share_of_prompts_gets_a_system_prompt_as_minimind_adds_them(tmp_path, tokenizer_dir):
    records = [{"prompt": f"Question {i}?"} for i in range(40)] + [RECORDS[2]]  # the last has its own system turn
    dm = _module(tmp_path, tokenizer_dir, records, system_prompt_ratio=0.5)
    loader = torch.utils.data.DataLoader(dm.train_dataset, batch_size=41, collate_fn=dm.collate_fn)
    texts = [dm.tokenizer.decode(p) for p in prompt_lists(next(iter(loader)))]
    with_system = [t.startswith("<|im_start|>system\n") for t in texts[:40]]
    assert 5 < sum(with_system) < 35
    assert texts[40].count("<|im_start|>system") == 1 and "Be brief." in texts[40]


def test_a_system_turn_before_the_question_and_an_empty_answer(tmp_path, tokenizer_dir):
    turns = [_msg("system", "Be brief."), _msg("user", "Hi"), _msg("assistant", "")]
    dm = _module(tmp_path, tokenizer_dir, [{"conversations": turns}])
    (prompt,) = prompt_lists(_batch(dm))
    assert dm.tokenizer.decode(prompt) == dm.tokenizer.apply_chat_template(turns[:2], add_generation_prompt=True)


def test_the_seed_keys_the_cache_only_when_a_draw_is_random(tmp_path, tokenizer_dir):
    cache = tmp_path / "cache"
    for seed in (1, 2):
        _module(tmp_path, tokenizer_dir, RECORDS, cache_dir=cache, seed=seed, thinking_ratio=1.0)
    assert len(list(cache.glob("*.cache"))) == 1  # no random draw: the seed changes nothing
    for seed in (1, 2):
        _module(tmp_path, tokenizer_dir, RECORDS, cache_dir=cache, seed=seed, system_prompt_ratio=0.5)
    assert len(list(cache.glob("*.cache"))) == 3


@pytest.mark.parametrize("name", ["thinking_ratio", "system_prompt_ratio"])
def test_ratios_outside_0_1_are_refused(tmp_path, tokenizer_dir, name):
    with pytest.raises(UserError, match=rf"^--data\.{name} must be in \[0, 1\], got 1\.5$"):
        _module(tmp_path, tokenizer_dir, RECORDS, **{name: 1.5})


def test_prompts_are_never_packed(tmp_path, tokenizer_dir):
    (tmp_path / "p.jsonl").write_text(json.dumps(RECORDS[1]) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match="^PromptDataModule takes no packing: prompts are never packed; remove it$"):
        PromptDataModule(str(tmp_path / "p.jsonl"), tokenizer=tokenizer_dir, packing=False)
    with pytest.raises(UserError, match="^PromptDataModule takes no packing or cross_document_attention: "):
        PromptDataModule(str(tmp_path / "p.jsonl"), tokenizer=tokenizer_dir, packing=True, cross_document_attention=True)
    dm = PromptDataModule(str(tmp_path / "p.jsonl"), tokenizer=tokenizer_dir)
    assert (dm.seq_len, dm.batch_size) == (768, 2)  # MiniMind's GRPO settings
    assert dm.hparams["packing"] is False and dm.hparams["cross_document_attention"] is False


def test_the_prompt_dataset_by_index(tmp_path, tokenizer_dir):
    dm = _module(tmp_path, tokenizer_dir, RECORDS)
    assert dm.stats["train"]["prompts"] == 3
    with pytest.raises(IndexError, match="^3$"):
        dm.train_dataset[3]
    with pytest.raises(IndexError, match="^-1$"):
        dm.train_dataset[-1]
    cache = next(iter(dm.caches.values()))
    with pytest.raises(ValueError, match=r"^a prompt stream must hold whole records \(an even number of documents\)$"):
        PromptDataset(DocumentStream([cache], [np.arange(3)]), dm.tokenizer)


def test_the_data_tools_read_and_map_prompts():
    rl = format_named("rl")
    line = {"prompt": "Hi", "gt": "7"}
    conversation = {"conversations": [_msg("system", "Sys"), _msg("user", "Hi"), _msg("assistant", "")], "gt": 7}
    assert rl.texts(line) == ["Hi"] and rl.texts(conversation) == ["Sys", "Hi", ""]
    assert rl.map_texts(line, str.upper) == {"prompt": "HI", "gt": "7"}
    assert rl.map_texts(conversation, str.upper) == {
        "conversations": [_msg("system", "SYS"), _msg("user", "HI"), _msg("assistant", "")], "gt": 7}

def test_a_changed_ratio_builds_the_prompts_again_in_the_same_cache(tmp_path, tokenizer_dir):
    """The token cache is keyed by every setting that changes the rendered prompts: a run with another
    ``system_prompt_ratio`` or ``thinking_ratio`` must not read the prompts an earlier run cached."""
    records = [{"prompt": f"Question {i}?"} for i in range(6)]

    def rendered(**ratios):
        dm = _module(tmp_path, tokenizer_dir, records, **ratios)  # the same cache folder every time
        loader = torch.utils.data.DataLoader(dm.train_dataset, batch_size=6, collate_fn=dm.collate_fn)
        return [dm.tokenizer.decode(p) for p in prompt_lists(next(iter(loader)))]

    assert not any(t.startswith("<|im_start|>system\n") or t.endswith("<think>\n") for t in rendered())
    assert all(t.startswith("<|im_start|>system\n") for t in rendered(system_prompt_ratio=1.0))
    assert all(t.endswith("<think>\n") for t in rendered(system_prompt_ratio=1.0, thinking_ratio=1.0))
    assert not any(t.startswith("<|im_start|>system\n") for t in rendered(thinking_ratio=1.0))
