"""The chat markup's readers: turns of a rendered prompt (what the RL rewards see) and the reasoning split of a reply.

Rendering itself is checked against transformers in tests/test_tokenizer.py.
"""

from __future__ import annotations

from minimind_pl.chat_format import (CHAT_TEMPLATE, TURN_END, TURN_START, assistant_answer, render_chat,
                                     rendered_turns, split_reasoning)
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
