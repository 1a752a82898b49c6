"""The chat format in one place: roles, tags, the chat template and its rendering, and the parser of
model output.

A conversation is a list of messages ``{"role": "system"|"user"|"assistant"|"tool", "content": ...}``
with MiniMind's optional fields ``reasoning_content`` (assistant), ``tools`` (system; list or JSON string)
and ``tool_calls`` (assistant; list or JSON string). It is rendered by the tokenizer's Jinja template
exactly as ``transformers`` renders it (same sandbox, filters and globals), without importing
``transformers``. The model answers in the same format: an optional ``<think>...</think>`` block, then
text, with tool calls as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks;
:class:`OutputParser` splits streamed output back into those parts (the server's path), :func:`parse_reply` a whole
reply through the same parser (the tool loop's path), :func:`split_reasoning` a whole reply's reasoning, and
:func:`rendered_turns` reads the turns of a rendered prompt back (the RL rewards use both).
"""

from __future__ import annotations

import functools
import json
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Mapping, Optional, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROLES = ("system", "user", "assistant", "tool")
TURN_START, TURN_END = "<|im_start|>", "<|im_end|>"  # ChatML's turn markers (the tokenizer's bos and eos)
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"  # R1-style data may wrap the answer after the reasoning in these
#: The tags of reasoning data, which MiniMind's reasoning recipe up-weights in the loss (train_distill_reason.py).
REASONING_TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
EMPTY_THINK = "<think>\n\n</think>\n\n"  # what the template writes for an assistant turn without reasoning
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # names a message's reasoning may have
#: Where an image goes in a message's content (MiniMind-V): each tag in a non-system turn becomes the model's image
#: placeholder token × features per image (``expand_image_tags``) before the template renders it; a system turn's
#: tags stay text. The images themselves are listed, in tag order, in a conversation record's ``images`` field
#: (jsonl; Parquet rows are read into it).
IMAGE_TAG, IMAGES_FIELD = "<image>", "images"

# Our ChatML template with <think> blocks and <tool_call>/<tool_response>, written to render
# the same text as MiniMind's template (tests/test_tokenizer.py checks this).
CHAT_TEMPLATE = r"""
{%- set first = messages[0] if messages else {} -%}
{%- if tools -%}
    {{- '<|im_start|>system\n' -}}
    {%- if first.role == 'system' -%}{{- first.content + '\n\n' -}}{%- endif -%}
    {{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' -}}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' -}}
    {%- for tool in tools -%}{{- '\n' ~ tool | tojson -}}{%- endfor -%}
    {{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments' -}}
    {{- ' within <tool_call></tool_call> XML tags:\n<tool_call>\n' -}}
    {{- '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' -}}
{%- elif first.role == 'system' -%}
    {{- '<|im_start|>system\n' + first.content + '<|im_end|>\n' -}}
{%- endif -%}
{%- for m in messages -%}
    {%- set text = m.content if m.content is string else '' -%}
    {%- if m.role == 'user' or (m.role == 'system' and not loop.first) -%}
        {{- '<|im_start|>' ~ m.role ~ '\n' ~ text ~ '<|im_end|>\n' -}}
    {%- elif m.role == 'assistant' -%}
        {%- if m.reasoning_content is string -%}
            {%- set think = m.reasoning_content -%}
        {%- elif '</think>' in text -%}
            {%- set think = text.partition('</think>')[0].rpartition('<think>')[2] -%}
            {%- set text = text.rpartition('</think>')[2] -%}
        {%- else -%}
            {%- set think = '' -%}
        {%- endif -%}
        {{- '<|im_start|>assistant\n<think>\n' ~ think.strip('\n') ~ '\n</think>\n\n' ~ text.lstrip('\n') -}}
        {%- if m.tool_calls -%}
            {%- for call in m.tool_calls -%}
                {%- if text or not loop.first -%}{{- '\n' -}}{%- endif -%}
                {%- set fn = call.function if call.function else call -%}
                {{- '<tool_call>\n{"name": "' ~ fn.name ~ '", "arguments": ' -}}
                {{- fn.arguments if fn.arguments is string else fn.arguments | tojson -}}
                {{- '}\n</tool_call>' -}}
            {%- endfor -%}
        {%- endif -%}
        {{- '<|im_end|>\n' -}}
    {%- elif m.role == 'tool' -%}
        {%- if loop.first or loop.previtem.role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}
        {{- '\n<tool_response>\n' ~ text ~ '\n</tool_response>' -}}
        {%- if loop.last or loop.nextitem.role != 'tool' -%}{{- '<|im_end|>\n' -}}{%- endif -%}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
    {%- if open_thinking is defined and open_thinking is true -%}
        {{- '<think>\n' -}}
    {%- else -%}
        {{- '<think>\n\n</think>\n\n' -}}
    {%- endif -%}
{%- endif -%}
""".strip()


# ====================================================================== Jinja (as transformers)
class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` support: renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        """Parse the block into a call that returns its body."""
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        """Return the rendered body."""
        return caller()


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """JSON filter as transformers defines it: no HTML escaping, unicode kept, keys unsorted."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    """Template global that aborts rendering with ``message``."""
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    """Template global: the current local time formatted with ``fmt``."""
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in the sandboxed environment transformers uses."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ValueError(f"chat template has a syntax error (line {exc.lineno}): {exc.message}") from exc

# ====================================================================== messages
def _parse_json_field(value: Any, what: str, where: str) -> Any:
    """``json.loads`` a JSON-string field (as MiniMind's data stores tools/tool_calls)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: `{what}` is not valid JSON: {exc}") from exc


def _check_message(index: int, message: Any) -> str:
    """Validate one message; return a 'message I (role R)' label for later errors."""
    if not isinstance(message, Mapping):
        raise ValueError(f"message {index} must be a dict, got {type(message).__name__}")
    role = message.get("role")
    where = f"message {index} (role {role!r})"
    if role not in ROLES:
        raise ValueError(f"{where}: unknown role, expected one of {', '.join(ROLES)}")
    content = message.get("content")
    if content is None and not (role == "assistant" and message.get("tool_calls")):
        raise ValueError(f"{where}: missing `content`")
    if content is not None and not isinstance(content, str):
        raise ValueError(f"{where}: `content` must be a string, got {type(content).__name__}")
    return where


def _alias_reasoning(message: dict) -> dict:
    """Fill ``reasoning_content`` (and ``thinking``) from any reasoning field, as transformers does."""
    for key in REASONING_FIELDS:
        if message.get(key) is not None:
            reasoning = message[key]
            return {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


def prepare_messages(messages: Sequence[Mapping], tools: Any = None) -> tuple[list[dict], Optional[list]]:
    """Validate and normalize messages for a chat template, the way MiniMind's SFT data does.

    JSON-string ``tools`` (on a system message) and ``tool_calls`` (on an assistant message) are
    parsed; when ``tools`` is None the system message's ``tools`` are used. Keys set to None are
    dropped and reasoning fields aliased, as transformers does. Returns (messages, tools).
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("cannot apply a chat template to an empty conversation")
    out = []
    found_tools = None
    for index, raw in enumerate(messages):
        where = _check_message(index, raw)
        message = {k: v for k, v in raw.items() if v is not None}
        if message["role"] == "system" and message.get("tools"):
            found_tools = _parse_json_field(message["tools"], "tools", where)
        if message.get("tool_calls"):
            message["tool_calls"] = _parse_json_field(message["tool_calls"], "tool_calls", where)
        out.append(_alias_reasoning(message))
    tools = found_tools if tools is None else _parse_json_field(tools, "tools", "tools argument")
    if tools is not None and not isinstance(tools, list):
        raise ValueError(f"tools must be a list of JSON schemas, got {type(tools).__name__}")
    return out, tools


# ====================================================================== images (MiniMind-V)
def count_image_tags(conversation: Sequence[Any]) -> int:
    """``<image>`` tags in the string contents of the non-system turns (the tags that stand for images)."""
    return sum(m["content"].count(IMAGE_TAG) for m in conversation
               if isinstance(m, Mapping) and m.get("role") != "system" and isinstance(m.get("content"), str))


def expand_image_tags(conversation: Sequence[Mapping], image_text: str) -> list[dict]:
    """A copy of ``conversation`` with each ``<image>`` of a non-system turn's content replaced by ``image_text``
    (the placeholder token × features per image: ``VisionConfig.image_token * image_token_len``). MiniMind-V's
    rule, used by its training data and by every command that shows a model images; a system turn's tag stays
    text."""
    return [{**m, "content": m["content"].replace(IMAGE_TAG, image_text)}
            if m.get("role") != "system" and isinstance(m.get("content"), str) else dict(m) for m in conversation]


# ====================================================================== rendering
def select_template(chat_template: Any, tools: Any = None, where: str = "tokenizer_config.json") -> str:
    """The Jinja source to use: ``chat_template`` itself, or from a named set (``[{"name", "template"}]``)
    the ``tool_use`` one when tools are given, else ``default``. ValueError if there is none."""
    if isinstance(chat_template, list):
        named = {t.get("name"): t.get("template") for t in chat_template if isinstance(t, Mapping)}
        chat_template = named.get("tool_use") if tools and "tool_use" in named else named.get("default")
    if not isinstance(chat_template, str) or not chat_template:
        raise ValueError(f"{where} has no usable `chat_template`")
    return chat_template


def render_chat(chat_template: Any, messages: Sequence[Mapping], tools: Any = None,
                add_generation_prompt: bool = False, open_thinking: bool = False,
                **template_vars: Any) -> str:
    """Render a conversation with a Jinja chat template, exactly as transformers would.

    Args:
        chat_template: the ``chat_template`` of a tokenizer config: Jinja source, or a named set
            (see :func:`select_template`).
        messages: the conversation (see the module doc); validated by :func:`prepare_messages`.
        tools: tool JSON schemas (list or JSON string); default: the system message's ``tools``.
        add_generation_prompt: append the assistant header to prompt a reply.
        open_thinking: with ``add_generation_prompt``, leave a ``<think>`` block open for the model.
        **template_vars: extra template variables (the tokenizer passes its named special tokens).

    Raises ValueError naming the message index and role for bad messages, or the template error.
    """
    chat, tools = prepare_messages(messages, tools)
    template = compile_chat_template(select_template(chat_template, tools))
    try:
        return template.render(messages=chat, tools=tools, documents=None, add_generation_prompt=add_generation_prompt,
                               open_thinking=open_thinking, **template_vars)
    except (jinja2.exceptions.TemplateError, TypeError, AttributeError, KeyError) as exc:
        raise ValueError(f"chat template failed to render: {type(exc).__name__}: {exc}") from exc


# ====================================================================== parsing model output
class StopMatcher:
    """Cut generated text at the first stop string, holding back what may be the start of one."""

    def __init__(self, stops: list[str]) -> None:
        """Args:
            stops: The stop strings (may be empty).
        """
        self.stops, self.buffer, self.stopped = stops, "", False

    def feed(self, text: str) -> str:
        """Add text; return what is certainly before any stop string."""
        if self.stopped:
            return ""
        self.buffer += text
        hits = [self.buffer.find(s) for s in self.stops if s in self.buffer]
        if hits:
            self.stopped = True
            out, self.buffer = self.buffer[:min(hits)], ""
            return out
        keep = max((n for s in self.stops for n in range(1, len(s)) if self.buffer.endswith(s[:n])), default=0)
        out, self.buffer = self.buffer[:len(self.buffer) - keep], self.buffer[len(self.buffer) - keep:]
        return out

    def flush(self) -> str:
        """The held-back text at the end of generation."""
        out, self.buffer = self.buffer, ""
        return out


class OutputParser:
    """Split streamed model text into ``reasoning`` / ``content`` pieces and complete ``tool_call`` dicts.

    Tags may arrive split across pieces; a suffix that could start a tag is held back. Newlines that
    open a reasoning or content part, and those right before a tag or the end, are dropped (the chat
    template's own layout, not the model's words).
    """

    def __init__(self, open_thinking: bool = False, parse_tools: bool = True) -> None:
        """Args:
            open_thinking: The prompt ended inside ``<think>``: text is reasoning until ``</think>``.
            parse_tools: Turn ``<tool_call>`` blocks into tool calls (else they stay content).
        """
        self.state = "reasoning" if open_thinking else "content"
        self.parse_tools = parse_tools
        self.pending, self.newlines, self.at_start, self.tool_text = "", "", True, ""
        self.tool_calls: list[dict[str, Any]] = []
        #: The text of each ``<tool_call>`` block that is not a call (bad JSON, no name): it is passed on as content.
        self.invalid_calls: list[str] = []

    def _tags(self) -> dict[str, str]:
        """Tag -> next state, for the current state."""
        if self.state == "reasoning":
            return {THINK_CLOSE: "content"}
        if self.state == "tool":
            return {TOOL_CLOSE: "content"}
        return {THINK_OPEN: "reasoning", **({TOOL_OPEN: "tool"} if self.parse_tools else {})}

    def feed(self, text: str) -> list[tuple[str, Any]]:
        """Add text; return events ``(kind, value)`` with kind ``reasoning``, ``content`` or ``tool_call``."""
        self.pending += text
        events: list[tuple[str, Any]] = []
        while True:
            tags = self._tags()
            found = [(self.pending.find(t), t) for t in tags if t in self.pending]
            if not found:
                break
            index, tag = min(found)
            events += self._emit(self.pending[:index], final=True)
            events += self._switch(tags[tag])
            self.pending = self.pending[index + len(tag):]
        keep = max((n for t in self._tags() for n in range(1, len(t)) if self.pending.endswith(t[:n])), default=0)
        events += self._emit(self.pending[:len(self.pending) - keep], final=False)
        self.pending = self.pending[len(self.pending) - keep:]
        return events

    def finish(self) -> list[tuple[str, Any]]:
        """Events for the text still held at the end of generation."""
        events = self._emit(self.pending, final=True)
        self.pending = ""
        if self.state == "tool":
            events += self._switch("content")  # an unterminated call: parsed if it is complete JSON
        return events

    def _emit(self, text: str, final: bool) -> list[tuple[str, Any]]:
        """Text of the current state, with the layout newlines handled."""
        if self.state == "tool":
            self.tool_text += text
            return []
        if self.at_start:
            text = text.lstrip("\n")
            self.at_start = not text
        body = self.newlines + text
        stripped = body.rstrip("\n")
        self.newlines = "" if final else body[len(stripped):]
        return [(self.state, stripped)] if stripped else []

    def _switch(self, state: str) -> list[tuple[str, Any]]:
        """Enter ``state``; leaving a tool block yields its call (or its raw text if it is not valid JSON)."""
        events: list[tuple[str, Any]] = []
        if self.state == "tool":
            call = parse_tool_call(self.tool_text, len(self.tool_calls))
            if call is not None:
                self.tool_calls.append(call)
                events.append(("tool_call", call))
            elif self.tool_text.strip():
                self.invalid_calls.append(self.tool_text.strip())
                events.append(("content", f"{TOOL_OPEN}{self.tool_text}{TOOL_CLOSE}"))
            self.tool_text = ""
        self.state, self.newlines, self.at_start = state, "", True
        return events


@dataclass
class Reply:
    """A whole generated reply split as :class:`OutputParser` splits it.

    Attributes:
        content: The answer text (an invalid ``<tool_call>`` block stays in it as written).
        reasoning: The ``<think>`` text, or None.
        tool_calls: OpenAI tool calls (``{"id", "type": "function", "function": {"name", "arguments": JSON text}}``).
        invalid_calls: The text of each ``<tool_call>`` block that is not a call (bad JSON or no ``name``).
    """

    content: str
    reasoning: Optional[str] = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    invalid_calls: list[str] = field(default_factory=list)

    def message(self) -> dict[str, Any]:
        """The reply as an assistant message the chat template renders back (reasoning, content, tool calls)."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning is not None:
            message["reasoning_content"] = self.reasoning
        if self.tool_calls:
            message["tool_calls"] = [{k: v for k, v in call.items() if k != "index"} for call in self.tool_calls]
        return message


def parse_reply(text: str, open_thinking: bool = False) -> Reply:
    """Split a whole generated reply (decoded without special tokens) into reasoning, content and tool calls, by the
    streaming parser the server uses, so both read a reply the same way.

    Args:
        text: The reply as generated after the prompt.
        open_thinking: The prompt left a ``<think>`` block open, so the reply starts inside it.
    """
    parser = OutputParser(open_thinking)
    events = parser.feed(text) + parser.finish()
    parts: dict[str, list[str]] = {"reasoning": [], "content": []}
    for kind, value in events:
        if kind != "tool_call":
            parts[kind].append(value)
    reasoning = "".join(parts["reasoning"])
    return Reply("".join(parts["content"]), reasoning or None, parser.tool_calls, parser.invalid_calls)


def tool_call_parts(call: Mapping[str, Any]) -> tuple[str, Any]:
    """``(name, arguments)`` of an OpenAI tool call (or of a bare ``{"name", "arguments"}``), the arguments
    JSON-decoded when they are JSON text (ValueError when they are not valid JSON)."""
    function = call.get("function") or call
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"the arguments of {function.get('name')!r} are not valid JSON: {exc}") from exc
    return str(function.get("name", "")), arguments


def parse_tool_call(text: str, index: int) -> Optional[dict[str, Any]]:
    """An OpenAI tool call from ``{"name": ..., "arguments": {...}}``, or None if it is not one."""
    try:
        data = json.loads(text.strip())
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    arguments = data.get("arguments", {})
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"index": index, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": data["name"], "arguments": arguments}}


def assistant_answer(message: Mapping) -> str:
    """The answer an assistant message renders, without its reasoning (as ``CHAT_TEMPLATE`` splits them):
    its ``content``, less a ``<think>...</think>`` block written inline when no reasoning field is set."""
    content = message.get("content")
    text = content if isinstance(content, str) else ""
    reasoning = next((message[key] for key in REASONING_FIELDS if message.get(key) is not None), None)
    if not isinstance(reasoning, str) and THINK_CLOSE in text:
        text = text.rpartition(THINK_CLOSE)[2]
    return text


def empty_answer(message: Mapping) -> bool:
    """Whether an assistant message says nothing: a blank answer (reasoning alone does not count) and no tool calls.

    Training on such a turn teaches the model to stop without answering (``generate`` writes one when a
    teacher is cut off while still reasoning).
    """
    calls = message.get("tool_calls")
    if isinstance(calls, str):  # MiniMind's data stores tool calls as a JSON string
        try:
            calls = json.loads(calls)
        except json.JSONDecodeError:
            return False  # not empty; rendering reports the bad JSON
    return not calls and not assistant_answer(message).strip()


def split_reasoning(text: str, opened: bool = False) -> tuple[str, Optional[str]]:
    """``(answer, reasoning or None)`` of a generated reply; the reasoning is the text before ``</think>``.

    The split is at the FIRST ``</think>``: MiniMind's rule (its RL rewards take the answer after the first tag), kept
    so the rewards (``rewards.Sample.answer``) score what MiniMind's do. A rendered assistant turn is split at the last
    tag instead (:func:`assistant_answer`, as the chat template does).

    Args:
        text: The decoded reply.
        opened: The prompt left a ``<think>`` block open (``open_thinking``), so the reply starts inside
            it; a reply that never closes it (cut by ``max_new_tokens``) is all reasoning, no answer.
    """
    head, sep, tail = text.partition(THINK_CLOSE)
    if not sep:
        return ("", text.strip() or None) if opened else (text.strip(), None)
    head = head.strip()
    if head.startswith(THINK_OPEN):
        head = head[len(THINK_OPEN):].strip()
    return tail.strip(), (head or None)


_RENDERED_TURN = re.compile(rf"{re.escape(TURN_START)}({'|'.join(ROLES)})\s+(.*?){re.escape(TURN_END)}", re.DOTALL)


def rendered_turns(text: str) -> list[dict[str, str]]:
    """The closed turns of a rendered ChatML text (a prompt as the model saw it), ``[{"role", "content"}, ...]``.

    The inverse of rendering as far as the rewards need it: each ``<|im_start|>role\n...<|im_end|>`` turn, its content
    stripped and kept as rendered (an assistant turn keeps its ``<think>`` block; tool results are the user turns the
    template writes). A turn left open (the generation prompt's assistant header) is not a turn.
    """
    return [{"role": role, "content": content.strip()} for role, content in _RENDERED_TURN.findall(text)]
