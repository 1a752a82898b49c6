"""MiniMind's agent reward (trainer/train_agent.py) as typed parts, each checked against values worked out by hand."""

import pytest

from minimind_pl.rewards import (GroundTruthRecall, LengthShaping, RepetitionPenalty, Reward, Sample, ToolCallCount,
                                 ToolEpisode, ToolTagBalance, UnfinishedPenalty, WithoutToolCalls, agent_rewards,
                                 gt_found, total_rewards)
from minimind_pl.tools import Toolbox, builtin_tools

PROMPT = "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
CALL = '<tool_call>\n{"name": "calculate_math", "arguments": {"expression": "2+3"}}\n</tool_call>'


def sample(replies=(CALL, "It is 5."), validity=(True,), unfinished=False, gt=("5",)) -> Sample:
    episode = ToolEpisode(tuple(replies), tuple(validity), unfinished, tuple(gt))
    return Sample(PROMPT, replies[-1], None, episode)


def test_episode_record_checks_every_call_of_every_reply_against_the_tools():
    unknown = '<tool_call>\n{"name": "no_such_tool", "arguments": {}}\n</tool_call>'
    bad_arguments = '<tool_call>\n{"name": "calculate_math", "arguments": {"expr": "1"}}\n</tool_call>'
    not_json = "<tool_call>\nnot json\n</tool_call>"
    in_reasoning = "I could write " + unknown + " but</think>"  # the reply starts inside an opened <think>
    episode = ToolEpisode.from_replies([CALL + "\n" + unknown, in_reasoning + bad_arguments + "\n" + not_json,
                                        "<think>add</think>The result is 5."], Toolbox(builtin_tools()), [5])
    assert episode.call_validity == (True, False, False, False)
    assert episode.gt == ("5",)
    assert episode.final_text == "The result is 5."


def test_call_count_rewards_exactly_len_gt_valid_calls_and_charges_each_missing_extra_or_invalid_one():
    got = ToolCallCount().score([
        sample(validity=(True, True), gt=("5", "6")),  # right count: +0.5
        sample(validity=(True, True, False), gt=("5",)),  # one extra, one invalid: gap 2 -> -1.0
        sample(validity=(False,), gt=("5", "6")),  # two missing, one invalid: gap 3 -> -1.5
        sample(validity=(True,), gt=()),  # one extra: -0.5
        sample(replies=("It is 5.",), validity=()),  # no calls: MiniMind's other branch, no term
    ])
    assert got == [0.5, -1.0, -1.5, -0.5, 0.0]


def test_gt_values_are_found_as_substrings_or_as_standalone_numbers():
    text = "Sum 1234.0, price v2.5, city PARIS, rate 0.75"
    # "1,234": not a substring, but 1234.0 is the same number; "2.50": 2.5 is glued to a word; "Paris": case
    # ignored; "9": in no word and no number; "0.750": the number 0.75
    assert gt_found(text, ["1,234", "2.50", "Paris", "9", "0.750"]) == {"1,234", "Paris", "0.750"}
    assert gt_found("15 apples", ["5"]) == {"5"}  # MiniMind's substring rule: "5" is in "15"
    assert gt_found("anything", [" "]) == set()  # a blank value is never found


def test_gt_recall_scores_the_share_of_values_in_the_final_answer():
    got = GroundTruthRecall().score([
        sample(replies=(CALL, "Sum 1234.0, price v2.5, city PARIS"), gt=("1,234", "2.50", "Paris")),  # 2/3 * 2.5
        sample(replies=(CALL, "I add: " + CALL + " so 5"), gt=("5", "2+3")),  # only text after the last call: 1/2
        sample(replies=(CALL, "4"), gt=("4", "4")),  # distinct values found over all listed: 1/2
        sample(replies=(CALL, CALL), unfinished=True, gt=("2+3",)),  # unfinished: no final answer
        sample(replies=("It is 5.",), validity=(), gt=("5",)),  # no calls: no term
        sample(gt=()),  # no gt: no term
    ])
    assert got == pytest.approx([2.5 * 2 / 3, 1.25, 1.25, 0.0, 0.0, 0.0])


def test_unfinished_episodes_pay_half_a_point():
    got = UnfinishedPenalty().score([sample(replies=(CALL, CALL), validity=(True, True), unfinished=True),
                                     sample()])
    assert got == [-0.5, 0.0]


def test_unbalanced_call_tags_cost_half_a_point_each_outside_the_reasoning():
    replies = ("<think>maybe <tool_call></think>" + CALL + "<tool_call>",  # reasoning's tag ignored: |2 - 1| = 1
               "ok </tool_call></tool_call>")  # |0 - 2| = 2
    got = ToolTagBalance().score([sample(replies=replies), sample(replies=("<tool_call> 5",), validity=())])
    assert got == [-1.5, -0.5]  # tags count with or without calls


def test_repetition_reads_the_final_answer_or_the_last_reply_when_unfinished():
    # words a b c a b c: trigrams abc bca cab abc, one of four repeated -> -min(0.5, 2 * 0.5 * 1/4)
    finished = sample(replies=(CALL + " a b c a b c", "x y z"))
    unfinished = sample(replies=("x y z", "a b c a b c"), unfinished=True)  # its whole last reply (call included)
    assert RepetitionPenalty().score([finished, unfinished]) == [0.0, -0.25]


def test_agent_total_is_clipped_to_three_but_its_parts_are_not():
    low = sample(replies=("<tool_call><tool_call>",), validity=(True, False, False, False), unfinished=True,
                 gt=("5", "6"))
    high = sample()
    totals, parts = total_rewards(agent_rewards() + [GroundTruthRecall(scale=1.0)], [low, high], clip=3.0)
    # low: gap |1 - 2| + 3 = 4 -> -2.0; unfinished -0.5; two open tags -1.0; "< tool_call > < tool_call >" repeats
    # one trigram of four -> -0.25; sum -3.75. high: one valid call for one value +0.5, found 2.5 (+1.0 more): 4.0
    assert parts == {"tool_tags": [-1.0, 0.0], "length": [0.0, 0.0], "thinking": [0.0, 0.0],
                     "tool_calls": [-2.0, 0.5], "gt_recall": [0.0, 2.5], "unfinished": [-0.5, 0.0],
                     "repetition": [-0.25, 0.0], "gt_recall_2": [0.0, 1.0]}
    assert totals == [-3.0, 3.0]
    assert total_rewards(agent_rewards(), [low])[0] == [-3.75]  # no clip unless asked


def test_agent_terms_need_an_episode():
    with pytest.raises(ValueError, match="tool episodes"):
        ToolCallCount().score([Sample(PROMPT, "5")])


class Recorded(Reward):
    name = "recorded"

    def __init__(self) -> None:
        super().__init__(weight=2.0)
        self.seen: list[str] = []

    def score(self, samples):
        self.seen += [s.completion for s in samples]
        return [1.0] * len(samples)


def test_answers_without_calls_get_minimind_grpo_terms_and_no_call_terms():
    plain = sample(replies=("x" * 30 + "</think>It is 5.",), validity=())
    # length of the whole reply 30 + 8 + 8 = 46 in 5..800: +0.5; reasoning 30 chars in 20..300: +1.0; one
    # </think>: +0.25; "It is 5." repeats no trigram; no call terms, no gt term although the answer holds 5
    totals, parts = total_rewards(agent_rewards(), [plain], clip=3.0)
    assert totals == [1.75]
    assert parts["length"] == [0.5] and parts["thinking"] == [1.25] and parts["gt_recall"] == [0.0]


def test_a_reward_restricted_to_answers_without_calls_never_sees_the_others():
    inner = Recorded()
    restricted = WithoutToolCalls(inner)
    assert (restricted.name, restricted.weight) == ("recorded", 2.0)
    got = restricted.score([sample(), sample(replies=("first",), validity=()), Sample(PROMPT, "second")])
    assert got == [0.0, 1.0, 1.0] and inner.seen == ["first", "second"]
    assert restricted.score([sample()]) == [0.0] and inner.seen == ["first", "second"]
    assert WithoutToolCalls(LengthShaping(min_chars=5)).describe() == {
        "class_path": "minimind_pl.rewards.WithoutToolCalls",
        "init_args": {"reward": {"class_path": "minimind_pl.rewards.LengthShaping",
                                 "init_args": {"min_chars": 5, "max_chars": 800, "inside": 0.5, "outside": -0.5,
                                               "weight": 1.0}}}}
