"""Tests for minimind_pl.model: MiniMind weight format, equivalence with Qwen3, masks, cache, MoE, YaRN."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from minimind_pl.config import ModelConfig
from minimind_pl.model import GROUPED_MM_DEVICES, MiniMindForCausalLM, rope_frequencies, yarn_ramp_bounds

from helpers import minimind_state_dict, random_model as debug_model, require_module

V = 6400


# ----------------------------------------------------------------------------- structure and weights


def test_forward_shapes_and_tied_head() -> None:
    model = debug_model()
    out = model(torch.randint(0, V, (2, 7)))
    assert out.logits.shape == (2, 7, V) and out.past_key_values is None
    assert out.aux_loss.shape == () and out.aux_loss.item() == 0.0
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model(torch.randint(0, V, (2, 7)), logits_to_keep=1).logits.shape == (2, 1, V)


MINIMIND2_TINY = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 192}  # 8 heads of 8


@pytest.mark.parametrize("config", [
    ModelConfig.from_preset("debug"), ModelConfig.from_preset("debug", use_moe=True),
    ModelConfig.from_preset("minimind2-small", **MINIMIND2_TINY),
    ModelConfig.from_preset("minimind2-moe", **MINIMIND2_TINY),
], ids=["minimind-3", "minimind-3-moe", "minimind2", "minimind2-moe"])
def test_minimind_state_dict_loads_strict_and_round_trips(config: ModelConfig) -> None:
    sd = minimind_state_dict(config)
    model = MiniMindForCausalLM(config)
    model.load_weights(sd, strict=True)
    own = model.state_dict()
    assert set(own) == set(sd)
    assert all(torch.equal(own[k], sd[k].float()) for k in sd)
    again = MiniMindForCausalLM(config)
    again.load_state_dict({k: v.half() for k, v in own.items()})
    x = torch.randint(0, V, (1, 9))
    assert torch.equal(model.eval()(x).logits, again.eval()(x).logits)


def test_state_dict_errors_name_the_keys() -> None:
    config = ModelConfig.from_preset("debug")
    model = MiniMindForCausalLM(config)
    sd = minimind_state_dict(config)
    missing = {k: v for k, v in sd.items() if k != "model.layers.1.self_attn.q_norm.weight"}
    with pytest.raises(ValueError, match=r"missing keys \['model.layers.1.self_attn.q_norm.weight'\]"):
        model.load_weights(missing)
    with pytest.raises(ValueError, match=r"unexpected keys \['model.layers.0.mlp.bias'\]"):
        model.load_weights({**sd, "model.layers.0.mlp.bias": torch.zeros(3)})
    bad_shape = {**sd, "model.norm.weight": torch.ones(65)}
    with pytest.raises(ValueError, match=r"model.norm.weight: got \(65,\), model has \(64,\)"):
        model.load_state_dict(bad_shape)
    model.load_state_dict(missing, strict=False)  # non-strict loading is still possible


def test_tied_embeddings_accept_one_name_and_reject_disagreement() -> None:
    config = ModelConfig.from_preset("debug")
    sd = minimind_state_dict(config)
    model = MiniMindForCausalLM(config)
    model.load_weights({k: v for k, v in sd.items() if k != "lm_head.weight"})  # Hugging Face style
    assert torch.equal(model.lm_head.weight, sd["model.embed_tokens.weight"].float())
    with pytest.raises(ValueError, match="differ"):
        model.load_weights({**sd, "lm_head.weight": torch.zeros_like(sd["lm_head.weight"])})


def test_untied_model_has_its_own_head() -> None:
    model = debug_model(tie_word_embeddings=False)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_meta_device_init_then_materialise() -> None:
    """Rotary frequencies survive `torch.device("meta")` construction (FSDP-style init)."""
    reference = debug_model()
    with torch.device("meta"):
        model = MiniMindForCausalLM(reference.config)
    model.to_empty(device="cpu")
    model.load_state_dict(reference.state_dict())
    x = torch.randint(0, V, (1, 12))
    torch.testing.assert_close(model.eval()(x).logits, reference(x).logits, rtol=0, atol=0)


# ----------------------------------------------------------------------------- against transformers


def copy_weights_to_hf(model: MiniMindForCausalLM, hf: torch.nn.Module) -> None:
    """Load our weights into a Qwen3 / Qwen3-MoE model (experts fused as transformers 5 stores them)."""
    sd = dict(model.state_dict())
    for layer in range(model.config.num_hidden_layers):
        p = f"model.layers.{layer}.mlp."
        # ours: experts.{e}.{gate,up,down}_proj; transformers: gate_up_proj (E, 2I, C), down_proj (E, C, I)
        if model.config.use_moe:
            experts = range(model.config.num_experts)
            sd[p + "experts.gate_up_proj"] = torch.stack([
                torch.cat([sd.pop(p + f"experts.{e}.gate_proj.weight"), sd.pop(p + f"experts.{e}.up_proj.weight")])
                for e in experts])
            sd[p + "experts.down_proj"] = torch.stack([sd.pop(p + f"experts.{e}.down_proj.weight") for e in experts])
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and not [k for k in missing if k != "lm_head.weight"]


def hf_config_kwargs(config: ModelConfig) -> dict:
    """Qwen3Config arguments matching a ModelConfig."""
    return dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings, attention_dropout=0.0,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
    )


@pytest.mark.parametrize("yarn", [False, True])
def test_matches_transformers_qwen3(yarn: bool) -> None:
    transformers = require_module("transformers")
    overrides = {"max_position_embeddings": 32768, "inference_rope_scaling": True} if yarn else {}
    model = debug_model(**overrides)
    kwargs = hf_config_kwargs(model.config)
    if yarn:  # MiniMind's YaRN equals transformers' YaRN with attention_factor 1.0
        kwargs["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0, "beta_fast": 32.0,
                                     "beta_slow": 1.0, "original_max_position_embeddings": 2048,
                                     "attention_factor": 1.0}
    assert_same_logits(model, transformers.Qwen3ForCausalLM, transformers.Qwen3Config(**kwargs), atol=1e-4)


def assert_same_logits(model: MiniMindForCausalLM, hf_class: type, hf_config, atol: float) -> None:
    """Our model and transformers' `hf_class` (eager attention) holding the same weights agree on fp32 logits."""
    hf_config._attn_implementation = "eager"
    hf = hf_class(hf_config).eval()
    copy_weights_to_hf(model, hf)
    x = torch.randint(0, V, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, hf(input_ids=x).logits, rtol=0, atol=atol)


def test_moe_matches_transformers_qwen3_moe() -> None:
    """MiniMind's MoE is Qwen3-MoE's sparse block with every layer sparse (decoder_sparse_step=1,
    mlp_only_layers=[]), softmax router `mlp.gate`, top-k, norm_topk_prob and no shared expert.

    Where they differ: (1) the aux loss -- MiniMind adds one loss per layer (sum over layers of
    E * sum_e load_e * mean_prob_e, already times the coefficient, training mode only), Qwen3-MoE
    pools loads and probabilities over all layers first and returns the loss without the
    coefficient (and can exclude padding via attention_mask); they agree for one layer;
    (2) MiniMind adds 1e-20 when renormalising the top-k weights; (3) transformers stores experts
    fused (gate_up_proj / down_proj 3-D tensors), MiniMind as separate Linear modules.
    """
    transformers = require_module("transformers")
    model = debug_model(use_moe=True, num_experts=4, num_experts_per_tok=2, num_hidden_layers=1)
    c = model.config
    hf_config = transformers.Qwen3MoeConfig(
        **hf_config_kwargs(c), num_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
        moe_intermediate_size=c.moe_intermediate_size, norm_topk_prob=c.norm_topk_prob,
        decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=c.router_aux_loss_coef,
        output_router_logits=True)
    hf_config._attn_implementation = "eager"
    hf = transformers.Qwen3MoeForCausalLM(hf_config).eval()
    copy_weights_to_hf(model, hf)
    x = torch.randint(0, V, (2, 24))
    model.train()  # dropout is 0; training mode only switches the aux loss on
    out = model(x)
    with torch.no_grad():
        hf_out = hf(input_ids=x)
    torch.testing.assert_close(out.logits, hf_out.logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(out.aux_loss, c.router_aux_loss_coef * hf_out.aux_loss, rtol=1e-5, atol=1e-8)


def test_minimind2_matches_transformers_llama() -> None:
    """MiniMind2's attention has no q/k norm: the model is then exactly Llama (same names, RoPE, SwiGLU)."""
    transformers = require_module("transformers")
    model = debug_model(qk_norm=False, rms_norm_eps=1e-5)
    hf_config = transformers.LlamaConfig(**hf_config_kwargs(model.config), attention_bias=False, mlp_bias=False)
    assert_same_logits(model, transformers.LlamaForCausalLM, hf_config, atol=1e-5)


def test_minimind2_moe_block_matches_transformers_qwen2_moe() -> None:
    """MiniMind2-MoE's block (softmax, top-2 renormalised, one shared expert added unweighted) is Qwen2-MoE's
    sparse block whose shared expert gate is sigmoid(0) = 1/2, with that expert's down projection doubled."""
    transformers = require_module("transformers")
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    model = debug_model(qk_norm=False, use_moe=True, num_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                        moe_intermediate_size=32)
    ours, c = model.model.layers[0].mlp, model.config
    hf = Qwen2MoeSparseMoeBlock(transformers.Qwen2MoeConfig(
        hidden_size=c.hidden_size, num_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
        moe_intermediate_size=c.moe_intermediate_size, shared_expert_intermediate_size=c.intermediate_size,
        norm_topk_prob=True)).eval()
    with torch.no_grad():
        hf.gate.weight.copy_(ours.gate.weight)
        hf.experts.gate_up_proj.copy_(torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight])
                                                   for e in ours.experts]))
        hf.experts.down_proj.copy_(torch.stack([e.down_proj.weight for e in ours.experts]))
        shared = ours.shared_experts[0]
        hf.shared_expert.gate_proj.weight.copy_(shared.gate_proj.weight)
        hf.shared_expert.up_proj.weight.copy_(shared.up_proj.weight)
        hf.shared_expert.down_proj.weight.copy_(2 * shared.down_proj.weight)
        hf.shared_expert_gate.weight.zero_()
        x = torch.randn(2, 24, c.hidden_size)
        torch.testing.assert_close(ours(x)[0], hf(x), rtol=0, atol=1e-5)
        without_shared = ours(x)[0] - shared(x)
        assert not torch.allclose(without_shared, ours(x)[0], atol=1e-3)  # the shared expert does contribute


@pytest.mark.parametrize("seq_aux, expected", [(False, 1.15), (True, 1.35)])
def test_aux_loss_for_a_known_routing(seq_aux: bool, expected: float) -> None:
    """Hand-computed values: 2 sequences x 2 tokens, 2 experts, top-1, weight c = 0.1.

    Router probabilities (0.9, 0.1), (0.8, 0.2) | (0.3, 0.7), (0.6, 0.4), so the tokens pick experts 0, 0 | 1, 0.
    Over the batch: loads (3/4, 1/4), mean probabilities (0.65, 0.35): 2c(0.4875 + 0.0875) = 1.15c.
    Per sequence (MiniMind2's seq_aux): row 1 (1, 0).(0.85, 0.15) = 0.85, row 2 (1/2, 1/2).(0.45, 0.55) = 0.5,
    mean 0.675, times 2c = 1.35c; MiniMind2's own form, alpha * mean_b sum_e count_be / (T k / E) * P_be with
    alpha = c * k, gives alpha * (1.7 + 1.0) / 2 = 1.35c as well.
    """
    moe = debug_model(use_moe=True, num_experts=2, num_experts_per_tok=1, router_aux_loss_coef=0.1,
                      seq_aux=seq_aux).model.layers[0].mlp
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    top_idx = probs.topk(1, dim=-1).indices
    loss = moe._aux_loss(probs, top_idx, groups=2 if seq_aux else 1)
    torch.testing.assert_close(loss, torch.tensor(expected * 0.1), rtol=1e-6, atol=0)


def test_seq_aux_balances_each_sequence_in_the_models_forward() -> None:
    """The model's forward honours ``seq_aux``: per sequence, the batch's loss is the mean of each row's own loss
    (each row run alone, where per sequence and per batch are the same); without it, the batch is one group."""
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(5))
    per_row = debug_model(use_moe=True, num_experts=4, num_experts_per_tok=2, seq_aux=True).train()
    per_batch = debug_model(use_moe=True, num_experts=4, num_experts_per_tok=2, seq_aux=False).train()
    per_batch.load_state_dict(per_row.state_dict())
    with torch.no_grad():
        alone = [per_batch(ids[row:row + 1]).aux_loss for row in range(2)]
        torch.testing.assert_close(per_row(ids).aux_loss, (alone[0] + alone[1]) / 2, rtol=1e-5, atol=0)
        batch_level = per_batch(ids).aux_loss
    assert (batch_level - (alone[0] + alone[1]) / 2).abs() > 1e-3 * batch_level  # the two groupings differ here


def test_shared_experts_learn_and_add_to_every_token() -> None:
    model = debug_model(use_moe=True, num_experts=4, num_experts_per_tok=2, n_shared_experts=2, seq_aux=True).train()
    moe = model.model.layers[0].mlp
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        routed_only = moe(x)[0] - sum(shared(x) for shared in moe.shared_experts)
        for shared in moe.shared_experts:
            shared.down_proj.weight.zero_()
        torch.testing.assert_close(moe(x)[0], routed_only, rtol=0, atol=1e-6)
    out = model(torch.randint(0, V, (2, 16)))
    (out.logits.sum() + out.aux_loss).backward()
    assert out.aux_loss.item() > 0
    untouched = model.model.layers[1].mlp.shared_experts[1]  # layer 0's were zeroed above
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in untouched.parameters())


# ----------------------------------------------------------------------------- masks and cache


def test_packed_documents_match_separate_documents() -> None:
    model = debug_model()
    docs = [torch.randint(0, V, (1, n)) for n in (5, 9, 3)]
    packed = torch.cat(docs, dim=1)
    position_ids = torch.cat([torch.arange(d.shape[1]) for d in docs])[None]
    doc_ids = torch.cat([torch.full((d.shape[1],), i) for i, d in enumerate(docs)])[None]
    logits = model(packed, position_ids=position_ids, doc_ids=doc_ids).logits
    alone = torch.cat([model(d).logits for d in docs], dim=1)
    torch.testing.assert_close(logits, alone, rtol=0, atol=1e-5)
    # without doc_ids the documents would see each other: the check above can fail
    assert not torch.allclose(model(packed, position_ids=position_ids).logits, alone, atol=1e-3)


def random_packed_rows(rows: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, position_ids, doc_ids), each (rows, length): documents of random lengths back to back."""
    g = torch.Generator().manual_seed(seed)
    doc_ids = torch.cumsum(torch.rand(rows, length, generator=g) < 0.02, dim=1)  # ~50-token documents
    starts = torch.cat([torch.ones(rows, 1, dtype=torch.bool), doc_ids[:, 1:] != doc_ids[:, :-1]], dim=1)
    index = torch.arange(length).expand(rows, length)
    position_ids = index - torch.cummax(torch.where(starts, index, 0), dim=1).values
    return torch.randint(0, V, (rows, length), generator=g), position_ids, doc_ids


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_block_mask_matches_the_dense_document_mask() -> None:
    """FlexAttention (eager here: on the CPU it runs without gradients) sees exactly what the dense mask lets
    through, over rows longer than its 128-token blocks, with grouped-query heads."""
    from minimind_pl.model import document_block_mask
    model = debug_model()
    ids, position_ids, doc_ids = random_packed_rows(2, 300)
    with torch.no_grad():
        dense = model(ids, position_ids=position_ids, doc_ids=doc_ids).logits
        flex = model(ids, position_ids=position_ids, block_mask=document_block_mask(doc_ids)).logits
        causal_only = model(ids, position_ids=position_ids).logits
    torch.testing.assert_close(flex, dense, rtol=0, atol=1e-5)
    assert not torch.allclose(causal_only, dense, atol=1e-3)  # the documents do matter here


def test_block_mask_refuses_what_it_cannot_express() -> None:
    from minimind_pl.model import document_block_mask
    model = debug_model()
    ids, position_ids, doc_ids = random_packed_rows(2, 16)
    mask = document_block_mask(doc_ids)
    with pytest.raises(ValueError, match="does not fit"):
        model(ids[:, :8], block_mask=mask)
    with pytest.raises(ValueError, match="past_key_values or attention_mask"):
        model(ids, attention_mask=torch.ones_like(ids), block_mask=mask)
    with pytest.raises(ValueError, match="dropout"):
        debug_model(dropout=0.1).train()(ids, block_mask=mask)


def test_grouped_query_attention_broadcasts_like_repeated_heads() -> None:
    """``attention`` on 2 key/value heads equals SDPA on the 4 heads they stand for (causal and dense mask; a
    decode step's single query, with and without key padding), bit for bit on the CPU."""
    import torch.nn.functional as F
    from minimind_pl.model import attention, build_attention_mask
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 24, 8, generator=g) for h in (4, 2, 2))
    doc_ids = torch.tensor([[0] * 10 + [1] * 14, [0] * 24])
    repeated = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    mask = build_attention_mask(24, 24, doc_ids, None, q.device)
    exact = dict(rtol=0, atol=0)
    torch.testing.assert_close(attention(q, k, v), F.scaled_dot_product_attention(q, *repeated, is_causal=True), **exact)
    torch.testing.assert_close(attention(q, k, v, mask), F.scaled_dot_product_attention(q, *repeated, attn_mask=mask),
                               **exact)
    step = q[:, :, -1:]  # one new query over 24 cached keys, the first 5 of row 0 padding
    padding = build_attention_mask(1, 24, None, torch.tensor([[0] * 5 + [1] * 19, [1] * 24]), q.device)
    torch.testing.assert_close(attention(step, k, v), F.scaled_dot_product_attention(step, *repeated), **exact)
    torch.testing.assert_close(attention(step, k, v, padding),
                               F.scaled_dot_product_attention(step, *repeated, attn_mask=padding), **exact)


def test_left_padding_matches_unpadded() -> None:
    model = debug_model()
    x = torch.randint(0, V, (1, 6))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), x], dim=1)
    mask = torch.tensor([[0] * 4 + [1] * 6])
    position_ids = torch.tensor([[0] * 4 + list(range(6))])
    out = model(padded, position_ids=position_ids, attention_mask=mask).logits[:, 4:]
    assert torch.isfinite(model(padded, position_ids=position_ids, attention_mask=mask).logits).all()
    torch.testing.assert_close(out, model(x).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("use_moe", [False, True])
def test_kv_cache_matches_full_forward(use_moe: bool) -> None:
    model = debug_model(use_moe=use_moe)
    x = torch.randint(0, V, (2, 12))
    full = model(x).logits
    out = model(x[:, :5], use_cache=True)
    pieces, cache = [out.logits], out.past_key_values
    for chunk in (x[:, 5:6], x[:, 6:10], x[:, 10:12]):  # single tokens and multi-token chunks
        out = model(chunk, past_key_values=cache, use_cache=True)
        pieces.append(out.logits)
        cache = out.past_key_values
    assert cache[0][0].shape == (2, model.config.num_key_value_heads, 12, model.config.head_dim)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- MoE


def test_moe_aux_loss_positive_with_grad_and_train_only() -> None:
    model = debug_model(use_moe=True).train()
    out = model(torch.randint(0, V, (2, 16)))
    assert out.aux_loss.shape == () and out.aux_loss.item() > 0
    out.aux_loss.backward()
    assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0
    # balanced routing gives coef * k per layer: 4 experts, top-1, 2 layers -> about 2 * 5e-4
    assert 0.5 * 2 * 5e-4 < out.aux_loss.item() < 4 * 2 * 5e-4
    assert model.eval()(torch.randint(0, V, (2, 16))).aux_loss.item() == 0.0


def test_moe_top2_and_unused_experts() -> None:
    """An expert no token chose gets an exact zero gradient (so DDP needs no find_unused_parameters)."""
    model = debug_model(use_moe=True, num_experts=8, num_experts_per_tok=2).train()
    out = model(torch.randint(0, V, (1, 3)))  # 3 tokens x 2 slots < 8 experts: some get nothing
    (out.logits.sum() + out.aux_loss).backward()
    grads = [e.up_proj.weight.grad for e in model.model.layers[0].mlp.experts]
    assert all(g is not None for g in grads)
    used = [bool(g.abs().sum() > 0) for g in grads]
    assert 0 < sum(used) <= 6 and not all(used)


# torch._grouped_mm runs on the CPU from torch 2.9; before it, the loop serves every expert (grouped_matmul_applies).
NEEDS_GROUPED_MM = pytest.mark.skipif("cpu" not in GROUPED_MM_DEVICES, reason=f"torch {torch.__version__} has no "
                                      "_grouped_mm for the CPU (the loop serves the experts)")


@NEEDS_GROUPED_MM
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("autocast", [False, True])
def test_grouped_experts_match_the_loop(top_k: int, autocast: bool) -> None:
    """The sync-free grouped matmul gives the loop's outputs and gradients (fp32 exactly; bf16 autocast close)."""
    torch.manual_seed(0)
    moe = debug_model(use_moe=True, num_experts=4, num_experts_per_tok=top_k).model.layers[0].mlp.train()
    x = torch.randn(2, 40, 64, requires_grad=True)
    outputs, grads = [], []
    for grouped in (True, False):
        moe.zero_grad()
        x.grad = None
        with mock.patch("minimind_pl.model.grouped_matmul_applies", return_value=grouped), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y, aux = moe(x)
        (y.float().square().sum() + aux).backward()
        outputs.append(y.detach().float())
        grads.append([x.grad.clone()] + [p.grad.clone() for p in moe.parameters()])
    tol = {"rtol": 2e-2, "atol": 2e-2} if autocast else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(outputs[0], outputs[1], **tol)
    for grouped_grad, loop_grad in zip(*grads):
        torch.testing.assert_close(grouped_grad, loop_grad, **tol)


def test_experts_loop_where_torch_has_no_grouped_matmul_for_the_device(monkeypatch) -> None:
    """torch 2.8 has ``_grouped_mm`` for CUDA only: on the CPU the loop must serve the experts."""
    from minimind_pl.model import grouped_matmul_applies
    monkeypatch.setattr("minimind_pl.model.GROUPED_MM_DEVICES", ("cuda",))
    model = debug_model(use_moe=True)
    assert not grouped_matmul_applies(torch.zeros(1, 64), model.model.layers[0].mlp.experts)
    with mock.patch("torch._grouped_mm", side_effect=NotImplementedError, create=True):
        assert torch.isfinite(model(torch.randint(0, V, (2, 8))).logits).all()


@NEEDS_GROUPED_MM
def test_grouped_experts_need_aligned_rows() -> None:
    from minimind_pl.model import grouped_matmul_applies
    aligned = debug_model(use_moe=True).model.layers[0].mlp.experts
    odd = debug_model(use_moe=True, moe_intermediate_size=250).model.layers[0].mlp.experts
    x = torch.zeros(1, 64)
    assert grouped_matmul_applies(x, aligned) and not grouped_matmul_applies(x, odd)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # 2-byte rows: 250 * 2 is not a multiple of 16
        assert not grouped_matmul_applies(x, odd)
    model = debug_model(use_moe=True, moe_intermediate_size=250)  # the loop serves it
    assert torch.isfinite(model(torch.randint(0, V, (2, 8))).logits).all()


# ----------------------------------------------------------------------------- YaRN


def test_yarn_frequencies_and_short_context() -> None:
    """MiniMind's YaRN is static: it rescales the frequencies for every position, so it DOES change
    short-context logits (we check that honestly); what stays is: high-frequency pairs up to the
    ramp start are untouched, pairs from the ramp end on are divided by the factor, and a token at
    position 0 (no rotation at all) gets exactly the same logits."""
    plain = ModelConfig.from_preset("debug", max_position_embeddings=32768)
    scaled = ModelConfig.from_preset("debug", max_position_embeddings=32768, inference_rope_scaling=True)
    f0, _ = rope_frequencies(plain)
    f1, attention_factor = rope_frequencies(scaled)
    low, high = yarn_ramp_bounds(16, 1e6, 2048, 32, 1)
    assert (low, high) == (1, 4) and attention_factor == 1.0
    assert torch.equal(f1[: low + 1], f0[: low + 1])
    torch.testing.assert_close(f1[high:], f0[high:] / 16)
    assert ((f1[low + 1:high] < f0[low + 1:high]) & (f1[low + 1:high] > f0[low + 1:high] / 16)).all()

    model, yarn_model = debug_model(max_position_embeddings=32768), MiniMindForCausalLM(scaled)
    yarn_model.load_state_dict(model.state_dict())
    yarn_model.eval()
    x = torch.randint(0, V, (1, 64))
    assert torch.equal(model(x[:, :1]).logits, yarn_model(x[:, :1]).logits)
    assert not torch.allclose(model(x).logits, yarn_model(x).logits, atol=1e-4)


def test_yarn_off_when_context_not_extended() -> None:
    # MiniMind applies YaRN only when max_position_embeddings / 2048 > 1
    plain = ModelConfig.from_preset("debug")
    scaled = ModelConfig.from_preset("debug", inference_rope_scaling=True)
    assert torch.equal(rope_frequencies(plain)[0], rope_frequencies(scaled)[0])


# ----------------------------------------------------------------------------- errors


def test_token_ids_out_of_range() -> None:
    model = debug_model()
    with pytest.raises(ValueError, match=r"\[0, 6400\)"):
        model(torch.tensor([[1, 2, 6400]]))
    with pytest.raises(ValueError, match="min -1"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="integer"):
        model(torch.zeros(1, 3))


def test_bad_input_shapes() -> None:
    model = debug_model()
    x = torch.randint(0, V, (2, 5))
    with pytest.raises(ValueError, match="position_ids shape"):
        model(x, position_ids=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(x, attention_mask=torch.ones(2, 4))
    cache = model(x, use_cache=True).past_key_values
    with pytest.raises(ValueError, match="doc_ids cannot be combined"):
        model(x[:, :1], doc_ids=torch.zeros(2, 1, dtype=torch.long), past_key_values=cache)
