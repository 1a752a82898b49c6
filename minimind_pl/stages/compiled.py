"""The training fast path: the transformer compiled, documents kept apart by FlexAttention, the loss compiled.

Held by a stage beside its model (not as a submodule: the state dict and the optimizer see only the model),
and used for training steps only. Validation, sample generation and frozen side models run the plain
module, whose shapes change from call to call (a compiled module would recompile for each).

Why each part (issue figures in bench/RESULTS.md):
- ``torch.compile`` fuses the norms, RoPE, SwiGLU and the float32 upcasts into few kernels.
- Packed rows carry ``doc_ids``; the dense (B, 1, T, T) mask they would need rules out the fused
  attention kernels and computes every tile. ``document_block_mask`` builds FlexAttention's block mask
  once per batch, outside the compiled graph, and every layer shares it; its shapes stay fixed from batch
  to batch, so moving document boundaries do not recompile.
- The loss is compiled on its own, so the (B·T, V) float32 logits of the cross entropy are never
  written out: the upcast, log-softmax and gather fuse into one pass over the half-precision logits.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils._triton import has_triton

from minimind_pl.model import CausalLMOutput, MiniMindForCausalLM, document_block_mask


class CompiledTraining:
    """Compiled training forward (and losses) of one model.

    Args:
        model: The transformer being trained; compiled lazily, at its first training step.
        flex_attention: Keep packed documents apart with FlexAttention's block mask instead of a dense mask.
    """

    def __init__(self, model: MiniMindForCausalLM, flex_attention: bool) -> None:
        self.forward_model = torch.compile(model)
        self.flex_attention = flex_attention
        self._losses: dict[Callable, Callable] = {}

    def forward(self, batch: dict[str, torch.Tensor], inputs_embeds: torch.Tensor | None = None) -> CausalLMOutput:
        """The compiled model on a batch of packed or padded rows; ``inputs_embeds`` (B, T, C), when given, replace
        the token embeddings (a vision-language model's rows with their images merged in, outside the graph)."""
        doc_ids = batch.get("doc_ids")
        if self.flex_attention and doc_ids is not None:
            return self.forward_model(batch["input_ids"], position_ids=batch.get("position_ids"),
                                      block_mask=document_block_mask(doc_ids), inputs_embeds=inputs_embeds)
        return self.forward_model(batch["input_ids"], position_ids=batch.get("position_ids"), doc_ids=doc_ids,
                                  inputs_embeds=inputs_embeds)

    def loss(self, loss_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """``loss_fn`` compiled (once per function)."""
        if loss_fn not in self._losses:
            self._losses[loss_fn] = torch.compile(loss_fn)
        return self._losses[loss_fn]


def compile_decision(compile: bool | None, device: torch.device) -> bool:
    """Whether to compile: as asked, or by default (None) on CUDA only, where it pays for its compile time,
    and only where Triton, which the compiled CUDA kernels are written in, is installed."""
    if compile is None:
        return device.type == "cuda" and has_triton()
    return bool(compile)


def flex_decision(flex_attention: bool | None, device: torch.device, dropout: float) -> bool:
    """Whether the compiled forward uses FlexAttention: as asked, or by default (None) on CUDA without dropout.

    FlexAttention has no attention dropout, and on the CPU no backward at all: there the dense mask is the
    only training path.
    """
    if flex_attention is None:
        return device.type == "cuda" and dropout == 0
    return bool(flex_attention)
