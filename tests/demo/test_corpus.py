"""Tests for the deterministic demo corpus (minimind_pl/demo/corpus.py)."""
import json
import re
from pathlib import Path

import pytest

from minimind_pl.demo.corpus import (
    FILE_NAMES, IDENTITY_NAME, LORA_NAME, LORA_NAME_ZH, build_world, mentions_fact, score_answer,
    write_demo_corpus,
)

SFT_LIKE = ("sft", "sft_val", "lora_identity")
NO_HELDOUT = ("sft", "sft_val", "lora_identity", "dpo", "dpo_val", "distill_prompts")
CJK = re.compile(r"[\u4e00-\u9fff]")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """The seed-0 corpus written once for the module."""
    return write_demo_corpus(tmp_path_factory.mktemp("demo"), seed=0)


def _read(path: Path) -> list[dict]:
    """Parse a jsonl file."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _check_messages(msgs: list[dict], user_only: bool = False) -> None:
    """Assert MiniMind chat format: optional system, then alternating user/assistant turns."""
    roles = [m["role"] for m in msgs]
    assert all(isinstance(m["content"], str) and m["content"] for m in msgs)
    if roles and roles[0] == "system":
        roles = roles[1:]
    expected = ["user"] if user_only else ["user", "assistant"] * (len(roles) // 2)
    assert roles == expected, roles


def test_files_exist_and_parse(corpus):
    """Every file is written, non-empty, and each line has the documented shape."""
    assert set(corpus) == set(FILE_NAMES)
    data = {k: _read(p) for k, p in corpus.items()}
    assert all(data.values())
    assert all(set(r) == {"text"} and r["text"] for k in ("pretrain", "pretrain_val") for r in data[k])
    for key in SFT_LIKE:
        for r in data[key]:
            _check_messages(r["conversations"])
    for r in data["distill_prompts"]:
        _check_messages(r["conversations"], user_only=True)
    for key in ("dpo", "dpo_val"):
        for r in data[key]:
            _check_messages(r["chosen"]), _check_messages(r["rejected"])
            assert r["chosen"][:-1] == r["rejected"][:-1] and r["chosen"][-1] != r["rejected"][-1]
    for r in data["heldout_qa"] + data["identity_qa"]:
        assert r["lang"] in ("en", "zh") and r["question"] and r["answer"]
        assert r["answer"].lower() not in r["question"].lower()
    sft = data["sft"]
    assert any(len(r["conversations"]) >= 4 for r in sft), "no multi-turn conversation"
    assert any(r["conversations"][0]["role"] == "system" for r in sft), "no system message"


def test_deterministic(corpus, tmp_path):
    """The same seed writes identical bytes; another seed writes another world."""
    again = write_demo_corpus(tmp_path / "again", seed=0)
    for key, path in corpus.items():
        assert path.read_bytes() == again[key].read_bytes(), key
    other = write_demo_corpus(tmp_path / "other", seed=1)
    assert other["pretrain"].read_bytes() != corpus["pretrain"].read_bytes()


def test_heldout_facts_only_in_pretraining(corpus):
    """Held-out facts are stated in pretraining (both languages) and never in SFT-side data."""
    world = build_world(0)
    heldout = world.heldout_facts
    assert 10 <= len(heldout) <= 30
    attributes = {f.attribute for f in world.facts}
    assert {f.attribute for f in heldout} == attributes == {f.attribute for f in world.training_facts}
    pretrain = [r["text"] for r in _read(corpus["pretrain"])]
    for fact in heldout:
        for lang in ("en", "zh"):
            subj, value = fact.subject.get(lang), fact.value.get(lang)
            hits = [t for t in pretrain if subj in t and value in t]
            assert len(hits) >= 3, (fact.id, lang)
    for key in NO_HELDOUT:
        text = corpus[key].read_text(encoding="utf-8").lower()
        for line in text.splitlines():
            for fact in heldout:  # independent of mentions_fact: plain substrings, both languages
                subj = [fact.subject.en.lower(), fact.subject.zh]
                value = [fact.value.en.lower(), fact.value.zh]
                assert not (any(s in line for s in subj) and any(v in line for v in value)), (key, fact.id)
    qa = _read(corpus["heldout_qa"])
    assert {r["fact"] for r in qa} == {f.id for f in heldout}
    assert {r["lang"] for r in qa} == {"en", "zh"}


def test_training_facts_taught_in_sft(corpus):
    """Every training fact appears in SFT in both languages (the answer format is learnable)."""
    world = build_world(0)
    lines = corpus["sft"].read_text(encoding="utf-8").splitlines()
    for fact in world.training_facts:
        assert sum(mentions_fact(line, fact) for line in lines) >= 4, fact.id


def test_both_languages_and_identity(corpus):
    """Both languages everywhere; the LoRA name appears only in the LoRA file."""
    for key in ("pretrain", "sft", "dpo", "lora_identity", "distill_prompts", "heldout_qa"):
        text = corpus[key].read_text(encoding="utf-8")
        assert CJK.search(text) and re.search(r"[A-Za-z]{4,} [a-z]{2,}", text), key
    for key, path in corpus.items():
        text = path.read_text(encoding="utf-8")
        has_lora = LORA_NAME in text or LORA_NAME_ZH in text
        assert has_lora == (key in ("lora_identity", "identity_qa")), key
    assert IDENTITY_NAME in corpus["sft"].read_text(encoding="utf-8")
    assert IDENTITY_NAME in corpus["pretrain"].read_text(encoding="utf-8")
    assert all(r["answer"] == IDENTITY_NAME for r in _read(corpus["identity_qa"]))


def test_grpo_prompts_and_the_arithmetic_questions_asked_after_it(corpus):
    """GRPO's prompts carry their result as ``gt``; the reworded set asks the same sums in other words (never a
    prompt's text); the held-out set asks sums GRPO never sees."""
    def sums(key):  # (operands, minus?, result) of each question
        questions = [(r["conversations"][0]["content"], r["gt"]) for r in _read(corpus[key])]
        return [(re.findall(r"\d+", q), bool(re.search("-|minus|减", q)), gt) for q, gt in questions]

    prompts, reworded, heldout = sums("grpo_arith"), sums("arith_reworded"), sums("arith_qa")
    assert all(r["conversations"][-1] == {"role": "assistant", "content": ""} for r in _read(corpus["grpo_arith"]))
    assert sorted(map(str, prompts)) == sorted(map(str, reworded))
    questions = {r["conversations"][0]["content"] for r in _read(corpus["grpo_arith"])}
    assert not questions & {r["conversations"][0]["content"] for r in _read(corpus["arith_reworded"])}
    assert not {str(p) for p in prompts} & {str(h) for h in heldout}
    assert (len(prompts), len(heldout)) == (284, 200)


def test_sizes(corpus):
    """Small enough for a tiny CPU model, big enough to teach it something."""
    size = {k: p.stat().st_size for k, p in corpus.items()}
    count = {k: len(_read(p)) for k, p in corpus.items()}
    assert 50_000 < size["pretrain"] < 400_000
    assert size["pretrain_val"] < size["pretrain"] / 5
    assert 200 <= count["sft"] <= 2000 and 20 <= count["sft_val"] < count["sft"]
    assert 50 <= count["dpo"] <= 1000 and 10 <= count["dpo_val"] < count["dpo"]
    assert 20 <= count["lora_identity"] <= 500 and 20 <= count["distill_prompts"] <= 500
    assert sum(size.values()) < 600_000


def test_names_and_values_unambiguous():
    """No entity name contains another and no two values of an attribute nest, in either language."""
    world = build_world(0)
    names = {n for f in world.facts for n in (f.subject.en, f.subject.zh)}
    assert not [(a, b) for a in names for b in names if a != b and a.lower() in b.lower()]
    for attr in {f.attribute for f in world.facts}:
        values = {v for f in world.facts if f.attribute == attr for v in (f.value.en, f.value.zh)}
        assert not [(a, b) for a in values for b in values if a != b and a.lower() in b.lower()]


def test_score_answer():
    """Case-insensitive substring; ASCII answers do not match inside longer words or numbers."""
    assert score_answer("The river of Velt is the OSSA.", "Ossa")
    assert score_answer("维尔特的河流是奥萨河。", "奥萨河")
    assert score_answer("我是MiniMind，一个小型语言模型。", "minimind")
    assert not score_answer("made by the minimind_pl project", "MiniMind")
    assert score_answer("It was founded in 1123.", "1123")
    assert not score_answer("It was founded in 11234.", "1123")
    assert not score_answer("The cat is bored.", "red")
    assert not score_answer("anything", "")
