"""The model behind the API: renders prompts, runs them through the batch scheduler and builds OpenAI's
response objects (``chat.completion``, ``chat.completion.chunk``, ``text_completion``).

Answers split ``<think>`` blocks into ``reasoning_content`` and, when the request sent ``tools``,
``<tool_call>`` blocks into ``tool_calls``. Everything here that waits is ``async``: tokens come from the
decode thread through an ``asyncio.Queue``, so one event loop serves every client.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional

import torch

from minimind_pl.chat_format import OutputParser, StopMatcher
from minimind_pl.commands.images import expanded_conversation, image_problem
from minimind_pl.commands.serve.images import read_images
from minimind_pl.commands.serve.requests import APIError, ChatRequest, GenerationRequest, ServerSettings
from minimind_pl.commands.serve.scheduler import END, BatchScheduler, Job, QueueFull, RequestTimeout
from minimind_pl.errors import UserError
from minimind_pl.model import MiniMindForCausalLM
from minimind_pl.tokenizer import Tokenizer


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


class PlainText:
    """The parser of ``/v1/completions`` output: all of it is content."""

    def feed(self, text: str) -> list[tuple[str, Any]]:
        """Events for a piece of text."""
        return [("content", text)] if text else []

    def finish(self) -> list[tuple[str, Any]]:
        """Nothing is held back."""
        return []


class TokenStream:
    """The tokens of one submitted request, read with ``async for`` in lists (all that arrived since the last
    read: one token while the event loop keeps up with the decoder, more when it falls behind); ``close()`` stops
    its generation."""

    def __init__(self, scheduler: BatchScheduler, job: Job, queue: asyncio.Queue) -> None:
        """Wrap a job already submitted to ``scheduler`` whose ``emit`` feeds ``queue``."""
        self.scheduler, self.job, self.queue = scheduler, job, queue

    def __aiter__(self) -> AsyncIterator[list[int]]:
        """Lists of token ids until the request ends; an error of the decode thread is raised here."""
        return self._tokens()

    async def _tokens(self) -> AsyncIterator[list[int]]:
        try:
            while True:
                items = [await self.queue.get()]
                while not self.queue.empty():
                    items.append(self.queue.get_nowait())
                tokens = [item for item in items if isinstance(item, int)]
                if tokens:
                    yield tokens
                if len(tokens) < len(items):  # the request ended: END or an error after the tokens
                    end = next(item for item in items if not isinstance(item, int))
                    if isinstance(end, RequestTimeout):
                        raise APIError(504, str(end), code="timeout", kind="timeout_error")
                    if isinstance(end, BaseException):
                        raise end
                    return
        finally:
            self.close()

    def close(self) -> None:
        """Cancel the generation (harmless once it has ended)."""
        self.scheduler.cancel(self.job)


class ChatEngine:
    """The model, its tokenizer and the batch scheduler: turns requests into OpenAI answers."""

    def __init__(self, model: MiniMindForCausalLM, tokenizer: Tokenizer, model_name: str = "minimind",
                 settings: ServerSettings = ServerSettings()) -> None:
        """Args:
            model: The transformer (eval mode, on its device).
            tokenizer: Its tokenizer (chat template included).
            model_name: The id ``/v1/models`` lists and answers carry.
            settings: Defaults and limits for generation, the batch and the queue.
        """
        self.model, self.tokenizer, self.model_name, self.settings = model, tokenizer, model_name, settings
        self.scheduler = BatchScheduler(model, tokenizer.eos_id, settings.max_batch_size, settings.max_queue,
                                        settings.stream_interval)

    def close(self) -> None:
        """Stop the decode thread."""
        self.scheduler.close()

    # ------------------------------------------------------------------ prompts and tokens
    async def read_images(self, request: GenerationRequest) -> None:
        """Read a chat request's images into ``request.pixel_values`` (decoding off the event loop); 400 when the
        model reads no images or an image is refused (see ``serve.images``)."""
        if not isinstance(request, ChatRequest) or not request.images:
            return
        problem = image_problem(self.model)
        if problem is not None:
            raise APIError(400, f"{request.images[0].param}: {problem}", param=request.images[0].param,
                           code="images_not_supported")
        request.pixel_values = await asyncio.to_thread(read_images, self.model, request.images, self.settings)

    def chat_prompt(self, request: ChatRequest) -> list[int]:
        """Render and tokenize the conversation (its ``<image>`` tags as the model's placeholders); 400 if the
        template rejects it, tags and images disagree, or it does not fit."""
        try:
            messages = expanded_conversation(self.model, request.messages, len(request.images), "messages")
            ids = self.tokenizer.encode_chat(messages, open_thinking=request.open_thinking, tools=request.tools)
        except (ValueError, UserError) as err:
            raise APIError(400, f"cannot render the conversation: {err}", param="messages") from err
        return self._fitting(ids, request, "messages")

    def text_prompt(self, request: GenerationRequest) -> list[int]:
        """Tokenize a plain-text prompt as pretraining saw text: ``<bos>`` then the text."""
        return self._fitting(self.tokenizer.encode_text(request.prompt), request, "prompt")

    def _fitting(self, ids: list[int], request: GenerationRequest, param: str) -> list[int]:
        """``ids``, or a 400 when they and ``max_tokens`` exceed the model's context."""
        context = self.model.config.max_position_embeddings
        wanted = request.max_tokens or 1
        if len(ids) + wanted > context:
            raise APIError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({wanted}) exceeds the model's "
                           f"context of {context} tokens", param=param, code="context_length_exceeded")
        return ids

    def budget(self, request: GenerationRequest, ids: list[int]) -> int:
        """Tokens the answer may have: the request's ``max_tokens`` or the server's default, within the context."""
        return request.max_tokens or min(self.settings.max_tokens, self.model.config.max_position_embeddings - len(ids))

    def submit(self, request: GenerationRequest, ids: list[int]) -> TokenStream:
        """Queue the generation (429 when the queue is full); call from the event loop."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        job = Job(ids, self.budget(request, ids), request.sampling, emit=queue.put_nowait, loop=loop,
                  generator=self._generator(request), deadline=time.monotonic() + self.settings.request_timeout,
                  images=getattr(request, "pixel_values", None))
        try:
            self.scheduler.submit(job)
        except QueueFull as err:
            raise APIError(429, f"the server is busy ({err}); try again later", code="queue_full",
                           kind="rate_limit_error") from err
        return TokenStream(self.scheduler, job, queue)

    def _generator(self, request: GenerationRequest) -> Optional[torch.Generator]:
        """A seeded random generator on the model's device when the request gives a ``seed``."""
        if request.seed is None:
            return None
        return torch.Generator(device=next(self.model.parameters()).device).manual_seed(request.seed)

    async def events(self, request: GenerationRequest, tokens: TokenStream, outcome: Outcome, parser: Any
                     ) -> AsyncIterator[tuple[str, Any]]:
        """Parsed ``(kind, value)`` events of a generation; ``outcome`` collects them and the counts."""
        outcome.prompt_tokens = len(tokens.job.prompt)
        stop = StopMatcher(request.stop)
        decoder = self.tokenizer.stream_decoder(skip_special_tokens=True)
        iterator = tokens.__aiter__()
        try:
            async for arrived in iterator:
                pieces = []
                for token in arrived:
                    outcome.completion_tokens += 1
                    pieces.append(stop.feed(decoder.push(token)))
                    if stop.stopped:
                        break
                for event in self._record(parser.feed("".join(pieces)), outcome):
                    yield event
                if stop.stopped:
                    break
        finally:
            await iterator.aclose()  # a stop string or a client that left ends the generation at once
        if not stop.stopped:
            for event in self._record(parser.feed(stop.feed(decoder.flush()) + stop.flush()), outcome):
                yield event
            outcome.finish_reason = "length" if outcome.completion_tokens >= tokens.job.max_new_tokens else "stop"
        for event in self._record(parser.finish(), outcome):
            yield event
        if outcome.tool_calls:
            outcome.finish_reason = "tool_calls"

    @staticmethod
    def _record(events: list[tuple[str, Any]], outcome: Outcome) -> list[tuple[str, Any]]:
        """Add events to the outcome and pass them on."""
        parts = {"reasoning": outcome.reasoning, "content": outcome.content, "tool_call": outcome.tool_calls}
        for kind, value in events:
            parts[kind].append(value)
        return events

    def _start(self, request: GenerationRequest) -> tuple[TokenStream, Any]:
        """Prompt checked and generation queued (4xx here, before any answer is sent) plus its output parser."""
        if isinstance(request, ChatRequest):
            tokens = self.submit(request, self.chat_prompt(request))
            return tokens, OutputParser(request.open_thinking, parse_tools=bool(request.tools))
        return self.submit(request, self.text_prompt(request)), PlainText()

    # ------------------------------------------------------------------ OpenAI response objects
    async def complete(self, request: GenerationRequest) -> dict[str, Any]:
        """A whole ``chat.completion`` (or ``text_completion``) object."""
        tokens, parser = self._start(request)
        outcome = Outcome()
        async for _ in self.events(request, tokens, outcome, parser):
            pass
        if not isinstance(request, ChatRequest):
            choice = {"index": 0, "text": "".join(outcome.content), "finish_reason": outcome.finish_reason,
                      "logprobs": None}
            return {**self._envelope("text_completion"), "choices": [choice], "usage": outcome.usage()}
        message: dict[str, Any] = {"role": "assistant", "content": "".join(outcome.content) or None}
        if outcome.reasoning:
            message["reasoning_content"] = "".join(outcome.reasoning)
        if outcome.tool_calls:
            message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in outcome.tool_calls]
        elif message["content"] is None:
            message["content"] = ""
        choice = {"index": 0, "message": message, "finish_reason": outcome.finish_reason, "logprobs": None}
        return {**self._envelope("chat.completion"), "choices": [choice], "usage": outcome.usage()}

    def stream(self, request: GenerationRequest) -> AsyncIterator[dict[str, Any]]:
        """Streaming chunks: for chat the role, one delta per event, the finish reason and usage if asked; for
        text completions one ``text`` piece per event. The request is checked and queued before this returns."""
        tokens, parser = self._start(request)
        return self._chunks(request, tokens, parser)

    async def _chunks(self, request: GenerationRequest, tokens: TokenStream, parser: Any
                      ) -> AsyncIterator[dict[str, Any]]:
        chat = isinstance(request, ChatRequest)
        outcome = Outcome()
        envelope = self._envelope("chat.completion.chunk" if chat else "text_completion")
        if chat:
            yield _chunk(envelope, {"role": "assistant", "content": ""})
        events = self.events(request, tokens, outcome, parser)
        try:
            async for kind, value in events:
                yield _chunk(envelope, _delta(kind, value)) if chat else _text_chunk(envelope, value)
        finally:
            await events.aclose()  # a client that left mid-answer ends its generation here
        yield _chunk(envelope, {}, outcome.finish_reason) if chat else _text_chunk(envelope, "", outcome.finish_reason)
        if request.include_usage:
            yield {**envelope, "choices": [], "usage": outcome.usage()}

    def _envelope(self, kind: str) -> dict[str, Any]:
        """The fields every response object shares."""
        prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
                "model": self.model_name}

    def models(self) -> dict[str, Any]:
        """The ``/v1/models`` list."""
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": int(time.time()),
                                             "owned_by": "minimind_pl"}]}


def _chunk(envelope: dict[str, Any], delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    """One chat streaming chunk."""
    return {**envelope, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}


def _text_chunk(envelope: dict[str, Any], text: str, finish: str | None = None) -> dict[str, Any]:
    """One text-completion streaming chunk."""
    return {**envelope, "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}


def _delta(kind: str, value: Any) -> dict[str, Any]:
    """A chat streaming delta for one parsed event."""
    if kind == "reasoning":
        return {"reasoning_content": value}
    if kind == "tool_call":
        return {"tool_calls": [value]}
    return {"content": value}
