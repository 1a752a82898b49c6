"""Tools: MiniMind's six mocks answer from its tables (values copied by hand from trainer/train_agent.py), calls are
checked against their schemas, a hanging tool is cut at its limit, output is capped, and the loop runs a scripted
model's calls and hands their results back."""
from __future__ import annotations

import json
import threading
import time

import pytest

from minimind_pl.chat_format import parse_reply
from minimind_pl.errors import UserError
from minimind_pl.tools import (MAX_OUTPUT_CHARS, FunctionTool, Tool, Toolbox, builtin_tools, run_episode,
                               values_found)


def call(name, arguments):
    """A parsed call as chat_format gives it (arguments as JSON text)."""
    return {"type": "function", "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


@pytest.fixture(scope="module")
def toolbox():
    return Toolbox(builtin_tools())


@pytest.mark.parametrize("name, arguments, expected", [
    ("calculate_math", {"expression": "256*37"}, {"result": "9472"}),
    ("calculate_math", {"expression": "2^10 ÷ 4"}, {"result": "256.0"}),  # ^ and ÷ rewritten as MiniMind does
    ("calculate_math", {"expression": "math.sqrt(144) + （1−3）×2"}, {"result": "8.0"}),
    ("unit_converter", {"value": 100, "from_unit": "KM", "to_unit": "miles"}, {"result": 62.1371}),
    ("unit_converter", {"value": 30, "from_unit": "celsius", "to_unit": "fahrenheit"}, {"result": 54.0}),  # its table
    ("unit_converter", {"value": 3, "from_unit": "km", "to_unit": "parsec"}, {"result": 3.0}),  # unknown pair: x 1
    ("get_current_weather", {"location": "北京"},
     {"city": "北京", "temperature": "28°C", "humidity": "65%", "condition": "晴"}),
    ("get_current_weather", {"location": "London"},
     {"city": "London", "temperature": "5°C", "humidity": "65%", "condition": "小雨"}),
    ("get_current_weather", {"location": "Atlantis"},
     {"city": "Atlantis", "temperature": "22°C", "humidity": "65%", "condition": "晴"}),
    ("get_current_time", {}, {"datetime": "2025-03-07 14:30:00", "timezone": "Asia/Shanghai"}),
    ("get_current_time", {"timezone": "Asia/Tokyo"}, {"datetime": "2025-03-07 15:30:00", "timezone": "Asia/Tokyo"}),
    ("get_exchange_rate", {"from_currency": "USD", "to_currency": "CNY"}, {"from": "USD", "to": "CNY", "rate": 7.21}),
    ("get_exchange_rate", {"from_currency": "CNY", "to_currency": "USD"}, {"from": "CNY", "to": "USD", "rate": 1.0}),
    ("translate_text", {"text": "你好世界", "target_language": "english"}, {"translated_text": "Hello World"}),
    ("translate_text", {"text": "bonjour", "target_language": "english"}, {"translated_text": "bonjour"}),
])
def test_each_builtin_tool_answers_from_minimind_s_tables(toolbox, name, arguments, expected):
    result = toolbox.run(call(name, arguments))
    assert result.valid and result.error is None
    assert json.loads(result.output) == expected


def test_the_builtin_schemas_are_minimind_s():
    schemas = {s["function"]["name"]: s for s in Toolbox(builtin_tools()).schemas()}
    assert list(schemas) == ["calculate_math", "unit_converter", "get_current_weather", "get_current_time",
                             "get_exchange_rate", "translate_text"]
    assert schemas["unit_converter"] == {"type": "function", "function": {
        "name": "unit_converter", "description": "单位换算", "parameters": {
            "type": "object", "properties": {"value": {"type": "number"}, "from_unit": {"type": "string"},
                                             "to_unit": {"type": "string"}},
            "required": ["value", "from_unit", "to_unit"]}}}
    with pytest.raises(UserError, match="no built-in tool named web_search"):
        builtin_tools(["web_search"])


@pytest.mark.parametrize("name, arguments, problem", [
    ("calculate_math", {}, "`expression` is required"),
    ("calculate_math", {"expression": ""}, "`expression` is required"),  # MiniMind: bool(a.get("expression"))
    ("unit_converter", {"value": "100", "from_unit": "km", "to_unit": "miles"}, "`value` must be of type number"),
    ("unit_converter", {"value": True, "from_unit": "km", "to_unit": "miles"}, "`value` must be of type number"),
    ("get_exchange_rate", {"from_currency": "USD", "to_currency": None}, "`to_currency` is required"),
    ("get_current_time", {"timezone": 8}, "`timezone` must be of type string"),
    ("web_search", {"q": "x"}, "unknown tool 'web_search'"),
])
def test_bad_calls_are_invalid_and_answered_with_an_error(toolbox, name, arguments, problem):
    result = toolbox.run(call(name, arguments))
    assert not result.valid and problem in result.error
    assert problem in json.loads(result.output)["error"]


def test_arguments_that_are_not_a_json_object_are_invalid(toolbox):
    bad_json = {"type": "function", "function": {"name": "calculate_math", "arguments": "{expression: 1+1}"}}
    assert not toolbox.run(bad_json).valid
    assert "must be a JSON object" in toolbox.run(call("calculate_math", [1, 2])).error


def test_enums_and_a_zero_value_follow_the_schema():
    tool = FunctionTool("paint", "paint", {"type": "object", "properties": {
        "colour": {"type": "string", "enum": ["red", "blue"]}, "coats": {"type": "integer"}},
        "required": ["colour", "coats"]}, lambda colour, coats: f"{coats} {colour}")
    box = Toolbox([tool])
    assert "must be one of ['red', 'blue']" in box.run(call("paint", {"colour": "green", "coats": 1})).error
    assert "must be of type integer" in box.run(call("paint", {"colour": "red", "coats": 1.5})).error
    assert json.loads(box.run(call("paint", {"colour": "red", "coats": 0})).output) == "0 red"  # 0 is a value


def test_a_tool_that_hangs_is_cut_at_its_time_limit_and_one_that_raises_reports_it():
    release = threading.Event()
    slow = FunctionTool("slow", "waits", {"type": "object", "properties": {}}, lambda: release.wait(30), timeout=0.2)
    broken = FunctionTool("broken", "fails", {"type": "object", "properties": {}}, lambda: 1 / 0)
    box = Toolbox([slow, broken])
    start = time.perf_counter()
    result = box.run(call("slow", {}))
    took = time.perf_counter() - start
    release.set()
    assert 0.2 <= took < 1.0 and result.valid and "took longer than 0.2 s" in result.error
    assert "ZeroDivisionError" in json.loads(box.run(call("broken", {})).output)["error"]
    assert "too large" in Toolbox(builtin_tools()).run(call("calculate_math", {"expression": "9**9**9"})).error
    assert Tool("t", "", {"type": "object"}).timeout == 1.0  # MiniMind's limit by default


def test_output_is_capped_at_2048_characters():
    long = FunctionTool("long", "", {"type": "object", "properties": {}}, lambda: "é" * 5000)
    output = Toolbox([long]).run(call("long", {})).output
    assert MAX_OUTPUT_CHARS == 2048 and len(output) == 2048 and output == ('"' + "é" * 5000)[:2048]


def test_two_tools_of_one_name_and_a_schema_that_is_not_an_object_are_refused():
    with pytest.raises(UserError, match="two tools are named 'calculate_math'"):
        Toolbox(builtin_tools() + builtin_tools(["calculate_math"]))
    with pytest.raises(UserError, match="type object"):
        Tool("x", "", {"type": "string"})


def scripted(replies):
    """A model that writes ``replies`` in turn, and the prompts it was given."""
    seen = []

    def reply(messages):
        seen.append([dict(m) for m in messages])
        text = replies[len(seen) - 1]
        return parse_reply(text), {"role": "assistant", "content": text}

    return reply, seen


def test_the_loop_hands_each_result_to_the_next_turn_and_stops_at_an_answer(toolbox):
    reply, seen = scripted(['<tool_call>\n{"name": "calculate_math", "arguments": {"expression": "256*37"}}\n'
                            '</tool_call><tool_call>{"name": "nope", "arguments": {}}</tool_call><tool_call>{bad'
                            '</tool_call>', "256 × 37 = 9472."])
    shown = []
    episode = run_episode(reply, [{"role": "user", "content": "256*37?"}], toolbox, on_result=shown.append)
    assert [m["role"] for m in seen[1]] == ["user", "assistant", "tool", "tool"]
    assert json.loads(seen[1][2]["content"]) == {"result": "9472"}
    assert "unknown tool 'nope'" in json.loads(seen[1][3]["content"])["error"]
    assert (episode.calls, episode.valid_calls, episode.invalid_calls) == (3, 1, 1)
    assert not episode.unfinished and episode.answer == "256 × 37 = 9472." and len(shown) == 2


def test_a_model_still_calling_on_its_last_turn_is_unfinished(toolbox):
    calling = '<tool_call>{"name": "get_current_time", "arguments": {}}</tool_call>'
    reply, seen = scripted([calling] * 3)
    episode = run_episode(reply, [{"role": "user", "content": "time?"}], toolbox, max_turns=3)
    assert len(seen) == 3 and episode.unfinished and episode.answer == "" and episode.valid_calls == 3


def test_values_found_by_substring_or_number_as_minimind_scores_answers():
    text = "The result is 9,472 and it is 晴 in Beijing, rate 7.2"
    found = values_found(text, ["9472", "晴", "beijing", 7.21, "7.20", "473", "47"])
    assert found == ["9472", "晴", "beijing", "7.20", "47"]  # 47: a substring of "9,472", as in MiniMind
    assert values_found("", ["x"]) == []
