"""``python main.py serve``: an OpenAI-compatible API and a web chat page, on FastAPI + uvicorn.

``requests`` checks what clients send, ``scheduler`` decodes the running requests together (continuous
batching, one thread owns the model), ``engine`` turns requests into OpenAI answers, ``app`` is the HTTP side
(routes, protection, the server) and ``command`` the command line. FastAPI and uvicorn are the ``serve`` extra;
everything but ``app`` imports without them.
"""

from __future__ import annotations

from typing import Any

from minimind_pl.commands.serve.command import serve_command
from minimind_pl.commands.serve.engine import ChatEngine, Outcome
from minimind_pl.commands.serve.requests import APIError, ChatRequest, GenerationRequest, ServerSettings

__all__ = ["APIError", "ChatEngine", "ChatRequest", "GenerationRequest", "Outcome", "ServerSettings", "make_server",
           "serve_command"]


def __getattr__(name: str) -> Any:
    """``make_server`` / ``create_app`` load FastAPI on first use (the ``serve`` extra)."""
    if name in ("make_server", "create_app", "APIServer"):
        from minimind_pl.commands.serve import app

        return getattr(app, name)
    raise AttributeError(name)
