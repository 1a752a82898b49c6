"""The ``serve`` command line: build the engine from a checkpoint and run the server."""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Optional

from minimind_pl.checkpoints import open_checkpoint
from minimind_pl.commands.serve.engine import ChatEngine
from minimind_pl.commands.serve.requests import DEFAULT, ServerSettings
from minimind_pl.errors import UserError
from minimind_pl.generation import SamplingSettings

API_KEY_VARIABLE = "MINIMIND_API_KEY"


def require_serve_extra() -> None:
    """A clear error when FastAPI or uvicorn is missing."""
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"serve needs {' and '.join(missing)}: pip install -e \".[serve]\"")


def names(value: list[str] | str | None) -> list[str]:
    """A list argument given as a list or as one comma-separated string."""
    items = value.split(",") if isinstance(value, str) else value or []
    return [item.strip() for item in items if item.strip()]


def exposure_warning(host: str, api_key: Optional[str]) -> Optional[str]:
    """The warning for binding beyond loopback without an API key, or None."""
    from minimind_pl.commands.serve.app import is_loopback

    if api_key or is_loopback(host):
        return None
    return (f"warning: serving on {host} without an API key: anyone who can reach this port can use the model. "
            f"Set {API_KEY_VARIABLE} (or --api_key) to require one.")


def serve_command(
    ckpt: str,
    lora: str | None = None,
    tokenizer: str | None = None,
    allow_tokenizer_mismatch: bool = False,
    preset: str | None = None,
    vision_encoder: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8998,
    api_key: str | None = None,
    model_name: str = "minimind",
    temperature: float = DEFAULT.temperature,
    top_p: float = DEFAULT.top_p,
    top_k: int = DEFAULT.top_k,
    max_tokens: int = 1024,
    max_tokens_limit: int = 8192,
    max_body_bytes: int = 16 << 20,
    device: str = "auto",
    max_batch_size: int = 8,
    max_queue: int = 64,
    request_timeout: float = 600.0,
    stream_interval: float = 0.02,
    cors_origins: list[str] | str | None = None,
    allowed_hosts: list[str] | str | None = None,
    access_log: bool = True,
    inference_rope_scaling: bool = False,
    allow_image_urls: bool = False,
    max_image_bytes: int = 10 << 20,
    max_image_pixels: int = 50_000_000,
    image_fetch_timeout: float = 10.0,
) -> None:
    """Serve a model: OpenAI-compatible API under /v1, web chat at /, docs at /docs (pip install -e ".[serve]").

    Args:
        ckpt: A Lightning .ckpt of any stage, a MiniMind .pth or a Hugging Face directory.
        lora: A LoRA adapter file to apply on top of the weights.
        tokenizer: Tokenizer directory (default: the one recorded with the checkpoint).
        allow_tokenizer_mismatch: Use ``--tokenizer`` (or the recorded folder) even when it is not the tokenizer
            the checkpoint was trained with (checkpoints record its fingerprint): a warning instead of an error.
        preset: Model preset of a MiniMind .pth (default: read from the tensor shapes).
        vision_encoder: The vision tower folder of a MiniMind-V checkpoint (SigLIP / CLIP, Hugging Face format;
            default: the one its stage checkpoint recorded); then chat requests may hold ``image_url`` parts.
        host: Address to bind; the default serves this machine only. Use 0.0.0.0 to serve the network (then set
            an API key).
        port: TCP port.
        api_key: If set, clients must send ``Authorization: Bearer <api_key>``. Better given as the environment
            variable MINIMIND_API_KEY (an argument is visible to every user in ``ps``).
        model_name: The model id the API reports.
        temperature: Default temperature for requests that give none (0 = greedy).
        top_p: Default nucleus threshold.
        top_k: Default top-k (requests may send ``top_k``).
        max_tokens: Default answer length in tokens.
        max_tokens_limit: Largest ``max_tokens`` a request may ask for.
        max_body_bytes: Largest accepted request body (images come inside it, base64-encoded).
        device: ``auto``, ``cpu`` or ``cuda``.
        max_batch_size: Most requests decoded together (continuous batching: requests join and leave between
            steps).
        max_queue: Most requests waiting for a place in the batch; beyond, clients get 429.
        request_timeout: Seconds a request may take, waiting included; its generation then stops (504, or an
            error event when streaming).
        stream_interval: Least seconds between two hand-overs of new tokens to the server's event loop (a
            streamed event then carries the tokens of several decode steps: less work per token around the
            model, at most this much added latency); 0: every step's tokens at once.
        cors_origins: Origins whose web pages may call the API (CORS), comma-separated or a list, e.g.
            ``http://localhost:3000``; ``*`` allows any. Without an API key, other origins are refused.
        allowed_hosts: Host names clients may use besides localhost and IP addresses (checked without an API key,
            against DNS rebinding), comma-separated or a list, e.g. ``myserver.lan``.
        access_log: Log one line per request.
        inference_rope_scaling: YaRN RoPE scaling (MiniMind's settings) for prompts beyond the trained length.
        allow_image_urls: Fetch ``http(s)`` image URLs that requests send (default: refused with a 400, only
            ``data:`` URLs are read; the server fetches nothing on a client's behalf).
        max_image_bytes: Largest image in bytes, encoded.
        max_image_pixels: Most pixels an image may declare (read from its header: a decompression bomb is
            refused before it is decoded).
        image_fetch_timeout: Seconds a fetched image (``--allow_image_urls``) may take.
    """
    require_serve_extra()
    from minimind_pl.commands.serve.app import make_server

    if max_batch_size < 1 or max_queue < 0 or request_timeout <= 0 or stream_interval < 0:
        raise UserError(f"--max_batch_size must be >= 1, --max_queue >= 0, --request_timeout > 0 and "
                        f"--stream_interval >= 0, got {max_batch_size}, {max_queue}, {request_timeout}, "
                        f"{stream_interval}")
    api_key = api_key or os.environ.get(API_KEY_VARIABLE) or None
    checkpoint = open_checkpoint(ckpt, lora)
    model = checkpoint.build_model(preset, merge=True, device=device,  # adapters folded in: faster
                                   inference_rope_scaling=inference_rope_scaling, vision_encoder=vision_encoder)
    settings = ServerSettings(SamplingSettings(temperature=temperature, top_p=top_p, top_k=top_k),
                              max_tokens=max_tokens, max_tokens_limit=max_tokens_limit, max_batch_size=max_batch_size,
                              max_queue=max_queue, request_timeout=request_timeout, stream_interval=stream_interval,
                              allow_image_urls=allow_image_urls,
                              max_image_bytes=max_image_bytes, max_image_pixels=max_image_pixels,
                              image_fetch_timeout=image_fetch_timeout)
    engine = ChatEngine(model, checkpoint.tokenizer(tokenizer, allow_tokenizer_mismatch), model_name=model_name,
                        settings=settings)
    server = make_server(engine, host, port, api_key=api_key, max_body_bytes=max_body_bytes,
                         cors_origins=names(cors_origins), allowed_hosts=names(allowed_hosts), access_log=access_log)
    warning = exposure_warning(host, api_key)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    print(f"serving {ckpt} as {model_name!r} on http://{host}:{server.server_address[1]}/ "
          f"(OpenAI API at /v1, docs at /docs, web chat at /); Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
