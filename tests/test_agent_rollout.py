"""Multi-turn tool episodes on the KV-cache decoder, with a model that answers from the history in its cache: the
loss mask covers exactly the model's tokens across turns (episodes built by hand), the tool's real result is in the
next reply's context, which equals a fresh prompt of the conversation so far, rows of one batch finish at different
turns, and unfinished episodes, invalid JSON and unknown tools end as MiniMind's rollout ends them."""
from __future__ import annotations

import pytest

from minimind_pl.agent_rollout import agent_rollouts
from minimind_pl.generation import GREEDY
from minimind_pl.tokenizer import Tokenizer
from minimind_pl.tools import Toolbox, builtin_tools
from scripted_model import TOOL_RESPONSE, HistoryModel

HEADER = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
CALL = '<tool_call>\n{"name": "calculate_math", "arguments": {"expression": "256*37"}}\n</tool_call>'
RESULT_TURN = ('<|im_end|>\n<|im_start|>user\n<tool_response>\n{"result": "9472"}\n</tool_response><|im_end|>\n'
               + HEADER)  # what the chat template writes between the call and the next reply, by hand


@pytest.fixture(scope="module")
def tokenizer(shared_dir):
    return Tokenizer.from_file(shared_dir / "minimind")


def question(text):
    return [{"role": "system", "content": "Use tools."}, {"role": "user", "content": text}]


def model_for(tokenizer, replies):
    """A model whose reply to question Q after k tool responses is ``replies[Q][k]``."""
    def script(history):
        text = tokenizer.decode(history)
        asked = next(q for q in replies if q in text)
        return tokenizer.encode(replies[asked][min(history.count(TOOL_RESPONSE), len(replies[asked]) - 1)])

    return HistoryModel(script, tokenizer.encode(HEADER), eos=tokenizer.eos_id)


def rollouts(tokenizer, model, questions, max_turns=3):
    box = Toolbox(builtin_tools())
    return agent_rollouts(model, tokenizer, [question(q) for q in questions], [box] * len(questions),
                          max_turns=max_turns, max_new_tokens=64, sampling=GREEDY)


def test_the_mask_covers_exactly_the_model_s_tokens_and_the_result_reaches_the_next_reply(tokenizer):
    model = model_for(tokenizer, {"256*37?": [CALL, "It is 9472."]})
    (episode,) = rollouts(tokenizer, model, ["256*37?"])
    call, fed, answer = tokenizer.encode(CALL), tokenizer.encode(RESULT_TURN), tokenizer.encode("It is 9472.")
    assert episode.ids == call + fed + answer + [tokenizer.eos_id]
    assert episode.mask == [1] * len(call) + [0] * len(fed) + [1] * (len(answer) + 1)
    assert episode.replies == [CALL, "It is 9472."] and not episode.unfinished
    conversation = question("256*37?") + [{"role": "assistant", "content": CALL},
                                          {"role": "tool", "content": '{"result": "9472"}'}]
    fresh = tokenizer.encode_chat(conversation, tools=Toolbox(builtin_tools()).schemas())
    assert model.contexts[1] == fresh  # the second reply saw what a fresh prompt shows, the real result in it
    assert model.contexts[0] == episode.prompt_ids


def test_rows_of_one_batch_finish_at_different_turns(tokenizer):
    """A reply stops at its first closed call, so each call is its own turn; rows leave the batch as they finish."""
    power = CALL.replace("256*37", "2**10")
    model = model_for(tokenizer, {"plain": ["Hello."], "once": [CALL, "9472."], "twice": [CALL, power, "Done."]})
    episodes = rollouts(tokenizer, model, ["plain", "once", "twice"])
    assert [e.replies for e in episodes] == [["Hello."], [CALL, "9472."], [CALL, power, "Done."]]
    assert [r.output for r in episodes[2].results] == ['{"result": "9472"}', '{"result": "1024"}']
    for episode in episodes:  # the model's tokens are its replies' and the eos that ends the last one, no more
        model_tokens = [t for t, m in zip(episode.ids, episode.mask) if m]
        assert model_tokens == [t for r in episode.replies for t in tokenizer.encode(r)] + [tokenizer.eos_id]


def test_an_episode_still_calling_on_its_last_turn_is_unfinished(tokenizer):
    model = model_for(tokenizer, {"loop": [CALL]})
    (episode,) = rollouts(tokenizer, model, ["loop"], max_turns=2)
    call, fed = tokenizer.encode(CALL), tokenizer.encode(RESULT_TURN)
    assert episode.unfinished and len(episode.results) == 1  # the last reply's call is not run
    assert episode.ids == call + fed + call and episode.mask == [1] * len(call) + [0] * len(fed) + [1] * len(call)


def test_invalid_json_ends_the_episode_and_an_unknown_tool_gets_an_error_result(tokenizer):
    unknown = CALL.replace("calculate_math", "web_search")
    model = model_for(tokenizer, {"bad": ["<tool_call>{not json</tool_call>"], "unknown": [unknown, "Sorry."]})
    bad, lost = rollouts(tokenizer, model, ["bad", "unknown"])
    assert bad.invalid_calls == 1 and bad.results == [] and len(bad.replies) == 1 and not bad.unfinished
    assert not lost.results[0].valid and "unknown tool 'web_search'" in lost.results[0].output
    assert "unknown tool 'web_search'" in tokenizer.decode(model.contexts[-1]) and lost.replies[-1] == "Sorry."


def test_a_reply_the_template_lays_out_differently_still_gets_the_template_s_text_after_it(tokenizer):
    """The template drops a reply's leading newlines, so the rendering no longer starts with the decoded tokens:
    the text fed is still the end of turn, the tool turn and the next header."""
    model = model_for(tokenizer, {"spaced": ["\n" + CALL, "ok"]})
    (episode,) = rollouts(tokenizer, model, ["spaced"])
    call, fed = tokenizer.encode("\n" + CALL), tokenizer.encode(RESULT_TURN)
    assert episode.ids[:len(call) + len(fed)] == call + fed and episode.replies[-1] == "ok"


def test_an_episode_stops_at_its_token_limit(tokenizer):
    model = model_for(tokenizer, {"long": [CALL, "It is 9472."]})
    (full,) = rollouts(tokenizer, model, ["long"])
    total = len(full.prompt_ids) + len(full.ids)
    box = Toolbox(builtin_tools())
    (cut,) = agent_rollouts(model, tokenizer, [question("long")], [box], max_new_tokens=64, sampling=GREEDY,
                            max_total_tokens=total - 2)  # the answer is cut two tokens short
    assert cut.ids == full.ids[:-2] and not cut.unfinished
    before_result = len(full.prompt_ids) + len(tokenizer.encode(CALL)) + 5  # no room for the result turn
    (stopped,) = agent_rollouts(model, tokenizer, [question("long")], [box], max_new_tokens=64, sampling=GREEDY,
                                max_total_tokens=before_result)
    assert stopped.unfinished and stopped.ids == tokenizer.encode(CALL) and len(stopped.results) == 1
