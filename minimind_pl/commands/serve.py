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

from minimind_pl.chat_format import ROLES, OutputParser, StopMatcher
from minimind_pl.checkpoints import open_checkpoint
from minimind_pl.generation import SamplingSettings, stream_generate
from minimind_pl.model import MiniMindForCausalLM
from minimind_pl.tokenizer import Tokenizer

WEB_PAGE = Path(__file__).with_name("web") / "chat.html"
DEFAULT = SamplingSettings()


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
class ServerSettings:
    """Server-side defaults and limits for generation.

    Args:
        sampling: Sampling for requests that set none (requests may also send ``top_k`` and
            ``repetition_penalty`` as extra fields).
        max_tokens: Default answer length when a request gives none.
        max_tokens_limit: Largest ``max_tokens`` a request may ask for.
    """

    sampling: SamplingSettings = DEFAULT
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
    sampling: SamplingSettings = DEFAULT
    stop: list[str] = field(default_factory=list)
    seed: Optional[int] = None
    open_thinking: bool = False


def parse_chat_request(body: bytes, defaults: ServerSettings) -> ChatRequest:
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
        sampling=parse_sampling(data, defaults.sampling),
        stop=parse_stop(data.get("stop")),
        seed=_typed(data, "seed", int, None),
        open_thinking=bool(kwargs.get("open_thinking", kwargs.get("enable_thinking", False))),
    )


def parse_sampling(data: dict[str, Any], defaults: SamplingSettings) -> SamplingSettings:
    """The request's sampling fields, each checked against its range, over the server's defaults."""
    return SamplingSettings(
        temperature=_number(data, "temperature", defaults.temperature, 0.0, 2.0),
        top_p=_number(data, "top_p", defaults.top_p, 1e-6, 1.0),
        top_k=int(_number(data, "top_k", defaults.top_k, 0, 1e9, integer=True)),
        repetition_penalty=_number(data, "repetition_penalty", defaults.repetition_penalty, 1e-3, 10.0),
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
                 settings: ServerSettings = ServerSettings()) -> None:
        """Args:
            model: The transformer (eval mode, on its device).
            tokenizer: Its tokenizer (chat template included).
            model_name: The id ``/v1/models`` lists and answers carry.
            settings: Defaults and limits for generation.
        """
        self.model, self.tokenizer, self.model_name, self.settings = model, tokenizer, model_name, settings
        self.lock = threading.Lock()

    def prompt_ids(self, request: ChatRequest) -> list[int]:
        """Render and tokenize the conversation; 400 if the template rejects it or it does not fit."""
        try:
            ids = self.tokenizer.encode_chat(request.messages, open_thinking=request.open_thinking, tools=request.tools)
        except ValueError as err:
            raise APIError(400, f"cannot render the conversation: {err}", param="messages") from err
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
        budget = request.max_tokens or min(self.settings.max_tokens, self.model.config.max_position_embeddings - len(ids))
        outcome.prompt_tokens = len(ids)
        parser = OutputParser(request.open_thinking, parse_tools=bool(request.tools))
        stop = StopMatcher(request.stop)
        decoder = self.tokenizer.stream_decoder(skip_special_tokens=True)
        with self.lock:
            for token in stream_generate(self.model, ids, budget, request.sampling, self.tokenizer.eos_id,
                                         self._generator(request)):
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

    def _generator(self, request: ChatRequest) -> Optional[torch.Generator]:
        """A seeded random generator on the model's device when the request gives a ``seed``."""
        if request.seed is None:
            return None
        return torch.Generator(device=next(self.model.parameters()).device).manual_seed(request.seed)

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
        request = parse_chat_request(self._read_body(), engine.settings)
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
    allow_tokenizer_mismatch: bool = False,
    preset: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8998,
    api_key: str | None = None,
    model_name: str = "minimind",
    temperature: float = DEFAULT.temperature,
    top_p: float = DEFAULT.top_p,
    top_k: int = DEFAULT.top_k,
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
        allow_tokenizer_mismatch: Use ``--tokenizer`` (or the recorded folder) even when it is not the tokenizer
            the checkpoint was trained with (checkpoints record its fingerprint): a warning instead of an error.
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
    checkpoint = open_checkpoint(ckpt, lora)
    model = checkpoint.build_model(preset, merge=True, device=device)  # adapters folded in: faster
    settings = ServerSettings(SamplingSettings(temperature=temperature, top_p=top_p, top_k=top_k),
                              max_tokens=max_tokens, max_tokens_limit=max_tokens_limit)
    engine = ChatEngine(model, checkpoint.tokenizer(tokenizer, allow_tokenizer_mismatch), model_name=model_name,
                        settings=settings)
    server = make_server(engine, host, port, api_key=api_key, max_body_bytes=max_body_bytes)
    print(f"serving {ckpt} as {model_name!r} on http://{host}:{server.server_address[1]}/ "
          f"(OpenAI API at /v1, web chat at /); Ctrl-C stops")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
