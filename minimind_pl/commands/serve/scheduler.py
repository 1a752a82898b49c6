"""Continuous batching: one thread owns the model and decodes every running request in the same step.

Requests wait in a bounded queue. At each step boundary the thread admits waiting requests into the batch
(their prompts, and a vision-language model's images, are prefilled together and their KV caches join the
batch's, `generation.DecodeBatch`), picks
the next token of every row with that request's own sampling settings and generator (one set of tensor ops for
the whole batch, `generation.sample_batch`; the per-row settings become tensors only when rows join or leave),
hands each token to its request, and lets rows leave when they end: end of sequence, their token budget, their deadline, or a
cancellation (the client left, or a stop string matched). A request's tokens are what it would get alone
(greedy decoding gives the same answer batched or not).

Tokens for requests served by an event loop go there in hand-overs (`Mailbox`): the tokens of every row in one
``call_soon_threadsafe``, at most one hand-over waiting in the loop, and one at most every ``stream_interval``
seconds (an end, END or an error, goes at once). So the loop wakes at most once per step and, as the decoder
outpaces it or the interval spans several steps, gets several steps' tokens at once, which the server sends as
one event per client: the loop's per-token work (which holds the interpreter the decode thread needs) shrinks.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from minimind_pl.generation import DecodeBatch, RowSampling, SamplingSettings, inference_step, sample_batch


class QueueFull(Exception):
    """The waiting queue holds its maximum of requests."""


class RequestTimeout(Exception):
    """A request ran past its deadline; its generation was stopped."""


END = object()  # emitted after a request's last token


@dataclass(eq=False)
class Job:
    """One request's generation.

    Args:
        prompt: Prompt token ids (at least one).
        max_new_tokens: Most tokens to produce.
        sampling: How its tokens are chosen.
        emit: Called from the decode thread with each token id, then ``END``, or an exception instead.
        generator: Random generator on the model's device (a request's ``seed``), or None.
        deadline: ``time.monotonic()`` by which it must end, or None.
        images: Its images (N, 3, H, W) for a vision-language model, entering at its prefill; or None.
        loop: The event loop ``emit`` belongs to (then it is called there, in a hand-over of many tokens, see
            the module's docstring); None: called in the decode thread.
    """

    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingSettings
    emit: Callable[[Any], None]
    generator: Optional[torch.Generator] = None
    deadline: Optional[float] = None
    images: Optional[torch.Tensor] = None
    loop: Optional[asyncio.AbstractEventLoop] = field(default=None, repr=False)
    produced: int = 0
    cancelled: bool = field(default=False, repr=False)

    def expired(self, now: float) -> bool:
        """True once the deadline has passed."""
        return self.deadline is not None and now > self.deadline


@dataclass
class Mailbox:
    """What waits to be handed over to one event loop."""

    items: list[tuple[Job, Any]] = field(default_factory=list)
    scheduled: bool = False  # a hand-over is queued in the loop
    urgent: bool = False  # an end (END or an error) waits: hand over at once
    last: float = float("-inf")  # time.monotonic() of the last hand-over scheduled


class BatchScheduler:
    """Admits requests into a running batch at step boundaries and decodes them together (one thread)."""

    def __init__(self, model: nn.Module, eos_id: Optional[int], max_batch_size: int = 8, max_queue: int = 64,
                 stream_interval: float = 0.0) -> None:
        """Args:
            model: The model (eval mode, on its device); only the decode thread uses it.
            eos_id: The token that ends a sequence (never emitted).
            max_batch_size: Most requests decoded together.
            max_queue: Most requests waiting for a place; ``submit`` raises ``QueueFull`` beyond.
            stream_interval: Least seconds between two hand-overs of tokens to an event loop (0: every step).
        """
        if max_batch_size < 1 or max_queue < 0:
            raise ValueError(f"max_batch_size must be >= 1 and max_queue >= 0, got {max_batch_size}, {max_queue}")
        self.model, self.eos_id = model, eos_id
        self.max_batch_size, self.max_queue, self.stream_interval = max_batch_size, max_queue, stream_interval
        self.condition = threading.Condition()
        self.waiting: deque[Job] = deque()
        self.active: list[Job] = []  # the rows of `batch`, in order
        self.batch: Optional[DecodeBatch] = None
        self.rows: Optional[RowSampling] = None  # the sampling settings of `active`, rebuilt when it changes
        self.mailboxes: dict[asyncio.AbstractEventLoop, Mailbox] = {}
        self.mailbox_lock = threading.Lock()
        self.steps = 0  # decode steps run so far
        self.thread: Optional[threading.Thread] = None
        self.closed = False

    def submit(self, job: Job) -> None:
        """Queue a request; raises ``QueueFull`` when ``max_queue`` requests already wait."""
        with self.condition:
            if self.closed:
                raise RuntimeError("the scheduler is closed")
            if len(self.waiting) >= self.max_queue and len(self.active) + len(self.waiting) >= self.max_batch_size:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting")
            self.waiting.append(job)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="minimind-decode", daemon=True)
                self.thread.start()
            self.condition.notify()

    def cancel(self, job: Job) -> None:
        """Stop a request's generation at the next step boundary (nothing more is emitted)."""
        job.cancelled = True

    def close(self) -> None:
        """Stop the decode thread; requests still running or waiting get an error."""
        with self.condition:
            self.closed = True
            self.condition.notify()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=30)

    def load(self) -> tuple[int, int]:
        """(requests decoding, requests waiting)."""
        with self.condition:
            return len(self.active), len(self.waiting)

    # ------------------------------------------------------------------ the decode thread
    def _run(self) -> None:
        """Admit, decode one step, repeat; sleeps while there is nothing to do."""
        while True:
            with self.condition:
                while not self.closed and not self.waiting and not self.active:
                    self.condition.wait()
                if self.closed:
                    self._fail(list(self.waiting) + self.active, RuntimeError("the server is shutting down"))
                    return
                arrivals = self._admit()
            if not arrivals and not self.active:
                continue  # the waiting requests were cancelled or timed out
            try:
                self._step(arrivals)
            except Exception as err:  # noqa: BLE001 - a failed step ends its requests, not the server
                self._fail(self.active + [j for j in arrivals if j not in self.active], err)
                self.active, self.batch, self.rows = [], None, None

    def _admit(self) -> list[Job]:
        """Take waiting requests into free batch places (those cancelled or past their deadline leave)."""
        now, arrivals = time.monotonic(), []
        for job in list(self.waiting):
            if job.cancelled or job.expired(now):
                self.waiting.remove(job)
                if not job.cancelled:
                    self._deliver([(job, RequestTimeout("the request timed out waiting for a place in the batch"))])
            elif len(self.active) + len(arrivals) < self.max_batch_size:
                self.waiting.remove(job)
                arrivals.append(job)
        return arrivals

    def _step(self, arrivals: list[Job]) -> None:
        """Prefill the arrivals into the batch, pick one token per row, hand them out, feed the rows that go on."""
        with inference_step(self.model):
            if arrivals:
                if self.batch is None:
                    self.batch = DecodeBatch(self.model, track_seen=True)
                self.batch.add([job.prompt for job in arrivals], [job.images for job in arrivals])
                with self.condition:
                    self.active = self.active + arrivals
                self.rows = None
            batch = self.batch
            if self.rows is None:
                self.rows = RowSampling.of([j.sampling for j in self.active], batch.logits.shape[-1], batch.device,
                                           [j.generator for j in self.active])
            tokens = sample_batch(batch.logits, batch.seen, self.rows).tolist()
            handed: list[tuple[Job, Any]] = []
            now = time.monotonic()
            going_on = [i for i, (job, token) in enumerate(zip(self.active, tokens))
                        if self._hand_out(job, token, now, handed)]
            self._deliver(handed)
            if len(going_on) < len(self.active):
                batch.keep(going_on)
                with self.condition:
                    self.active = [self.active[i] for i in going_on]
                self.rows = None
            if going_on:
                batch.feed(torch.tensor([tokens[i] for i in going_on]))
            self.steps += 1

    def _hand_out(self, job: Job, token: int, now: float, handed: list[tuple[Job, Any]]) -> bool:
        """Add what ``job`` gets for ``token`` to ``handed``; False when the request ends here."""
        if job.cancelled:
            return False
        if token == self.eos_id:
            handed.append((job, END))
            return False
        handed.append((job, token))
        job.produced += 1
        if job.produced >= job.max_new_tokens:
            handed.append((job, END))
            return False
        if job.expired(now):
            handed.append((job, RequestTimeout(f"the request ran past its time limit after {job.produced} tokens")))
            return False
        return True

    def _fail(self, jobs: list[Job], err: BaseException) -> None:
        """End every job with ``err``."""
        self._deliver([(job, err) for job in jobs if not job.cancelled])

    def _deliver(self, handed: list[tuple[Job, Any]]) -> None:
        """Call each job's ``emit`` with its item, in order: here for jobs without a loop; for the others, put
        them in their loop's mailbox and schedule its hand-over when it is due (see the module's docstring)."""
        now = time.monotonic()
        with self.mailbox_lock:
            for job, item in handed:
                if job.loop is None:
                    job.emit(item)
                    continue
                mailbox = self.mailboxes.setdefault(job.loop, Mailbox())
                mailbox.items.append((job, item))
                mailbox.urgent = mailbox.urgent or not isinstance(item, int)
            for loop, mailbox in self.mailboxes.items():
                if mailbox.items and not mailbox.scheduled and (
                        mailbox.urgent or now - mailbox.last >= self.stream_interval):
                    mailbox.scheduled, mailbox.last = True, now
                    loop.call_soon_threadsafe(self._hand_over, mailbox)

    def _hand_over(self, mailbox: Mailbox) -> None:
        """In the mailbox's loop: emit everything in it."""
        with self.mailbox_lock:
            handed, mailbox.items, mailbox.scheduled, mailbox.urgent = mailbox.items, [], False, False
        for job, item in handed:
            job.emit(item)
