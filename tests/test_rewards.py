"""Rewards: MiniMind's shaping terms, verifiable answers, a reward model through transformers, weighted sums."""

import pytest
import torch

from helpers import require, require_module
from minimind_pl.rewards import (AnswerMatch, LengthShaping, RepetitionPenalty, RewardModel, Sample, ThinkingFormat,
                                 prompt_messages, repeated_ngram_share, total_rewards)

PROMPT = "<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n"


def samples(*completions: str, gt: str | None = "7") -> list[Sample]:
    return [Sample(PROMPT, c, gt) for c in completions]


def test_numeric_answers_are_judged_by_their_last_number_after_the_reasoning():
    reward = AnswerMatch(mode="numeric", correct=1.0, wrong=-1.0)
    got = reward.score(samples("3 + 4 = 7.", "3加4等于7。", "7", "3 + 4 = 8.", "seven", "I think 7</think>It is 8.",
                               "x</think>3 + 4 = 7.0"))
    assert got == [1.0, 1.0, 1.0, -1.0, -1.0, -1.0, 1.0]


def test_exact_and_contains_modes():
    assert AnswerMatch(mode="exact").score(samples("Paris.", "paris", " Paris ", gt="Paris")) == [1.0, 0.0, 1.0]
    assert AnswerMatch(mode="contains").score(samples("It is Paris.", "Lyon", gt="Paris")) == [1.0, 0.0]
    with pytest.raises(ValueError, match="mode"):
        AnswerMatch(mode="fuzzy")


def test_answer_match_needs_ground_truth():
    with pytest.raises(ValueError, match="'gt' field"):
        AnswerMatch().score(samples("7", gt=None))


def test_minimind_length_and_thinking_terms():
    short, good = "ok", "a" * 30
    assert LengthShaping().score(samples(short, good, "b" * 801)) == [-0.5, 0.5, -0.5]
    thinking = ThinkingFormat()
    reasoning = "r" * 25
    assert thinking.score(samples(good, f"{reasoning}</think>answer", "r</think>answer",
                                  f"{reasoning}</think>a</think>b")) == [0.0, 1.25, -0.25, 0.75]


def test_repetition_penalty_counts_repeated_word_trigrams_of_the_answer():
    assert repeated_ngram_share("a b c a b c") == pytest.approx(0.25)  # abc bca cab abc: one repeat in four
    assert RepetitionPenalty().score(samples("a b c a b c", "one two three four", "x " * 40)) == \
        pytest.approx([-0.25, 0.0, -0.5])


def test_total_rewards_weight_each_part_and_keep_names_apart():
    rewards = [AnswerMatch(weight=2.0), LengthShaping(weight=0.5), LengthShaping(min_chars=0, weight=1.0)]
    totals, parts = total_rewards(rewards, samples("3 + 4 = 7.", "no"))
    assert list(parts) == ["answer", "length", "length_2"]
    assert totals == pytest.approx([2.0 + 0.5 * -0.5 + 0.5, 0.0 + 0.5 * -0.5 + 0.5])


def test_prompt_messages_read_the_turns_of_a_rendered_prompt():
    prompt = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
              "Hello<|im_end|>\n<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n")
    assert prompt_messages(prompt) == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                       {"role": "assistant", "content": "Hello"},
                                       {"role": "user", "content": "What is 3 + 4?"}]
    folded = RewardModel.conversation(Sample(prompt, "7"))
    assert folded[0]["content"] == ("system: Be brief.\nuser: Hi\nassistant: Hello\n以上是对话历史。我的新问题是：\n"
                                    "What is 3 + 4?")
    assert folded[1] == {"role": "assistant", "content": "7"}


def test_reward_model_scores_with_a_transformers_sequence_classifier(tmp_path, tokenizer_dir):
    transformers = require_module("transformers")
    require((tokenizer_dir / "tokenizer.json").exists(), f"{tokenizer_dir} is missing")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    config = transformers.LlamaConfig(vocab_size=6400, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForSequenceClassification(config).eval()
    with torch.no_grad():
        model.score.weight.mul_(300.0)  # scores well beyond ±3, so clipping shows
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    batch = samples("3 + 4 = 7.", "It is eight.")
    reward = RewardModel(str(tmp_path / "rm"), clip=1e9)
    expected = []
    for sample in batch:
        text = tokenizer.apply_chat_template(RewardModel.conversation(sample), tokenize=False)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        expected.append(float(model(input_ids=ids).logits[0, 0]))
    assert reward.score(batch) == pytest.approx(expected, rel=1e-5)
    clipped = RewardModel(str(tmp_path / "rm"), clip=3.0).score(batch)
    assert clipped == pytest.approx([max(-3.0, min(3.0, e)) for e in expected]) and max(map(abs, expected)) > 3


def test_a_reward_describes_itself_as_a_config_names_it():
    assert ThinkingFormat(max_chars=200, weight=0.5).describe() == {
        "class_path": "minimind_pl.rewards.ThinkingFormat",
        "init_args": {"min_chars": 20, "max_chars": 200, "good_length": 1.0, "bad_length": -0.5, "single": 0.25,
                      "repeated": -0.25, "missing": 0.0, "weight": 0.5}}
    assert RewardModel("rm", clip=2.0).describe()["init_args"] == {
        "path": "rm", "clip": 2.0, "trust_remote_code": False, "dtype": "float32", "max_length": 2048, "weight": 1.0}
