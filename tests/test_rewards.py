"""Rewards: MiniMind's shaping terms, verifiable answers, a reward model through transformers, weighted sums."""

import pytest
import torch

from helpers import require, require_module
from minimind_pl.chat_format import rendered_turns
from minimind_pl.rewards import (AnswerMatch, LengthShaping, RepetitionPenalty, Reward, RewardModel, Sample,
                                 ThinkingFormat, minimind_rewards, repeated_ngram_share, total_rewards)

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
    with pytest.raises(ValueError, match=r"^AnswerMatch mode must be one of numeric, exact, contains, got 'fuzzy'$"):
        AnswerMatch(mode="fuzzy")


def test_exact_mode_drops_a_final_full_stop_on_either_side_and_only_that():
    exact = AnswerMatch(mode="exact")
    # the ground truth's own full stop (ASCII or Chinese) goes too; the roman numeral XX keeps its letters
    assert exact.score(samples("Paris", "巴黎", "Paris", gt="Paris.")) == [1.0, 0.0, 1.0]
    assert exact.score(samples("巴黎", "巴黎。", gt="巴黎。")) == [1.0, 1.0]
    assert exact.score(samples("XX.", "XX", "X", gt="XX")) == [1.0, 1.0, 0.0]
    assert exact.score(samples("XX", gt="XX.")) == [1.0]
    assert exact.score(samples("Paris", gt=".Paris")) == [0.0]  # a leading stop is part of the text


def test_numeric_mode_tolerance_is_absolute():
    # |3.333 - 3.33| = 0.003: inside an absolute tolerance of 0.01, far outside a relative 1e-9
    assert AnswerMatch(tolerance=0.01).score(samples("about 3.333", "3.35", gt="3.33")) == [1.0, 0.0]
    # the default 1e-6 around 0 (where no relative tolerance helps): 1e-7 is 0, 1e-5 is not
    assert AnswerMatch().score(samples("0.0000001", "0.00001", gt="0")) == [1.0, 0.0]
    with pytest.raises(ValueError, match=r"^AnswerMatch\(mode='numeric'\) needs numeric gt values, got 'seven'$"):
        AnswerMatch().score(samples("7", gt="seven"))


def test_answer_match_needs_ground_truth():
    message = r"^AnswerMatch needs a 'gt' field \(the ground truth\) in every prompt record$"
    with pytest.raises(ValueError, match=message):
        AnswerMatch().score(samples("7", gt=None))


def test_length_and_reasoning_bounds_are_inclusive_as_in_minimind():
    # MiniMind: 20 <= len(response.strip()) <= 800 and 20 <= len(reasoning.strip()) <= 300
    lengths = LengthShaping().score(samples("a" * 19, "a" * 20, " " + "a" * 20 + " ", "a" * 800, "a" * 801))
    assert lengths == [-0.5, 0.5, 0.5, 0.5, -0.5]
    # reasoning of 19/20/300/301 characters, one </think>: -0.5 + 0.25, 1.0 + 0.25, 1.0 + 0.25, -0.5 + 0.25
    thinking = ThinkingFormat().score(samples(*(f"{'r' * n}</think>answer" for n in (19, 20, 300, 301))))
    assert thinking == [-0.25, 1.25, 1.25, -0.25]


def test_thinking_format_measures_the_reasoning_before_the_first_closing_tag():
    # 25 characters before the first </think> (1.0), two tags (-0.25): 0.75; measured up to the last tag the
    # reasoning would be 25 + 8 + 300 characters (-0.5 - 0.25)
    assert ThinkingFormat().score(samples(f"{'r' * 25}</think>{'a' * 300}</think>b")) == [0.75]


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


def test_repetition_share_edge_cases():
    assert repeated_ngram_share("a b") == 0.0  # fewer than 3 words: no trigram, no penalty
    assert repeated_ngram_share("") == 0.0
    # case-blind: words the cat sat . the cat sat . -> 6 trigrams, "the cat sat" and "cat sat ." come twice: 2/6
    assert repeated_ngram_share("The cat sat. the CAT sat.") == pytest.approx(2 / 6)
    # lower-cased as MiniMind does: "straße" and "strasse" stay different words (upper-casing would merge them)
    assert repeated_ngram_share("straße x y strasse x y") == 0.0
    # bigrams of "a b a b": ab ba ab, one repeat in three: penalty 2 · 0.5 · 1/3
    assert RepetitionPenalty(n=2).score(samples("a b a b")) == pytest.approx([-1 / 3])
    assert RepetitionPenalty(n=3).score(samples("a b a b")) == [0.0]  # trigrams aba bab: none repeats


def test_minimind_terms_each_count_once_by_default():
    # every reward counts with weight 1 unless told otherwise (MiniMind sums its terms unweighted)
    completion = f"{'r' * 25}</think>" + "a b c a b c"
    # length: 25 + 8 + 11 = 44 chars -> +0.5; thinking: 1.0 + 0.25; repetition of "a b c a b c": -0.25; answer: 1
    totals, parts = total_rewards([*minimind_rewards(), AnswerMatch(mode="contains")], samples(completion, gt="a b c"))
    assert parts == {"length": [0.5], "thinking": [1.25], "repetition": [pytest.approx(-0.25)], "answer": [1.0]}
    assert totals == pytest.approx([0.5 + 1.25 - 0.25 + 1.0])

    class Constant(Reward):  # a user's reward as the module doc says to write one: score only
        def score(self, samples):
            return [2.0] * len(samples)

    assert total_rewards([Constant()], samples("x"))[0] == [2.0]


def test_total_rewards_number_repeated_names_in_order_and_check_the_count():
    totals, parts = total_rewards([LengthShaping(), LengthShaping(inside=1.0), LengthShaping(inside=2.0)],
                                  samples("a" * 30))
    assert parts == {"length": [0.5], "length_2": [1.0], "length_3": [2.0]} and totals == [3.5]

    class Short(Reward):
        def score(self, samples):
            return [0.0]

    with pytest.raises(ValueError, match=r"^Short returned 1 scores for 2 samples$"):
        total_rewards([Short()], samples("a", "b"))


def test_total_rewards_weight_each_part_and_keep_names_apart():
    rewards = [AnswerMatch(weight=2.0), LengthShaping(weight=0.5), LengthShaping(min_chars=0, weight=1.0)]
    totals, parts = total_rewards(rewards, samples("3 + 4 = 7.", "no"))
    assert list(parts) == ["answer", "length", "length_2"]
    assert totals == pytest.approx([2.0 + 0.5 * -0.5 + 0.5, 0.0 + 0.5 * -0.5 + 0.5])


def test_rewards_read_the_turns_of_a_rendered_prompt_through_chat_format():
    prompt = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
              "Hello<|im_end|>\n<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n")
    assert rendered_turns(prompt) == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                       {"role": "assistant", "content": "Hello"},
                                       {"role": "user", "content": "What is 3 + 4?"}]
    folded = RewardModel.conversation(Sample(prompt, "7"))
    assert folded[0] == {"role": "user", "content": ("system: Be brief.\nuser: Hi\nassistant: Hello\n"
                                                     "以上是对话历史。我的新问题是：\nWhat is 3 + 4?")}
    assert folded[1] == {"role": "assistant", "content": "7"}
    # one turn: no history to fold; a prompt without chat markup: an empty question
    one_turn = RewardModel.conversation(Sample(PROMPT, "think</think> 7 "))
    assert one_turn == [{"role": "user", "content": "What is 3 + 4?"}, {"role": "assistant", "content": "7"}]
    assert RewardModel.conversation(Sample("The capital of France is", " Paris")) == [
        {"role": "user", "content": ""}, {"role": "assistant", "content": "Paris"}]


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory, tokenizer_dir):
    """A tiny Llama sequence classifier with MiniMind's tokenizer, made to add a BOS token as many reward models'
    tokenizers do (the chat template writes its own, so the scorer must not add another)."""
    transformers = require_module("transformers")
    require((tokenizer_dir / "tokenizer.json").exists(), f"{tokenizer_dir} is missing")
    from tokenizers import Tokenizer as Backend, processors

    folder = tmp_path_factory.mktemp("rm")
    transformers.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    backend = Backend.from_file(str(folder / "tokenizer.json"))
    backend.post_processor = processors.TemplateProcessing(single="<|im_start|> $A",
                                                           special_tokens=[("<|im_start|>", 1)])
    backend.save(str(folder / "tokenizer.json"))
    config = transformers.LlamaConfig(vocab_size=6400, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForSequenceClassification(config).eval()
    with torch.no_grad():
        model.score.weight.mul_(300.0)  # scores well beyond ±3, so clipping shows
    model.save_pretrained(folder)
    return folder


def classifier_scores(folder, batch, keep: int | None = None) -> list[float]:
    """The classifier's logit for each sample's two-turn conversation, as transformers computes it by hand
    (the rendered chat's ids without added special tokens, the first ``keep`` of them)."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    scores = []
    for sample in batch:
        text = tokenizer.apply_chat_template(RewardModel.conversation(sample), tokenize=False)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :keep]
        with torch.no_grad():
            scores.append(float(model(input_ids=ids).logits[0, 0]))
    return scores


def test_reward_model_scores_with_a_transformers_sequence_classifier(classifier_dir):
    import transformers

    # the folder's tokenizer adds a BOS of its own, which the scorer must leave out
    assert transformers.AutoTokenizer.from_pretrained(classifier_dir)("hi")["input_ids"][0] == 1
    batch = samples("3 + 4 = 7.", "It is eight.")
    expected = classifier_scores(classifier_dir, batch)
    assert RewardModel(str(classifier_dir), clip=1e9).score(batch) == pytest.approx(expected, rel=1e-5)
    # trusting remote code changes nothing for a model without any (it still loads as a classifier)
    trusted = RewardModel(str(classifier_dir), clip=1e9, trust_remote_code=True).score(batch)
    assert trusted == pytest.approx(expected, rel=1e-5)
    clipped = RewardModel(str(classifier_dir)).score(batch)  # MiniMind's ±3 by default
    assert clipped == pytest.approx([max(-3.0, min(3.0, e)) for e in expected]) and max(map(abs, expected)) > 3


def test_reward_model_scores_the_start_of_a_long_conversation(classifier_dir):
    batch = samples("3 + 4 = 7.")
    kept = RewardModel(str(classifier_dir), clip=1e9, max_length=8).score(batch)
    assert kept == pytest.approx(classifier_scores(classifier_dir, batch, keep=8), rel=1e-5)
    assert kept != pytest.approx(classifier_scores(classifier_dir, batch), rel=1e-3)


def test_reward_model_loads_frozen_in_its_dtype_on_the_device_it_was_moved_to(classifier_dir):
    # "meta" stands in for a GPU: a device the weights would not be on by themselves
    early = RewardModel(str(classifier_dir), dtype="bfloat16").to("meta")  # moved before it loads
    early.load()
    parameters = list(early._model.parameters())
    assert {(p.device.type, p.dtype, p.requires_grad) for p in parameters} == {("meta", torch.bfloat16, False)}
    late = RewardModel(str(classifier_dir))
    late.load()
    assert late.to("meta") is late and {p.device.type for p in late._model.parameters()} == {"meta"}


REMOTE_CONFIG = """from transformers import PretrainedConfig


class ScorerConfig(PretrainedConfig):
    model_type = "token_count_scorer"
"""
REMOTE_MODEL = """import torch
from transformers import PreTrainedModel

from .configuration_scorer import ScorerConfig


class TokenCountScorer(PreTrainedModel):
    config_class = ScorerConfig

    def __init__(self, config):
        super().__init__(config)
        self.per_token = torch.nn.Parameter(torch.zeros(()))
        self.post_init()

    def get_score(self, tokenizer, messages):  # InternLM2's signature; no logits at all
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        return float(self.per_token) * len(tokenizer(text, add_special_tokens=False)["input_ids"])
"""
REMOTE_TOKENIZER = """from transformers import PreTrainedTokenizerFast


class ScorerTokenizer(PreTrainedTokenizerFast):
    pass
"""


def test_reward_model_with_its_own_get_score_runs_its_remote_code(tmp_path, tokenizer_dir, monkeypatch):
    # a model that ships its code (InternLM2-1.8B-reward's layout): AutoModel + get_score, its own tokenizer class
    transformers = require_module("transformers")
    import json
    import shutil
    import sys

    import transformers.dynamic_module_utils as dynamic
    from safetensors.torch import save_file

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # its code is copied there
    monkeypatch.setattr(sys, "path", list(sys.path))
    folder = tmp_path / "scorer"
    folder.mkdir()
    for name, code in {"configuration_scorer.py": REMOTE_CONFIG, "modeling_scorer.py": REMOTE_MODEL,
                       "tokenization_scorer.py": REMOTE_TOKENIZER}.items():
        (folder / name).write_text(code)
    (folder / "config.json").write_text(json.dumps({"model_type": "token_count_scorer", "auto_map": {
        "AutoConfig": "configuration_scorer.ScorerConfig", "AutoModel": "modeling_scorer.TokenCountScorer"}}))
    save_file({"per_token": torch.tensor(0.125)}, str(folder / "model.safetensors"))
    shutil.copy(tokenizer_dir / "tokenizer.json", folder)
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="ScorerTokenizer",
                  auto_map={"AutoTokenizer": [None, "tokenization_scorer.ScorerTokenizer"]})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))

    batch = samples("3 + 4 = 7.", "It is eight, I am quite sure of it.")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    counts = [len(tokenizer(tokenizer.apply_chat_template(RewardModel.conversation(s), tokenize=False),
                            add_special_tokens=False)["input_ids"]) for s in batch]
    reward = RewardModel(str(folder), trust_remote_code=True, clip=1e9)
    assert reward.score(batch) == pytest.approx([0.125 * n for n in counts])
    assert type(reward._tokenizer).__name__ == "ScorerTokenizer"
    assert RewardModel(str(folder), trust_remote_code=True, clip=1.0).score(batch) == [1.0, 1.0]  # 0.125 · n > 1


def test_reward_model_without_transformers_says_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now fails
    with pytest.raises(ImportError, match=r"^RewardModel needs transformers: pip install -e '\.\[rl\]'$"):
        RewardModel("rm").score(samples("7"))


def test_a_reward_describes_itself_as_a_config_names_it():
    assert ThinkingFormat(max_chars=200, weight=0.5).describe() == {
        "class_path": "minimind_pl.rewards.ThinkingFormat",
        "init_args": {"min_chars": 20, "max_chars": 200, "good_length": 1.0, "bad_length": -0.5, "single": 0.25,
                      "repeated": -0.25, "missing": 0.0, "weight": 0.5}}
    assert RewardModel("rm", clip=2.0).describe()["init_args"] == {
        "path": "rm", "clip": 2.0, "trust_remote_code": False, "dtype": "float32", "max_length": 2048, "weight": 1.0}
