"""The data-format registry: one detection rule for every tool, real lines recognised, and the tools' encoder is
the one training uses."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import minimind_pl.data
from minimind_pl.commands.data.stats import make_encoder
from minimind_pl.commands.evaluate import eval_format
from minimind_pl.data.formats import FORMAT_NAMES, FORMATS, detect_format, format_named, resolve_format
from minimind_pl.errors import UserError

USER, ANSWER = {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}
BLANK = {"role": "assistant", "content": ""}


@pytest.mark.parametrize("record, expected", [
    ({"text": "t", "conversations": [USER, ANSWER]}, "pretrain"),  # text wins over conversations, everywhere
    ({"chosen": [USER, ANSWER], "text": "t"}, "dpo"),
    ({"rejected": [USER, ANSWER]}, "dpo"),
    ({"prompt": "p", "conversations": [USER, ANSWER]}, "rl"),
    ({"conversations": [USER, BLANK]}, "rl"),  # MiniMind's rlaif.jsonl: the last answer left empty
    ({"conversations": [USER, ANSWER]}, "sft"),
    ({"conversations": [{"role": "user", "content": "<image>q"}, ANSWER]}, "sft"),  # a tag alone is text
    ({"conversations": [{"role": "user", "content": "<image>q"}, ANSWER], "images": ["a.png"]}, "vlm"),
    ({"conversations": [USER, BLANK], "images": []}, "vlm"),  # images make it vlm before rl claims it
    ({"conversations": []}, "sft"),  # sft's check then says why it is invalid
    ({"question": "q", "answer": "A"}, None),
    (["text"], None),
])
def test_detection_follows_the_registry_order(record, expected):
    found = detect_format(record)
    assert (found.name if found else None) == expected


def test_eval_reads_a_line_as_the_data_tools_do():
    both = [(1, {"text": "t", "conversations": [USER, ANSWER]})]
    assert eval_format(both, "x.jsonl") == detect_format(both[0][1]).name == "pretrain"
    assert eval_format([(1, {"conversations": [USER, ANSWER]})], "x.jsonl") == "sft"
    assert eval_format([(1, {"question": "q", "A": "1", "B": "2", "answer": "A"})], "x.jsonl") == "choice"
    with pytest.raises(UserError, match="x.jsonl:3: cannot tell the format: a dpo record"):
        eval_format([(3, {"chosen": [USER, ANSWER], "rejected": [USER, ANSWER]})], "x.jsonl")


def first_record(path: Path) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.loads(handle.readline())


@pytest.mark.parametrize("file, expected", [("pretrain_real.jsonl", "pretrain"), ("sft_real.jsonl", "sft"),
                                            ("dpo_real.jsonl", "dpo")])
def test_real_lines_are_detected_valid_and_read(shared_dir, file, expected):
    path = shared_dir / "corpus" / file
    assert resolve_format(path, "auto").name == expected
    record = first_record(path)
    data_format = detect_format(record)
    assert data_format.name == expected and data_format.check(record) is None
    assert data_format.model_text(record).strip()
    assert data_format.map_texts(record, str.upper) == data_format.map_texts(data_format.map_texts(record, str.upper),
                                                                             str.upper)


def test_a_real_conversation_with_its_answer_left_empty_is_an_rl_prompt(shared_dir):
    """The shared corpus has no RL file: MiniMind's rlaif lines are SFT lines whose last answer is empty."""
    record = first_record(shared_dir / "corpus" / "sft_real.jsonl")
    last = next(i for i in range(len(record["conversations"]) - 1, -1, -1)
                if record["conversations"][i]["role"] == "assistant")
    prompt = {"conversations": record["conversations"][:last] + [{"role": "assistant", "content": ""}]}
    rl = detect_format(prompt)
    assert rl.name == "rl" and rl.check(prompt) is None
    assert format_named("sft").check(prompt).startswith("empty answer")


def test_every_format_names_its_data_module_and_has_a_unique_name():
    assert len(set(FORMAT_NAMES)) == len(FORMATS)
    for data_format in FORMATS:
        module = getattr(minimind_pl.data, data_format.data_module)
        assert issubclass(module, minimind_pl.data.JsonlDataModule)
    with pytest.raises(UserError, match="--format must be auto or one of dpo, pretrain, vlm, rl, sft, got 'chat'"):
        format_named("chat")


@pytest.mark.parametrize("data_format", FORMATS, ids=FORMAT_NAMES)
def test_stats_counts_tokens_with_the_encoder_training_uses(data_format, tokenizer_dir, tmp_path):
    """``data stats --tokenizer`` encodes as the format's DataModule does by default (only the length limit, which
    the stats do not apply, may differ)."""
    module = getattr(minimind_pl.data, data_format.data_module)
    (tmp_path / "d.jsonl").write_text("{}\n", encoding="utf-8")
    extra = {}
    if data_format.count_images is not None:  # an image format also needs its vision tower's preprocessing
        (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 8, "width": 8},
                                                                       "image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
        extra["vision_encoder"] = str(tmp_path)
    training = module(train_path=str(tmp_path / "d.jsonl"), seq_len=64, batch_size=2,
                      tokenizer=str(tokenizer_dir), **extra).make_encoder()
    tools = make_encoder(str(tokenizer_dir), data_format)
    assert type(tools) is type(training)
    assert {**tools.settings(), "max_tokens": None} == {**training.settings(), "max_tokens": None}
