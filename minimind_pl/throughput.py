"""What throughput figures are measured against: FLOPs per token and the device's matmul peak.

Shared by the training stages (``train/mfu``) and the benchmarks in ``bench/``, so both count the same way.
"""

from __future__ import annotations

import time

import torch

from minimind_pl.config import ModelConfig


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 x active parameters + 12·L·H·D·T for attention.

    PaLM's count (appendix B): the attention term is that of full (non-causal) rows of ``seq_len``
    tokens, whatever the mask skips, so MFU figures compare across attention kernels. Tied embeddings
    count once (the lookup is free; the output head is a real matmul).
    """
    _, active = config.num_parameters()
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len
    return 6 * active + attention


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype = torch.bfloat16, size: int = 8192,
                       repeats: int = 20) -> float:
    """Measured TFLOP/s of a square ``size`` matmul in ``dtype`` on ``device``: the denominator of MFU.

    Measured rather than read off a datasheet, because clocks, power limits and the card's variant
    (PCIe or SXM) all move it. On an H100 SXM this reads about 770-800 in bf16; takes well under a
    second on a GPU. On the CPU pass a smaller ``size`` and float32.
    """
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):  # warm up: kernel selection, clocks
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on an accelerator (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
