"""The chat format: the template machinery against transformers, message checks, named template sets, the
readers of a rendered prompt (what the RL rewards see), the reasoning split of a reply, and the parsers of streamed
model output (what ``serve`` and ``generate`` show).

MiniMind's own template is checked against transformers' rendering in tests/test_tokenizer.py.
"""

from __future__ import annotations

import json
import re
from datetime import datetime

import pytest

from helpers import require_module
from minimind_pl.chat_format import (CHAT_TEMPLATE, TURN_END, TURN_START, OutputParser, StopMatcher, assistant_answer,
                                     compile_chat_template, empty_answer, parse_tool_call, prepare_messages,
                                     render_chat, rendered_turns, select_template, split_reasoning)
from minimind_pl.tokenizer import Tokenizer

# written by hand as MiniMind's template renders them
TWO_TURNS = ("<|im_start|>system\nBe brief.<|im_end|>\n"
             "<|im_start|>user\nHi<|im_end|>\n"
             "<|im_start|>assistant\n<think>\n\n</think>\n\nHello!<|im_end|>\n"
             "<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n"
             "<|im_start|>assistant\n<think>\n")
TOOL_RESULT = ('<|im_start|>user\nWeather in Paris?<|im_end|>\n'
               '<|im_start|>assistant\n<think>\n\n</think>\n\n<tool_call>\n{"name": "weather", "arguments": '
               '{"city": "Paris"}}\n</tool_call><|im_end|>\n'
               '<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response><|im_end|>\n'
               '<|im_start|>assistant\n<think>\n\n</think>\n\n')


def test_rendered_turns_reads_each_closed_turn_and_leaves_the_open_one_out():
    assert rendered_turns(TWO_TURNS) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>\n\n</think>\n\nHello!"},  # as rendered: the think block stays
        {"role": "user", "content": "What is 3 + 4?"},
    ]


def test_rendered_turns_sees_tool_results_as_the_user_turns_the_template_writes():
    turns = rendered_turns(TOOL_RESULT)
    assert [t["role"] for t in turns] == ["user", "assistant", "user"]
    assert turns[1]["content"].endswith('{"city": "Paris"}}\n</tool_call>')
    assert turns[2]["content"] == '<tool_response>\n{"temp": 21}\n</tool_response>'


def test_rendered_turns_of_text_without_markup_is_empty():
    assert rendered_turns("The capital of France is") == []
    assert rendered_turns("<|im_start|>user\nunfinished") == []
    assert rendered_turns("<|im_start|>narrator\nnot a role<|im_end|>\n") == []


def test_rendered_turns_reads_back_what_render_chat_writes():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!", "reasoning_content": "greet back"},
                {"role": "user", "content": "多少？"}]
    prompt = render_chat(CHAT_TEMPLATE, messages, add_generation_prompt=True, open_thinking=True)
    turns = rendered_turns(prompt)
    assert [t["role"] for t in turns] == ["system", "user", "assistant", "user"]
    assert turns[2]["content"] == "<think>\ngreet back\n</think>\n\nHello!"
    assert turns[-1]["content"] == "多少？"


def test_turn_markers_are_the_tokenizers_bos_and_eos(tokenizer_dir):
    tokenizer = Tokenizer.from_file(tokenizer_dir)
    assert (tokenizer.token_to_id(TURN_START), tokenizer.token_to_id(TURN_END)) == (tokenizer.bos_id, tokenizer.eos_id)


def test_split_reasoning_takes_the_answer_after_the_first_closing_tag():
    reply = "<think>\nadd them\n</think>\n\n7</think> extra"
    assert split_reasoning(reply) == ("7</think> extra", "add them")
    # a rendered assistant turn is split at the last tag instead, as the template does
    assert assistant_answer({"role": "assistant", "content": reply}) == " extra"


def test_split_reasoning_without_a_closing_tag():
    assert split_reasoning("  7  ") == ("7", None)
    assert split_reasoning("still thinking", opened=True) == ("", "still thinking")  # cut off inside <think>
    assert split_reasoning("reasoned</think>7", opened=True) == ("7", "reasoned")


# ---------------------------------------------------------------------------- the template machinery
@pytest.fixture(scope="module")
def hf(tokenizer_dir):
    """MiniMind's tokenizer through transformers: the reference renderer."""
    return require_module("transformers").AutoTokenizer.from_pretrained(str(tokenizer_dir))


# the features of transformers' template environment that MiniMind's own template does not use
FEATURES = ("{% for m in messages %}{% generation %}[{{ m.content }}]{% endgeneration %}"
            "{{ m.thinking }}|{{ m.reasoning_content }};{% if loop.index == 2 %}{% break %}{% endif %}{% endfor %}"
            "{{ documents is none }}{{ add_generation_prompt }}{{ tools | tojson }}{{ tools | tojson(sort_keys=True) }}"
            "{{ tools | tojson(separators=(',', ':')) }}{{ tools | tojson(ensure_ascii=True) }}"
            "{{ tools | tojson(indent=1) }}")


def test_template_features_render_as_transformers_renders_them(hf):
    compile_chat_template.cache_clear()  # compiled here, under this test (a mutation run forks after a warm cache)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a", "reasoning": "r"},
                {"role": "user", "content": "after the break"}]
    tools = [{"b": "é<&>", "a": 1}]
    expected = hf.apply_chat_template(messages, chat_template=FEATURES, tools=tools, tokenize=False)
    assert render_chat(FEATURES, messages, tools=tools) == expected
    # written out: the generation block renders its body, "reasoning" is aliased to thinking and reasoning_content
    assert expected.startswith('[hi]|;[a]r|r;TrueFalse'
                               '[{"b": "é<&>", "a": 1}][{"a": 1, "b": "é<&>"}][{"b":"é<&>","a":1}]')


def test_strftime_now_is_the_local_time():
    before = datetime.now().strftime("%Y-%m-%d %H")
    rendered = render_chat("{{ strftime_now('%Y-%m-%d %H') }}", [{"role": "user", "content": "x"}])
    assert rendered in (before, datetime.now().strftime("%Y-%m-%d %H"))


def test_render_chat_defaults_to_no_generation_prompt_and_a_closed_think_block():
    user = [{"role": "user", "content": "hi"}]
    assert render_chat(CHAT_TEMPLATE, user) == "<|im_start|>user\nhi<|im_end|>\n"
    assert render_chat(CHAT_TEMPLATE, user, add_generation_prompt=True) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert render_chat(CHAT_TEMPLATE, user, add_generation_prompt=True, open_thinking=True).endswith(
        "<|im_start|>assistant\n<think>\n")


NAMED = [{"name": "default", "template": "plain"}, {"name": "tool_use", "template": "tools: {{ tools | length }}"},
         "not a template entry"]


def test_a_named_template_set_uses_tool_use_only_when_tools_are_given():
    user = [{"role": "user", "content": "hi"}]
    assert render_chat(NAMED, user) == "plain"
    assert render_chat(NAMED, user, tools=[{"name": "calc"}, {"name": "web"}]) == "tools: 2"
    system_tools = [{"role": "system", "content": "s", "tools": '[{"name": "calc"}]'}, *user]  # MiniMind's data
    assert render_chat(NAMED, system_tools) == "tools: 1"
    assert render_chat(NAMED[:1], user, tools=[{"name": "calc"}]) == "plain"  # no tool_use template: the default
    assert select_template("{{ x }}", tools=[{"name": "calc"}]) == "{{ x }}"


@pytest.mark.parametrize("template", ["", None, [], [{"name": "tool_use", "template": "t"}], [{"name": "default"}]])
def test_a_missing_template_is_named_by_where_it_was_looked_for(template):
    with pytest.raises(ValueError, match=r"^tokenizer_config\.json has no usable `chat_template`$"):
        select_template(template)
    with pytest.raises(ValueError, match=r"^model/config\.json has no usable `chat_template`$"):
        select_template(template, where="model/config.json")


def test_a_template_error_names_its_kind():
    with pytest.raises(ValueError, match=r"^chat template failed to render: TypeError: "):
        render_chat("{{ messages[0].content + 1 }}", [{"role": "user", "content": "x"}])


# ---------------------------------------------------------------------------- message checks
@pytest.mark.parametrize("messages, tools, message", [
    ("hi", None, "messages must be a list of dicts, got str"),
    ({"role": "user", "content": "hi"}, None, "messages must be a list of dicts, got dict"),
    ([], None, "cannot apply a chat template to an empty conversation"),
    (["hi"], None, "message 0 must be a dict, got str"),
    ([{"role": "robot", "content": "x"}], None,
     "message 0 (role 'robot'): unknown role, expected one of system, user, assistant, tool"),
    ([{"role": "user", "content": "q"}, {"role": "assistant"}], None,
     "message 1 (role 'assistant'): missing `content`"),
    ([{"role": "user", "content": 3}], None, "message 0 (role 'user'): `content` must be a string, got int"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": "[{oops"}], None,
     "message 1 (role 'assistant'): `tool_calls` is not valid JSON: "),
    ([{"role": "system", "content": "s", "tools": "[{oops"}], None,
     "message 0 (role 'system'): `tools` is not valid JSON: "),
    ([{"role": "user", "content": "q"}], "[{oops", "tools argument: `tools` is not valid JSON: "),
    ([{"role": "user", "content": "q"}], '{"name": "calc"}', "tools must be a list of JSON schemas, got dict"),
])
def test_bad_conversations_are_refused_with_the_message_and_field_named(messages, tools, message):
    with pytest.raises(ValueError) as error:
        prepare_messages(messages, tools)
    assert str(error.value).startswith(message)


def test_prepare_messages_parses_minimind_json_fields_and_drops_none_keys():
    calls = [{"name": "calc", "arguments": {"expr": "1"}}]
    chat, tools = prepare_messages([
        {"role": "system", "content": "s", "tools": '[{"name": "calc"}]'}, {"role": "user", "content": "q"},
        {"role": "assistant", "content": None, "tool_calls": json.dumps(calls), "reasoning_content": None}])
    assert tools == [{"name": "calc"}]
    assert chat[2] == {"role": "assistant", "tool_calls": calls}  # content-less only because it calls a tool
    assert prepare_messages([{"role": "user", "content": "q"}], tools=[{"name": "web"}])[1] == [{"name": "web"}]


# ---------------------------------------------------------------------------- answers of assistant messages
def test_assistant_answer_is_what_the_template_renders_after_the_think_block():
    cases = [({"role": "assistant", "content": "x</think>y", "reasoning_content": "given"}, "x</think>y"),
             ({"role": "assistant", "content": "r</think>y"}, "y"),
             ({"role": "assistant", "content": "plain"}, "plain"),
             ({"role": "assistant", "content": None, "tool_calls": [{"name": "calc", "arguments": {}}]}, "")]
    for message, answer in cases:
        assert assistant_answer(message) == answer
        if message["content"] is not None:
            rendered = render_chat(CHAT_TEMPLATE, [{"role": "user", "content": "q"}, message])
            assert rendered.endswith(f"</think>\n\n{answer}<|im_end|>\n")


@pytest.mark.parametrize("message, empty", [
    ({"role": "assistant", "content": "  \n"}, True),
    ({"role": "assistant", "content": "\n", "reasoning_content": "only thought about it"}, True),
    ({"role": "assistant", "content": "<think>all reasoning</think>\n"}, True),
    ({"role": "assistant", "content": "", "tool_calls": '[{"name": "calc", "arguments": {}}]'}, False),
    ({"role": "assistant", "content": "", "tool_calls": [{"name": "calc", "arguments": {}}]}, False),
    ({"role": "assistant", "content": "", "tool_calls": "[]"}, True),
    ({"role": "assistant", "content": "", "tool_calls": "[{broken"}, False),  # rendering reports the bad JSON
    ({"role": "assistant", "content": "7"}, False),
])
def test_empty_answer(message, empty):
    assert empty_answer(message) is empty


# ---------------------------------------------------------------------------- parsing streamed output
REPLY = ('<think>\nplan it\n</think>\n\nHello\n\nworld\n<tool_call>\n{"name": "calc", "arguments": {"expr": "6*7"}}\n'
         '</tool_call>\n<tool_call>{"name": "weather", "arguments": "{\\"city\\": \\"北京\\"}"}</tool_call>\nDone.\n')
CALL_ID = re.compile(r"^call_[0-9a-f]{24}$")


def merged(events):
    """Consecutive text events of one kind joined: what a client shows, however the text was chunked."""
    out = []
    for kind, value in events:
        if out and kind == out[-1][0] and kind != "tool_call":
            out[-1] = (kind, out[-1][1] + value)
        else:
            out.append((kind, value))
    return out


def test_output_parser_splits_a_reply_into_reasoning_content_and_tool_calls():
    parser = OutputParser()
    events = parser.feed(REPLY) + parser.finish()
    calls = [value for kind, value in events if kind == "tool_call"]
    assert [(k, v) for k, v in events if k != "tool_call"] == [
        ("reasoning", "plan it"), ("content", "Hello\n\nworld"), ("content", "Done.")]
    assert [k for k, _ in events] == ["reasoning", "content", "tool_call", "tool_call", "content"]
    assert [{**c, "id": None} for c in calls] == [
        {"index": 0, "id": None, "type": "function", "function": {"name": "calc", "arguments": '{"expr": "6*7"}'}},
        {"index": 1, "id": None, "type": "function",
         "function": {"name": "weather", "arguments": '{"city": "北京"}'}}]
    assert all(CALL_ID.match(c["id"]) for c in calls) and calls[0]["id"] != calls[1]["id"]
    assert parser.tool_calls == calls


@pytest.mark.parametrize("size", [1, 2, 3, 5, 11])
def test_output_parser_gives_the_same_parts_however_the_text_is_chunked(size):
    whole = OutputParser()
    expected = merged(whole.feed(REPLY) + whole.finish())
    parser = OutputParser()
    events = []
    for start in range(0, len(REPLY), size):
        events += parser.feed(REPLY[start:start + size])
    events += parser.finish()
    assert [(k, v if k != "tool_call" else v["function"]) for k, v in merged(events)] == \
        [(k, v if k != "tool_call" else v["function"]) for k, v in expected]


def test_output_parser_holds_back_only_what_may_start_a_tag():
    parser = OutputParser(open_thinking=True)
    assert parser.feed("step one</thi") == [("reasoning", "step one")]
    assert parser.feed("nk>\n\n7") == [("content", "7")]
    assert parser.feed(" <") == [("content", " ")]
    assert parser.feed("b>") == [("content", "<b>")]
    assert parser.feed("\n\n") == [] and parser.feed("8\n") == [("content", "\n\n8")]  # inner newlines are kept
    assert parser.finish() == []  # the final newline is layout


def test_output_parser_drops_only_the_layout_newlines_around_a_part():
    # newlines opening the reply and ending it go; spaces, inner newlines and letters at either end stay
    parser = OutputParser()
    assert merged(parser.feed("\n\n  Xerox MAX\n\nX") + parser.feed("\n") + parser.finish()) == [
        ("content", "  Xerox MAX\n\nX")]
    after_reasoning = OutputParser()
    assert merged(after_reasoning.feed("<think>\nr\n</think>\n\nXL") + after_reasoning.finish()) == [
        ("reasoning", "r"), ("content", "XL")]


def test_output_parser_without_tools_keeps_tool_markup_as_text():
    parser = OutputParser(parse_tools=False)
    text = '<tool_call>{"name": "calc", "arguments": {}}</tool_call>'
    assert merged(parser.feed(text) + parser.finish()) == [("content", text)] and parser.tool_calls == []


def test_output_parser_ends_a_cut_off_tool_call():
    parser = OutputParser()
    events = parser.feed('ok<tool_call>\n{"name": "calc", "arguments": {"x": 1}}') + parser.finish()
    assert [(k, v if k == "content" else v["function"]) for k, v in events] == [
        ("content", "ok"), ("tool_call", {"name": "calc", "arguments": '{"x": 1}'})]
    broken = OutputParser()
    assert broken.feed("<tool_call>{\"name\": ") + broken.finish() == [("content", '<tool_call>{"name": </tool_call>')]
    blank = OutputParser()
    assert blank.feed("<tool_call>\n\n</tool_call>x") + blank.finish() == [("content", "x")]


@pytest.mark.parametrize("text, call", [
    ('{"name": "calc"}', {"name": "calc", "arguments": "{}"}),
    (' {"name": "f", "arguments": {"q": "é"}} ', {"name": "f", "arguments": '{"q": "é"}'}),
    ('{"name": "f", "arguments": "raw text"}', {"name": "f", "arguments": "raw text"}),
    ('{"arguments": {}}', None), ('{"name": 3}', None), ('["calc"]', None), ("calc()", None),
])
def test_parse_tool_call(text, call):
    parsed = parse_tool_call(text, 4)
    if call is None:
        assert parsed is None
    else:
        assert (parsed["index"], parsed["type"], parsed["function"]) == (4, "function", call)
        assert CALL_ID.match(parsed["id"])


def test_stop_matcher_cuts_at_the_earliest_stop_and_holds_back_partial_ones():
    stop = StopMatcher(["xyz", "END"])
    assert stop.feed("a E") == "a "  # "E" may start END
    assert stop.feed("x") == "E"  # "Ex" starts no stop; "x" may start xyz
    assert stop.feed("q") == "xq"
    assert stop.feed("b END xyz") == "b " and stop.stopped  # END comes first
    assert stop.feed("more") == "" and stop.flush() == ""
    tail = StopMatcher(["END"])
    assert tail.feed("see EN") == "see " and tail.flush() == "EN" and tail.flush() == ""
    assert StopMatcher([]).feed("END") == "END"
    assert StopMatcher(["END"]).feed("a END b END") == "a "  # cut at the first of two


def test_image_tags_expand_outside_system_turns_only():
    from minimind_pl.chat_format import count_image_tags, expand_image_tags

    conversation = [{"role": "system", "content": "tags like <image> here are text"},
                    {"role": "user", "content": "<image>\n<image>比较"}, {"role": "assistant", "content": "<image>?"},
                    {"role": "tool", "content": None}]
    assert count_image_tags(conversation) == 3
    expanded = expand_image_tags(conversation, "@@")
    assert [m["content"] for m in expanded] == ["tags like <image> here are text", "@@\n@@比较", "@@?", None]
    assert conversation[1]["content"] == "<image>\n<image>比较"  # the input is left as it was


# ------------------------------------------------------------------ whole replies with tool calls
def test_parse_reply_finds_valid_calls_reports_invalid_blocks_and_keeps_the_answer():
    reply = ('<think>\nneed the weather\n</think>\n\nLet me look.\n<tool_call>\n{"name": "get_current_weather", '
             '"arguments": {"location": "北京"}}\n</tool_call>\n<tool_call>\n{"name": oops}\n</tool_call>\n'
             '<tool_call>{"arguments": {}}</tool_call>')
    from minimind_pl.chat_format import parse_reply, tool_call_parts

    parsed = parse_reply(reply)
    assert parsed.reasoning == "need the weather"
    assert [tool_call_parts(c) for c in parsed.tool_calls] == [("get_current_weather", {"location": "北京"})]
    assert parsed.invalid_calls == ['{"name": oops}', '{"arguments": {}}']  # bad JSON; no name
    assert parsed.content.startswith("Let me look.") and '{"name": oops}' in parsed.content
    assert parse_reply("no tools here").tool_calls == [] and parse_reply("no tools here").content == "no tools here"


def test_a_call_rendered_by_the_real_template_parses_back_to_the_same_call(tokenizer_dir):
    from minimind_pl.chat_format import parse_reply, tool_call_parts

    tokenizer = Tokenizer.from_file(tokenizer_dir)
    calls = [{"type": "function", "function": {"name": "unit_converter",
                                               "arguments": {"value": 100, "from_unit": "km", "to_unit": "miles"}}},
             {"type": "function", "function": {"name": "get_current_time", "arguments": "{}"}}]
    messages = [{"role": "user", "content": "100 km in miles, and the time?"},
                {"role": "assistant", "content": "Two calls.", "tool_calls": calls}]
    ids = tokenizer.encode_chat(messages, add_generation_prompt=False)
    prompt = tokenizer.encode_chat(messages[:1], add_generation_prompt=True)
    text = tokenizer.decode(ids[len(prompt):], skip_special_tokens=True)  # the assistant turn as the model writes it
    parsed = parse_reply(text)
    assert [tool_call_parts(c) for c in parsed.tool_calls] == [
        ("unit_converter", {"value": 100, "from_unit": "km", "to_unit": "miles"}), ("get_current_time", {})]
    assert parsed.content == "Two calls." and parsed.invalid_calls == []
