"""The HTTP side: a FastAPI application served by uvicorn.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (streaming over server-sent events, ending
with ``data: [DONE]``, or one JSON answer), ``GET /v1/models``, ``GET /health``, ``GET /`` (the web page,
``commands/serve/chat.html``) and ``/docs`` (the OpenAPI schema, interactive). Every error is an OpenAI-style
body (``{"error": {"message", "type", "param", "code"}}``).

Protection, outermost first: `OriginGuard` (without an API key, only loopback or IP-literal ``Host`` names,
or ``allowed_hosts``, and only same-origin or ``cors_origins`` browsers: a web page cannot drive the model,
DNS rebinding included), CORS (``cors_origins``: Starlette's middleware answers preflights), the API key
(``Authorization: Bearer``, compared in constant time), a body-size limit, the scheduler's bounded queue (429)
and per-request time limit (504). A client that disconnects ends its generation, streaming or not.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import socket
import threading
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Optional, Sequence
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from minimind_pl.commands.serve.engine import ChatEngine
from minimind_pl.commands.serve.requests import APIError, parse_chat_request, parse_completion_request

WEB_PAGE = Path(__file__).parent / "chat.html"
LOOPBACK_NAMES = ("localhost",)


# ============================================================================ request checks


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.strip("[]").lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(host_header: str) -> str:
    """The name in a ``Host`` header, without the port (``[::1]:80`` -> ``::1``)."""
    return (urlsplit("//" + host_header).hostname or "").lower()


class OriginGuard:
    """Refuses (403) requests a foreign web page could make when no API key protects the server.

    DNS rebinding points a foreign name at this address, so the ``Host`` a browser sends is that name: only
    ``localhost``, IP literals and ``allowed_hosts`` pass. A cross-site request carries an ``Origin`` other
    than the server's own: only same-origin pages and ``cors_origins`` pass.
    """

    def __init__(self, app: ASGIApp, allowed_hosts: Sequence[str] = (), cors_origins: Sequence[str] = ()) -> None:
        """Args:
            app: The application behind.
            allowed_hosts: Further host names clients may use (``Host`` header).
            cors_origins: Origins whose pages may call the API (``*``: any).
        """
        self.app = app
        self.allowed_hosts = {h.lower() for h in allowed_hosts}
        self.cors_origins = {o.rstrip("/").lower() for o in cors_origins}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer 403 for a refused request; pass the rest on."""
        if scope["type"] == "http":
            problem = self.problem(Headers(scope=scope))
            if problem:
                await JSONResponse(APIError(403, problem, code="forbidden_origin", kind="permission_error").body(),
                                   status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def problem(self, headers: Headers) -> Optional[str]:
        """Why a request is refused, or None."""
        host = headers.get("host", "")
        name = host_name(host)
        if not self._host_allowed(name):
            return (f"Host {host!r} is not served without an API key (DNS rebinding protection); use localhost or "
                    "the IP address, start the server with --allowed_hosts, or set an API key")
        origin = headers.get("origin")
        if origin is None or "*" in self.cors_origins or origin.rstrip("/").lower() in self.cors_origins:
            return None
        if urlsplit(origin).netloc.lower() != host.lower():
            return (f"cross-origin request from {origin!r} refused; allow it with --cors_origins, or set an API key")
        return None

    def _host_allowed(self, name: str) -> bool:
        if name in self.allowed_hosts or is_loopback(name):
            return True
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return False


def authorize(request: Request, api_key: Optional[str]) -> None:
    """401 unless the API key (when one is set) comes as a bearer token; compared in constant time."""
    if not api_key:
        return
    sent = request.headers.get("authorization", "").encode("utf-8")
    if not hmac.compare_digest(sent, f"Bearer {api_key}".encode("utf-8")):
        raise APIError(401, "invalid or missing API key (Authorization: Bearer ...)", code="invalid_api_key",
                       kind="authentication_error")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body; 413 beyond ``limit`` bytes (by its ``Content-Length`` or as it arrives)."""
    length = request.headers.get("content-length")
    too_large = APIError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_large
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise too_large
    return bytes(body)


# ============================================================================ OpenAPI documentation


class ChatCompletionBody(BaseModel):
    """``POST /v1/chat/completions`` (OpenAI's fields; others are ignored). Documentation only: the body is
    checked by ``requests.parse_chat_request``, whose errors name the field in OpenAI's shape."""

    model_config = ConfigDict(extra="allow")
    model: Optional[str] = None
    messages: list[dict[str, Any]]
    stream: bool = False
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    repetition_penalty: Optional[float] = None
    stop: Optional[list[str] | str] = None
    seed: Optional[int] = None
    tools: Optional[list[dict[str, Any]]] = None
    open_thinking: Optional[bool] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None


class CompletionBody(BaseModel):
    """``POST /v1/completions``: continue plain text (pretrained checkpoints). Documentation only."""

    model_config = ConfigDict(extra="allow")
    model: Optional[str] = None
    prompt: str
    stream: bool = False
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    repetition_penalty: Optional[float] = None
    stop: Optional[list[str] | str] = None
    seed: Optional[int] = None


def documented_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` that documents a JSON body the route reads itself."""
    schema = model.model_json_schema()
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


# ============================================================================ the application


def create_app(engine: ChatEngine, api_key: Optional[str] = None, cors_origins: Sequence[str] = (),
               allowed_hosts: Sequence[str] = (), max_body_bytes: int = 1 << 20) -> FastAPI:
    """The FastAPI application around ``engine`` (see the module doc for the settings)."""
    app = FastAPI(title="minimind_pl", version="1", summary="OpenAI-compatible API of a MiniMind model",
                  description="Chat and text completions with streaming; requests decode together (continuous "
                              "batching). See the project README, section serve.")
    _add_error_handlers(app)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"])
    if not api_key:
        app.add_middleware(OriginGuard, allowed_hosts=allowed_hosts, cors_origins=cors_origins)

    page = WEB_PAGE.read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False)
    @app.get("/index.html", include_in_schema=False)
    @app.get("/chat", include_in_schema=False)
    def web_page() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health", summary="Liveness")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models", summary="The served model")
    def models(request: Request) -> dict[str, Any]:
        authorize(request, api_key)
        return engine.models()

    routes = (("/v1/chat/completions", "Chat completion (OpenAI)", parse_chat_request, ChatCompletionBody),
              ("/v1/completions", "Text completion (OpenAI legacy)", parse_completion_request, CompletionBody))
    for path, summary, parse, documented in routes:
        app.add_api_route(path, generation_route(engine, parse, api_key, max_body_bytes), methods=["POST"],
                          summary=summary, openapi_extra=documented_body(documented))

    return app


def generation_route(engine: ChatEngine, parse: Callable[[bytes, Any], Any], api_key: Optional[str],
                     max_body_bytes: int) -> Callable[[Request], Awaitable[Response]]:
    """The handler of a generating endpoint: key, body, ``parse`` (the endpoint's checks), answer."""

    async def handle(request: Request) -> Response:
        authorize(request, api_key)
        body = parse(await read_body(request, max_body_bytes), engine.settings)
        await engine.read_images(body)
        return await answer(engine, request, body)

    return handle


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape: ours, Starlette's (404, 405) and anything unexpected (500)."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> Response:
        headers = getattr(err, "headers", None) or {}
        if err.status_code == 405 and request.method == "OPTIONS":
            # an existing route without CORS configured: say which methods it takes, grant no cross-origin access
            return Response(status_code=204, headers={"Allow": headers.get("Allow", "") + ", OPTIONS"})
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        message = f"no route {request.method} {request.url.path}" if err.status_code == 404 else str(err.detail)
        return JSONResponse(APIError(err.status_code, message, code=code).body(), status_code=err.status_code,
                            headers=headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        return JSONResponse(APIError(500, f"internal error: {type(err).__name__}", kind="server_error").body(),
                            status_code=500)


async def answer(engine: ChatEngine, request: Request, body: Any) -> Response:
    """Stream server-sent events, or wait for the whole answer while watching for the client to leave."""
    if body.stream:
        chunks = engine.stream(body)  # 4xx (prompt, queue) still possible here, before the headers go out
        return StreamingResponse(server_sent_events(chunks), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    work = asyncio.ensure_future(engine.complete(body))
    gone = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not work.done():  # the client left: cancelling ends its generation (TokenStream closes)
        work.cancel()
        return Response(status_code=499)
    return JSONResponse(work.result())


async def wait_for_disconnect(request: Request) -> None:
    """Return once the client has disconnected (the body has been read, so only that message is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def server_sent_events(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    """One ``data:`` event per chunk, an error event if generation fails, then ``data: [DONE]``."""
    try:
        async for chunk in chunks:
            yield _event(chunk)
    except APIError as err:
        yield _event(err.body())
    except Exception as err:  # noqa: BLE001 - headers are out: report inside the stream
        yield _event(APIError(500, f"internal error: {type(err).__name__}", kind="server_error").body())
    finally:
        await chunks.aclose()
    yield b"data: [DONE]\n\n"


def _event(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode("utf-8")


# ============================================================================ the server


class APIServer:
    """uvicorn serving the application on a socket bound at construction (port 0 picks a free one)."""

    def __init__(self, app: FastAPI, engine: ChatEngine, host: str = "127.0.0.1", port: int = 8998,
                 access_log: bool = True) -> None:
        """Args:
            app: The application.
            engine: Its engine (closed with the server).
            host: Address to bind.
            port: TCP port.
            access_log: Log one line per request (uvicorn's access log).
        """
        import uvicorn

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.socket.listen(2048)  # connections wait from now on, before uvicorn runs
        self.server_address = self.socket.getsockname()[:2]
        self.engine = engine
        config = uvicorn.Config(app, access_log=access_log, log_level="info", timeout_graceful_shutdown=3,
                                timeout_keep_alive=5)
        self.uvicorn = uvicorn.Server(config)
        self.stopped = threading.Event()

    def serve_forever(self) -> None:
        """Serve until ``shutdown`` (or Ctrl-C in the main thread)."""
        try:
            self.uvicorn.run(sockets=[self.socket])
        finally:
            self.stopped.set()

    def shutdown(self) -> None:
        """Stop serving and wait for ``serve_forever`` to return."""
        self.uvicorn.should_exit = True
        self.engine.close()  # running generations end, so their connections close
        if self.uvicorn.started:
            self.stopped.wait(timeout=30)

    def server_close(self) -> None:
        """Release the socket and the decode thread."""
        self.engine.close()
        self.socket.close()


def make_server(engine: ChatEngine, host: str = "127.0.0.1", port: int = 8998, api_key: Optional[str] = None,
                max_body_bytes: int = 1 << 20, cors_origins: Sequence[str] = (), allowed_hosts: Sequence[str] = (),
                access_log: bool = True) -> APIServer:
    """Bind the API server (not started: call ``serve_forever``)."""
    app = create_app(engine, api_key=api_key, cors_origins=cors_origins, allowed_hosts=allowed_hosts,
                     max_body_bytes=max_body_bytes)
    return APIServer(app, engine, host, port, access_log=access_log)
