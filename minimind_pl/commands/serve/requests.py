"""What a client may send: the request bodies of ``/v1/chat/completions`` and ``/v1/completions``, checked
field by field; a bad field is an ``APIError`` (400) that names it, in OpenAI's error shape."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

from minimind_pl.chat_format import IMAGE_TAG, ROLES
from minimind_pl.generation import SamplingSettings

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
        max_batch_size: Most requests decoded together (one step of the model serves them all).
        max_queue: Most requests waiting for a place in the batch; more get 429.
        request_timeout: Seconds a request may take, waiting included; then its generation stops (504).
        stream_interval: Least seconds between two hand-overs of new tokens from the decode thread to the event
            loop: a streamed event then carries the tokens of several steps, and the loop's work per token (which
            competes with decoding for the interpreter) shrinks; 0 hands every step's tokens over.
        allow_image_urls: Fetch ``http(s)`` image URLs (else only ``data:`` URLs are taken: the server fetches
            nothing on a client's behalf).
        max_image_bytes: Largest image, encoded (a data URL's decoded bytes or a fetched body).
        max_image_pixels: Most pixels an image may declare (checked from its header, before decoding).
        image_fetch_timeout: Seconds a fetched image may take.
    """

    sampling: SamplingSettings = DEFAULT
    max_tokens: int = 1024
    max_tokens_limit: int = 8192
    max_batch_size: int = 8
    max_queue: int = 64
    request_timeout: float = 600.0
    stream_interval: float = 0.02
    allow_image_urls: bool = False
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 50_000_000
    image_fetch_timeout: float = 10.0


@dataclass
class ImagePart:
    """An ``image_url`` content part: its URL and where it was in the request (``messages[i].content[j]``)."""

    url: str
    param: str


@dataclass
class GenerationRequest:
    """What every generating request shares (``/v1/completions`` uses exactly this)."""

    prompt: str = ""
    stream: bool = False
    include_usage: bool = False
    max_tokens: Optional[int] = None
    sampling: SamplingSettings = DEFAULT
    stop: list[str] = field(default_factory=list)
    seed: Optional[int] = None


@dataclass
class ChatRequest(GenerationRequest):
    """A validated ``/v1/chat/completions`` request."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    tools: Optional[list] = None
    open_thinking: bool = False
    images: list[ImagePart] = field(default_factory=list)  # in the order of their <image> tags
    pixel_values: Any = None  # (N, 3, H, W) once the engine has read ``images``


def parse_json_body(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise APIError(400, f"request body is not valid JSON: {err}", code="invalid_json") from err
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    return data


def generation_fields(data: dict[str, Any], defaults: ServerSettings) -> dict[str, Any]:
    """The fields both endpoints take (``n``, ``stream``, ``stream_options``, ``max_tokens``, sampling, ``stop``,
    ``seed``), checked."""
    if data.get("n", 1) != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    stream_options = data.get("stream_options") or {}
    return dict(
        stream=_typed(data, "stream", bool, False),
        include_usage=bool(isinstance(stream_options, dict) and stream_options.get("include_usage")),
        max_tokens=parse_max_tokens(data, defaults.max_tokens_limit),
        sampling=parse_sampling(data, defaults.sampling),
        stop=parse_stop(data.get("stop")),
        seed=_typed(data, "seed", int, None),
    )


def parse_chat_request(body: bytes, defaults: ServerSettings) -> ChatRequest:
    """Validate a chat request body; raises ``APIError`` (400) naming the bad field.

    Thinking is asked for by ``open_thinking`` at the top level (MiniMind's own API) or inside
    ``chat_template_kwargs`` (``open_thinking`` or ``enable_thinking``, as vLLM and SGLang take it).
    """
    data = parse_json_body(body)
    kwargs = data.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise APIError(400, "chat_template_kwargs must be an object", param="chat_template_kwargs")
    thinking = _typed(data, "open_thinking", bool, None)
    if thinking is None:
        thinking = bool(kwargs.get("open_thinking", kwargs.get("enable_thinking", False)))
    images: list[ImagePart] = []
    return ChatRequest(messages=parse_messages(data.get("messages"), images), tools=_typed(data, "tools", list, None),
                       open_thinking=thinking, images=images, **generation_fields(data, defaults))


def parse_completion_request(body: bytes, defaults: ServerSettings) -> GenerationRequest:
    """Validate a ``/v1/completions`` body: ``prompt`` is a string (or a list holding one string)."""
    data = parse_json_body(body)
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise APIError(400, "prompt must be a non-empty string (one prompt per request)", param="prompt")
    return GenerationRequest(prompt=prompt, **generation_fields(data, defaults))


def parse_sampling(data: dict[str, Any], defaults: SamplingSettings) -> SamplingSettings:
    """The request's sampling fields, each checked against its range, over the server's defaults."""
    return SamplingSettings(
        temperature=_number(data, "temperature", defaults.temperature, 0.0, 2.0),
        top_p=_number(data, "top_p", defaults.top_p, 1e-6, 1.0),
        top_k=int(_number(data, "top_k", defaults.top_k, 0, 1e9, integer=True)),
        repetition_penalty=_number(data, "repetition_penalty", defaults.repetition_penalty, 1e-3, 10.0),
    )


def parse_messages(messages: Any, images: Optional[list[ImagePart]] = None) -> list[dict[str, Any]]:
    """Check roles and flatten OpenAI content parts (``[{"type": "text", "text": ...}]``) to strings; an
    ``image_url`` part becomes ``<image>`` in the text and its URL goes to ``images``, in order."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise APIError(400, f"messages[{i}] must be an object", param=f"messages[{i}]")
        if message.get("role") not in ROLES:
            raise APIError(400, f"messages[{i}].role must be one of {list(ROLES)}, got {message.get('role')!r}",
                           param=f"messages[{i}].role")
        out.append({**message, "content": _content_text(message.get("content"), i, images)})
    return out


def _content_text(content: Any, index: int, images: Optional[list[ImagePart]]) -> str:
    """A message's content as text (None -> ''; an image part -> ``<image>``, its URL appended to ``images``)."""
    if content is None or isinstance(content, str):
        return content or ""
    kinds = ("text", "image_url") if images is not None else ("text",)
    if not isinstance(content, list) or not all(isinstance(p, dict) and p.get("type") in kinds for p in content):
        raise APIError(400, f"messages[{index}].content must be a string or a list of "
                       f"{' and '.join(kinds)} parts", param=f"messages[{index}].content")
    texts = []
    for j, part in enumerate(content):
        if part["type"] == "text":
            texts.append(str(part.get("text", "")))
            continue
        image_url = part.get("image_url")
        url = image_url.get("url") if isinstance(image_url, dict) else image_url
        param = f"messages[{index}].content[{j}]"
        if not isinstance(url, str) or not url:
            raise APIError(400, f"{param}.image_url.url must be a non-empty string", param=f"{param}.image_url")
        images.append(ImagePart(url, param))
        texts.append(IMAGE_TAG)
    return "".join(texts)


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


