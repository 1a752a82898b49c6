"""``python main.py serve``: an OpenAI-compatible chat API (and a small web chat page) on the standard library.

Endpoints: ``POST /v1/chat/completions`` (streaming over server-sent events, ending with ``data: [DONE]``,
or one JSON answer), ``GET /v1/models``, ``GET /health`` and ``GET /`` (the web page, ``web/chat.html``).
Answers split ``<think>`` blocks into ``reasoning_content`` and ``<tool_call>`` blocks into ``tool_calls``.
Each request thread generates under one lock, so concurrent clients each get their own complete answer.
Bad requests get a 4xx with an OpenAI-style error body; nothing a client sends crashes the server.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from minimind_pl.generate import stream_generate
from minimind_pl.model import MiniMindForCausalLM
from minimind_pl.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool")
WEB_PAGE = Path(__file__).with_name("web") / "chat.html"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"


class APIError(Exception):
    """An error answered to the client as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        """Args:
            status: HTTP status code (4xx).
            message: Human-readable explanation.
            param: The request field at fault, if any.
            code: A short machine-readable code.
            kind: The OpenAI error ``type``.
        """
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        """The JSON error body."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ============================================================================ requests


@dataclass
class Sampling:
    """Server-side defaults and limits for generation.

    Args:
        temperature: Default sampling temperature (0 = greedy).
        top_p: Default nucleus threshold.
        top_k: Default top-k (0 = off); requests may send ``top_k`` as an extra field.
        max_tokens: Default answer length when a request gives none.
        max_tokens_limit: Largest ``max_tokens`` a request may ask for.
    """

    temperature: float = 0.85
    top_p: float = 0.85
    top_k: int = 50
    max_tokens: int = 1024
    max_tokens_limit: int = 8192


@dataclass
class ChatRequest:
    """A validated ``/v1/chat/completions`` request."""

    messages: list[dict[str, Any]]
    tools: Optional[list] = None
    stream: bool = False
    include_usage: bool = False
    max_tokens: Optional[int] = None
    temperature: float = 0.85
    top_p: float = 0.85
    top_k: int = 50
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: Optional[int] = None
    open_thinking: bool = False


def parse_chat_request(body: bytes, defaults: Sampling) -> ChatRequest:
    """Validate a request body; raises ``APIError`` (400) naming the bad field."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise APIError(400, f"request body is not valid JSON: {err}", code="invalid_json") from err
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    kwargs = data.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise APIError(400, "chat_template_kwargs must be an object", param="chat_template_kwargs")
    if data.get("n", 1) != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    stream_options = data.get("stream_options") or {}
    return ChatRequest(
        messages=parse_messages(data.get("messages")),
        tools=_typed(data, "tools", list, None),
        stream=_typed(data, "stream", bool, False),
        include_usage=bool(isinstance(stream_options, dict) and stream_options.get("include_usage")),
        max_tokens=parse_max_tokens(data, defaults.max_tokens_limit),
        temperature=_number(data, "temperature", defaults.temperature, 0.0, 2.0),
        top_p=_number(data, "top_p", defaults.top_p, 1e-6, 1.0),
        top_k=int(_number(data, "top_k", defaults.top_k, 0, 1e9, integer=True)),
        repetition_penalty=_number(data, "repetition_penalty", 1.0, 1e-3, 10.0),
        stop=parse_stop(data.get("stop")),
        seed=_typed(data, "seed", int, None),
        open_thinking=bool(kwargs.get("open_thinking", kwargs.get("enable_thinking", False))),
    )


def parse_messages(messages: Any) -> list[dict[str, Any]]:
    """Check roles and flatten OpenAI content parts (``[{"type": "text", "text": ...}]``) to strings."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise APIError(400, f"messages[{i}] must be an object", param=f"messages[{i}]")
        if message.get("role") not in ROLES:
            raise APIError(400, f"messages[{i}].role must be one of {list(ROLES)}, got {message.get('role')!r}",
                           param=f"messages[{i}].role")
        out.append({**message, "content": _content_text(message.get("content"), i)})
    return out


def _content_text(content: Any, index: int) -> str:
    """A message's content as text (None -> '')."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise APIError(400, f"messages[{index}].content must be a string or a list of text parts",
                   param=f"messages[{index}].content")


def parse_max_tokens(data: dict[str, Any], limit: int) -> Optional[int]:
    """``max_tokens`` (or ``max_completion_tokens``) in [1, limit], or None for the server default."""
    name = "max_completion_tokens" if data.get("max_completion_tokens") is not None else "max_tokens"
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise APIError(400, f"{name} must be a positive integer", param=name)
    if value > limit:
        raise APIError(400, f"{name}={value} is larger than this server allows ({limit})", param=name,
                       code="max_tokens_too_large")
    return value


def parse_stop(stop: Any) -> list[str]:
    """``stop``: a string or a list of up to 4 non-empty strings."""
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise APIError(400, "stop must be a string or a list of at most 4 non-empty strings", param="stop")
    return stops


def _typed(data: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    """``data[name]`` checked against ``kind`` (None -> default)."""
    value = data.get(name)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise APIError(400, f"{name} must be of type {kind.__name__}", param=name)
    return value


def _number(data: dict[str, Any], name: str, default: float, low: float, high: float, integer: bool = False) -> float:
    """A numeric field in [low, high] (None -> default)."""
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise APIError(400, f"{name} must be a number", param=name)
    if not low <= value <= high:
        raise APIError(400, f"{name} must be between {low} and {high}, got {value}", param=name)
    return float(value)


# ============================================================================ output parsing


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
                events.append(("content", f"{TOOL_OPEN}{self.tool_text}{TOOL_CLOSE}"))
            self.tool_text = ""
        self.state, self.newlines, self.at_start = state, "", True
        return events


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


# ============================================================================ engine


@dataclass
class Outcome:
    """What one generation produced, filled in as it streams."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"
    reasoning: list[str] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def usage(self) -> dict[str, int]:
        """OpenAI ``usage``."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class ChatEngine:
    """The model, its tokenizer and one lock: turns ``ChatRequest`` objects into answers."""

    def __init__(self, model: MiniMindForCausalLM, tokenizer: Tokenizer, model_name: str = "minimind",
                 sampling: Sampling = Sampling()) -> None:
        """Args:
            model: The transformer (eval mode, on its device).
            tokenizer: Its tokenizer (chat template included).
            model_name: The id ``/v1/models`` lists and answers carry.
            sampling: Defaults and limits for generation.
        """
        self.model, self.tokenizer, self.model_name, self.sampling = model, tokenizer, model_name, sampling
        self.lock = threading.Lock()

    def prompt_ids(self, request: ChatRequest) -> list[int]:
        """Render and tokenize the conversation; 400 if the template rejects it or it does not fit."""
        try:
            text = self.tokenizer.apply_chat_template(request.messages, tools=request.tools,
                                                      add_generation_prompt=True, open_thinking=request.open_thinking)
        except ValueError as err:
            raise APIError(400, f"cannot render the conversation: {err}", param="messages") from err
        ids = self.tokenizer.encode(text)
        context = self.model.config.max_position_embeddings
        wanted = request.max_tokens or 1
        if len(ids) + wanted > context:
            raise APIError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({wanted}) exceeds the model's "
                           f"context of {context} tokens", param="messages", code="context_length_exceeded")
        return ids

    def events(self, request: ChatRequest, outcome: Outcome, ids: Optional[list[int]] = None
               ) -> Iterator[tuple[str, Any]]:
        """Generate under the lock, yielding parsed ``(kind, value)`` events; ``outcome`` collects the rest."""
        ids = self.prompt_ids(request) if ids is None else ids
        budget = request.max_tokens or min(self.sampling.max_tokens, self.model.config.max_position_embeddings - len(ids))
        outcome.prompt_tokens = len(ids)
        parser = OutputParser(request.open_thinking, parse_tools=bool(request.tools))
        stop = StopMatcher(request.stop)
        decoder = self.tokenizer.stream_decoder(skip_special_tokens=True)
        with self.lock:
            for token in stream_generate(self.model, ids, **self._sampling_args(request, budget)):
                outcome.completion_tokens += 1
                yield from self._record(parser.feed(stop.feed(decoder.push(token))), outcome)
                if stop.stopped:
                    break
        if not stop.stopped:
            yield from self._record(parser.feed(stop.feed(decoder.flush()) + stop.flush()), outcome)
            outcome.finish_reason = "length" if outcome.completion_tokens >= budget else "stop"
        yield from self._record(parser.finish(), outcome)
        if outcome.tool_calls:
            outcome.finish_reason = "tool_calls"

    def _sampling_args(self, request: ChatRequest, budget: int) -> dict[str, Any]:
        """Keyword arguments of ``stream_generate`` for a request."""
        generator = None
        if request.seed is not None:
            generator = torch.Generator(device=next(self.model.parameters()).device).manual_seed(request.seed)
        return {"max_new_tokens": budget, "temperature": request.temperature, "top_p": request.top_p,
                "top_k": request.top_k, "repetition_penalty": request.repetition_penalty,
                "do_sample": request.temperature > 0, "eos_token_id": self.tokenizer.eos_id, "generator": generator}

    @staticmethod
    def _record(events: list[tuple[str, Any]], outcome: Outcome) -> Iterator[tuple[str, Any]]:
        """Add events to the outcome and pass them on."""
        for kind, value in events:
            {"reasoning": outcome.reasoning, "content": outcome.content, "tool_call": outcome.tool_calls}[kind].append(value)
            yield kind, value

    # ------------------------------------------------------------------ OpenAI response objects
    def complete(self, request: ChatRequest) -> dict[str, Any]:
        """A whole ``chat.completion`` object."""
        outcome = Outcome()
        for _ in self.events(request, outcome):
            pass
        message: dict[str, Any] = {"role": "assistant", "content": "".join(outcome.content) or None}
        if outcome.reasoning:
            message["reasoning_content"] = "".join(outcome.reasoning)
        if outcome.tool_calls:
            message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in outcome.tool_calls]
        elif message["content"] is None:
            message["content"] = ""
        choice = {"index": 0, "message": message, "finish_reason": outcome.finish_reason, "logprobs": None}
        return {**self._envelope("chat.completion"), "choices": [choice], "usage": outcome.usage()}

    def stream(self, request: ChatRequest) -> Iterator[dict[str, Any]]:
        """``chat.completion.chunk`` objects: role, one delta per event, the finish reason, usage if asked.

        The prompt is checked when the first chunk is asked for, so an ``APIError`` can still become a 4xx.
        """
        ids = self.prompt_ids(request)
        outcome = Outcome()
        envelope = self._envelope("chat.completion.chunk")
        yield self._chunk(envelope, {"role": "assistant", "content": ""})
        events = self.events(request, outcome, ids)
        try:
            for kind, value in events:
                yield self._chunk(envelope, _delta(kind, value))
        finally:
            events.close()  # a client that left mid-answer releases the model lock at once
        yield self._chunk(envelope, {}, outcome.finish_reason)
        if request.include_usage:
            yield {**envelope, "choices": [], "usage": outcome.usage()}

    def _envelope(self, kind: str) -> dict[str, Any]:
        """The fields every response object shares."""
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
                "model": self.model_name}

    @staticmethod
    def _chunk(envelope: dict[str, Any], delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        """One streaming chunk."""
        return {**envelope, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

    def models(self) -> dict[str, Any]:
        """The ``/v1/models`` list."""
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": int(time.time()),
                                             "owned_by": "minimind_pl"}]}


def _delta(kind: str, value: Any) -> dict[str, Any]:
    """A streaming delta for one parsed event."""
    if kind == "reasoning":
        return {"reasoning_content": value}
    if kind == "tool_call":
        return {"tool_calls": [value]}
    return {"content": value}


# ============================================================================ HTTP


class APIServer(ThreadingHTTPServer):
    """A threading HTTP server that carries the engine and the server's settings."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], engine: ChatEngine, api_key: str | None = None,
                 max_body_bytes: int = 1 << 20) -> None:
        """Args:
            address: (host, port) to bind; port 0 picks a free one.
            engine: The model behind the API.
            api_key: If set, ``/v1/*`` requires ``Authorization: Bearer <api_key>``.
            max_body_bytes: Larger request bodies get 413.
        """
        super().__init__(address, RequestHandler)
        self.engine, self.api_key, self.max_body_bytes = engine, api_key, max_body_bytes


class RequestHandler(BaseHTTPRequestHandler):
    """Routes requests to the engine; every failure becomes an OpenAI-style error response."""

    server: APIServer
    server_version = "minimind_pl"
    timeout = 120  # seconds a socket read or write may stall (a silent client cannot hold the model forever)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """Quiet access log (errors still go to stderr via ``log_error``)."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        """``/`` (web page), ``/health``, ``/v1/models``."""
        self._guard(self._get)

    def do_POST(self) -> None:  # noqa: N802
        """``/v1/chat/completions``."""
        self._guard(self._post)

    def _guard(self, handler) -> None:
        """Run a handler, answering APIError with its status and anything else with a 500 body."""
        try:
            handler()
        except APIError as err:
            self._send_json(err.status, err.body())
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away
        except Exception as err:  # noqa: BLE001 - the server must keep running
            self.log_error("internal error: %r", err)
            self._send_json(500, APIError(500, f"internal error: {type(err).__name__}", kind="server_error").body())

    def _get(self) -> None:
        """Answer the GET routes."""
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html", "/chat"):
            self._send(200, WEB_PAGE.read_bytes(), "text/html; charset=utf-8")
        elif path == "/health":
            self._send_json(200, {"status": "ok"})
        elif path.rstrip("/") == "/v1/models":
            self._authorize()
            self._send_json(200, self.server.engine.models())
        else:
            raise APIError(404, f"no route GET {path}", code="not_found")

    def _post(self) -> None:
        """Answer ``/v1/chat/completions``."""
        path = self.path.split("?", 1)[0].rstrip("/")
        if path != "/v1/chat/completions":
            raise APIError(404, f"no route POST {path}", code="not_found")
        self._authorize()
        engine = self.server.engine
        request = parse_chat_request(self._read_body(), engine.sampling)
        if request.stream:
            self._send_stream(engine.stream(request))
        else:
            self._send_json(200, engine.complete(request))

    def _authorize(self) -> None:
        """401 unless the API key (when one is set) comes as a bearer token."""
        key = self.server.api_key
        if key and self.headers.get("Authorization", "") != f"Bearer {key}":
            raise APIError(401, "invalid or missing API key (Authorization: Bearer ...)", code="invalid_api_key",
                           kind="authentication_error")

    def _read_body(self) -> bytes:
        """The request body, refusing missing lengths (411) and oversized bodies (413)."""
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            raise APIError(411, "a Content-Length header is required", code="length_required")
        if int(length) > self.server.max_body_bytes:
            self.close_connection = True  # the unread body must not be parsed as a next request
            raise APIError(413, f"request body of {length} bytes exceeds the limit of {self.server.max_body_bytes}",
                           code="request_too_large")
        return self.rfile.read(int(length))

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        """A complete response."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, status: int, data: dict[str, Any]) -> None:
        """A JSON response."""
        self._send(status, json.dumps(data, ensure_ascii=False).encode("utf-8"), "application/json")

    def _send_stream(self, chunks: Iterator[dict[str, Any]]) -> None:
        """Server-sent events, one ``data:`` line per chunk, then ``data: [DONE]``; the connection then closes.

        The first chunk is produced before the headers go out, so request errors still get a 4xx.
        """
        first = next(chunks)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        try:
            try:
                for chunk in _prepend(first, chunks):
                    self._send_event(chunk)
            except (BrokenPipeError, ConnectionResetError):
                raise
            except Exception as err:  # noqa: BLE001 - headers are out: report inside the stream
                self.log_error("internal error while streaming: %r", err)
                self._send_event(APIError(500, f"internal error: {type(err).__name__}", kind="server_error").body())
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        finally:
            chunks.close()  # a client that left mid-answer releases the model lock here


    def _send_event(self, data: dict[str, Any]) -> None:
        """One server-sent event."""
        self.wfile.write(f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode("utf-8"))
        self.wfile.flush()


def _prepend(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    """``first`` followed by the items of ``rest``."""
    yield first
    yield from rest


def make_server(engine: ChatEngine, host: str = "127.0.0.1", port: int = 8998, api_key: str | None = None,
                max_body_bytes: int = 1 << 20) -> APIServer:
    """Bind the API server (not started: call ``serve_forever``)."""
    return APIServer((host, port), engine, api_key=api_key, max_body_bytes=max_body_bytes)


def serve_command(
    ckpt: str,
    lora: str | None = None,
    tokenizer: str | None = None,
    preset: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8998,
    api_key: str | None = None,
    model_name: str = "minimind",
    temperature: float = 0.85,
    top_p: float = 0.85,
    top_k: int = 50,
    max_tokens: int = 1024,
    max_tokens_limit: int = 8192,
    max_body_bytes: int = 1 << 20,
    device: str = "auto",
) -> None:
    """Serve a model with an OpenAI-compatible API and a web chat page at ``http://HOST:PORT/``.

    Args:
        ckpt: A Lightning .ckpt of any stage, a MiniMind .pth or a Hugging Face directory.
        lora: A LoRA adapter file to apply on top of the weights.
        tokenizer: Tokenizer directory (default: the one recorded with the checkpoint).
        preset: Model preset of a MiniMind .pth (default: read from the tensor shapes).
        host: Address to bind; the default serves this machine only. Use 0.0.0.0 to serve the network.
        port: TCP port.
        api_key: If set, clients must send ``Authorization: Bearer <api_key>``.
        model_name: The model id the API reports.
        temperature: Default temperature for requests that give none (0 = greedy).
        top_p: Default nucleus threshold.
        top_k: Default top-k (requests may send ``top_k``).
        max_tokens: Default answer length in tokens.
        max_tokens_limit: Largest ``max_tokens`` a request may ask for.
        max_body_bytes: Largest accepted request body.
        device: ``auto``, ``cpu`` or ``cuda``.
    """
    from minimind_pl.inference import load_model, load_tokenizer
    from minimind_pl.lora import merge_lora

    model = merge_lora(load_model(ckpt, preset=preset, device=device, lora=lora))  # adapters folded in: faster
    sampling = Sampling(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens,
                        max_tokens_limit=max_tokens_limit)
    engine = ChatEngine(model, load_tokenizer(ckpt, tokenizer), model_name=model_name, sampling=sampling)
    server = make_server(engine, host, port, api_key=api_key, max_body_bytes=max_body_bytes)
    print(f"serving {ckpt} as {model_name!r} on http://{host}:{server.server_address[1]}/ "
          f"(OpenAI API at /v1, web chat at /); Ctrl-C stops")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
