"""The parts of the sharded-strategy support that do not need a GPU (the rest: bash bench/gpu_check.sh scaleout)."""

from __future__ import annotations

from helpers import random_model
from minimind_pl.lora import LoRAConfig, apply_lora
from minimind_pl.stages.strategies import decays_weight


def test_weight_decay_by_name_is_the_shape_rule_on_whole_weights():
    """Names give the split the shapes give on unsharded weights (decay on matrices, not on norms), for dense,
    MoE and LoRA models alike; under FSDP/DeepSpeed every parameter is a flat 1-d shard and only names still work."""
    models = [random_model(), random_model(use_moe=True)]
    lora = random_model()
    apply_lora(lora, LoRAConfig(rank=4))
    models.append(lora)
    for model in models:
        for name, param in model.named_parameters():
            assert decays_weight(f"_fsdp_wrapped_module.{name}") == (param.ndim >= 2), name
    assert not decays_weight("model.layers.0.self_attn.q_norm.weight")
    assert decays_weight("model.layers.0.mlp.experts.3.down_proj.weight")
