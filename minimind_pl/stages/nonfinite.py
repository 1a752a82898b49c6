"""Skipping optimizer steps whose loss or gradients are not finite, without waiting for the GPU.

A diverging run produces NaN/inf losses; one such step written into the weights ruins them for good. The
stage marks each accumulation window whose loss or global gradient norm is not finite and hands that flag
to fused AdamW as ``found_inf`` (the mechanism ``torch.amp.GradScaler`` uses): the fused kernel then
leaves parameters and moments untouched, all on the device. The host learns how many steps in a row were
skipped one or two steps later, through ``HostMirror``, and the stage stops the run after
``nonfinite_step_limit`` of them.
"""

from __future__ import annotations

import torch


class HostMirror:
    """The newest value of a small device tensor that the device has finished computing, read on the host
    without a GPU->CPU sync.

    ``publish`` starts an asynchronous copy into pinned host memory; ``latest`` returns the last copy that has
    completed, with the tag given when it was published (on CPU the value is read at once).
    """

    def __init__(self) -> None:
        self._host: torch.Tensor | None = None
        self._event = None
        self._pending_tag: object = None
        self.value: list[int] | None = None
        self.tag: object = None

    def publish(self, value: torch.Tensor, tag: object) -> None:
        """Start copying ``value`` (a 1-D integer tensor) to the host, remembering ``tag`` with it."""
        if value.device.type != "cuda":
            self.value, self.tag = value.tolist(), tag
            return
        self._collect()
        if self._event is not None:  # the previous copy is still in flight: skip this one
            return
        if self._host is None or self._host.shape != value.shape:
            self._host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
        self._host.copy_(value, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()
        self._pending_tag = tag

    def latest(self) -> tuple[list[int] | None, object]:
        """The newest completed value and its tag (``(None, None)`` before the first one)."""
        self._collect()
        return self.value, self.tag

    def _collect(self) -> None:
        if self._event is not None and self._event.query():
            self.value, self.tag, self._event = self._host.tolist(), self._pending_tag, None


class NonFiniteSteps:
    """Per optimizer step: was the loss (of any micro-batch) or the gradient norm not finite? Kept on the device.

    ``note_loss`` is called for every micro-batch, ``verdict`` once per optimizer step with the global gradient
    norm; it returns the ``found_inf`` flag for fused AdamW and updates the counts (``skipped``: all steps
    skipped so far; ``in_a_row``: the current run of skipped steps).
    """

    def __init__(self) -> None:
        self._window_bad: torch.Tensor | None = None
        self.skipped: torch.Tensor | None = None
        self.in_a_row: torch.Tensor | None = None
        self.mirror = HostMirror()

    def note_loss(self, loss: torch.Tensor) -> None:
        """Remember whether this micro-batch's loss is finite (no sync)."""
        bad = ~torch.isfinite(loss.detach())
        self._window_bad = bad if self._window_bad is None else self._window_bad | bad

    def verdict(self, grad_norm: torch.Tensor, step: int) -> torch.Tensor:
        """``found_inf`` for this optimizer step (float 0/1 scalar on the norm's device); ``step`` tags the counts."""
        bad = ~torch.isfinite(grad_norm)
        if self._window_bad is not None:
            bad = bad | self._window_bad.to(bad.device)
        self._window_bad = None
        if self.skipped is None:
            self.skipped = torch.zeros((), dtype=torch.long, device=bad.device)
            self.in_a_row = torch.zeros((), dtype=torch.long, device=bad.device)
        self.skipped = self.skipped + bad
        self.in_a_row = (self.in_a_row + 1) * bad
        self.mirror.publish(torch.stack([self.in_a_row, self.skipped]), step)
        return bad.float()

    def host_counts(self) -> tuple[int, int, object]:
        """``(in_a_row, skipped, step)`` as of the newest step the device has finished (zeros before any)."""
        value, step = self.mirror.latest()
        return (value[0], value[1], step) if value is not None else (0, 0, None)
