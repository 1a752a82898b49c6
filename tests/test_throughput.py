"""FLOPs per token and the measured matmul peak: the two numbers behind every MFU figure."""

from __future__ import annotations

import math

import torch

from minimind_pl.config import ModelConfig
from minimind_pl.model import MiniMindForCausalLM
from minimind_pl.throughput import flops_per_token, matmul_peak_tflops


def test_flops_per_token_counts_the_parameters_a_token_passes_through():
    dense = ModelConfig.from_preset("debug")
    params = sum(p.numel() for p in MiniMindForCausalLM(dense).parameters())  # tied: counted once
    attention = 12 * dense.num_hidden_layers * dense.num_attention_heads * dense.head_dim * 256
    assert flops_per_token(dense, 256) == 6 * params + attention
    moe = ModelConfig.from_preset("debug", use_moe=True, num_experts=4, num_experts_per_tok=1)
    model = MiniMindForCausalLM(moe)
    idle_experts = sum(p.numel() for layer in model.model.layers for e in layer.mlp.experts[1:] for p in e.parameters())
    active = sum(p.numel() for p in model.parameters()) - idle_experts  # one expert of four per token
    assert flops_per_token(moe, 256) == 6 * active + attention


def test_matmul_peak_is_measured_on_the_device():
    tflops = matmul_peak_tflops(torch.device("cpu"), torch.float32, size=256, repeats=3)
    assert math.isfinite(tflops) and 0 < tflops < 100
