"""Tests for minimind_pl.generation: KV-cache decoding, batching, sampling controls, streaming."""

from __future__ import annotations

import pytest
import torch

from minimind_pl.config import ModelConfig
from minimind_pl.generation import (
    apply_repetition_penalty, filter_top_k, filter_top_p, generate, sample_next, stream_generate,
)
from minimind_pl.model import MiniMindForCausalLM

V = 6400
PROMPTS = [[5, 17, 300, 42], [9], [100, 200, 300, 400, 500, 600, 700]]


def debug_model(seed: int = 0, **overrides) -> MiniMindForCausalLM:
    """A tiny random model (weights std 0.05 so greedy decoding is not degenerate)."""
    torch.manual_seed(seed)
    model = MiniMindForCausalLM(ModelConfig.from_preset("debug", **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.05)
    return model.eval()


def greedy_by_recomputation(model: MiniMindForCausalLM, prompt: list[int], n: int) -> list[int]:
    """Reference greedy decoding: run the whole sequence again for every new token, no cache."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("use_moe", [False, True])
def test_kv_cache_greedy_equals_recomputation(use_moe: bool) -> None:
    model = debug_model(use_moe=use_moe)
    out = generate(model, [PROMPTS[0]], max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert out == [greedy_by_recomputation(model, PROMPTS[0], 12)]


def test_batched_prompts_equal_each_alone() -> None:
    model = debug_model()
    batched = generate(model, PROMPTS, max_new_tokens=10, do_sample=False, eos_token_id=None)
    alone = [generate(model, [p], max_new_tokens=10, do_sample=False, eos_token_id=None)[0] for p in PROMPTS]
    assert batched == alone and all(len(o) == 10 for o in batched)
    assert len({tuple(o) for o in batched}) > 1  # rows really differ


def test_eos_stops_each_row_and_is_excluded() -> None:
    model = debug_model()
    free = generate(model, PROMPTS, max_new_tokens=10, do_sample=False, eos_token_id=None)
    eos = free[0][3]  # a token row 0 produces at step 4
    stopped = generate(model, PROMPTS, max_new_tokens=10, do_sample=False, eos_token_id=eos)
    for full, cut in zip(free, stopped):
        assert cut == (full[:full.index(eos)] if eos in full else full)
    assert len(stopped[0]) <= 3


def test_greedy_modes_agree() -> None:
    model = debug_model()
    greedy = generate(model, PROMPTS, max_new_tokens=6, do_sample=False)
    assert generate(model, PROMPTS, max_new_tokens=6, temperature=0.0) == greedy
    assert generate(model, PROMPTS, max_new_tokens=6, top_k=1, temperature=1.0) == greedy


def test_sampling_is_reproducible_and_streaming_matches() -> None:
    model = debug_model()
    kwargs = dict(max_new_tokens=15, temperature=1.5, top_k=0, top_p=1.0, eos_token_id=None)
    first = generate(model, [PROMPTS[2]], generator=torch.Generator().manual_seed(3), **kwargs)
    second = generate(model, [PROMPTS[2]], generator=torch.Generator().manual_seed(3), **kwargs)
    streamed = list(stream_generate(model, PROMPTS[2], generator=torch.Generator().manual_seed(3), **kwargs))
    assert first == second == [streamed]
    greedy = generate(model, [PROMPTS[2]], max_new_tokens=15, do_sample=False, eos_token_id=None)
    assert first != greedy  # sampling at temperature 1.5 over 6400 tokens does differ


def test_stream_generate_leaves_no_inference_mode_and_restores_train_mode() -> None:
    model = debug_model().train()
    stream = stream_generate(model, PROMPTS[0], max_new_tokens=4, do_sample=False, eos_token_id=None)
    tokens = []
    for token in stream:  # between steps the caller's state is untouched
        assert isinstance(token, int)
        assert model.training and torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        tokens.append(token)
    assert tokens == generate(model, [PROMPTS[0]], max_new_tokens=4, do_sample=False, eos_token_id=None)[0]
    assert model.training


def test_strong_repetition_penalty_avoids_seen_tokens() -> None:
    model = debug_model()
    out = generate(model, [PROMPTS[0]], max_new_tokens=20, do_sample=False, repetition_penalty=1e6,
                   eos_token_id=None)[0]
    assert len(set(out)) == len(out) and not set(out) & set(PROMPTS[0])
    plain = generate(model, [PROMPTS[0]], max_new_tokens=20, do_sample=False, eos_token_id=None)[0]
    assert len(set(plain)) < len(plain)  # without the penalty this tiny model repeats itself


def test_repetition_penalty_formula() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0, -1.0]]


def test_top_k_and_top_p_filters() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_top_k(logits, 2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_top_p(logits, 0.7)).tolist() == [[False, False, True, True]]  # 0.5 < 0.7 -> keep 0.3 too
    assert torch.isinf(filter_top_p(logits, 0.4)).tolist() == [[False, True, True, True]]  # the top token always stays
    assert torch.equal(filter_top_p(logits, 1.0), logits) and torch.equal(filter_top_k(logits, 0), logits)
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, top_k=0, top_p=0.7, temperature=1.0, generator=g)) for _ in range(50)}
    assert draws == {0, 1}


def test_edge_cases_and_errors() -> None:
    model = debug_model()
    assert generate(model, PROMPTS, max_new_tokens=0) == [[], [], []]
    assert generate(model, []) == []
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1, 2], []])
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], top_p=0.0)
    with pytest.raises(ValueError, match=r"\[0, 6400\)"):
        generate(model, [[1, 99999]])


def test_left_padded_rows_get_their_own_positions() -> None:
    """Each row's RoPE positions start at 0 at its first real token and the pads are masked."""
    model = debug_model()
    calls = []
    original = model.forward

    def spy(input_ids, **kwargs):
        calls.append(kwargs)
        return original(input_ids, **kwargs)

    model.forward = spy
    generate(model, [[5, 6, 7], [8]], max_new_tokens=2, do_sample=False, eos_token_id=None)
    prefill, step = calls[0], calls[1]
    assert prefill["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    assert prefill["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert step["position_ids"].tolist() == [[3], [1]]
    assert step["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    calls.clear()
    generate(model, [[5, 6], [7, 8]], max_new_tokens=1, do_sample=False)
    assert calls[0]["attention_mask"] is None  # equal lengths: no mask, the is_causal fast path


def test_decode_batch_rows_join_and_leave_between_steps() -> None:
    """A row's tokens do not depend on its neighbours: rows joining later (other lengths) or leaving early
    decode exactly as each prompt alone."""
    from minimind_pl.generation import DecodeBatch, inference_step

    model = debug_model()
    batch = DecodeBatch(model)
    rows: list[list[int]] = []
    outputs: list[list[int]] = []

    def step() -> None:
        tokens = batch.logits.argmax(-1)
        for out, token in zip(outputs, tokens.tolist()):
            out.append(token)
        batch.feed(tokens)

    with inference_step(model):
        batch.add([PROMPTS[0], PROMPTS[1]])
        rows += [0, 1]
        outputs += [[], []]
        for _ in range(3):
            step()
        batch.add([PROMPTS[2]])  # longer than the cache so far: the batch's cache is left-padded
        rows.append(2)
        outputs.append([])
        for _ in range(2):
            step()
        batch.keep([1, 2])  # the first row leaves; the padding it needed goes with it
        done = {rows.pop(0): outputs.pop(0)}
        assert batch.mask is None or bool(batch.mask[:, 0].any())  # no cache column that no row uses
        for _ in range(4):
            step()
    done.update(zip(rows, outputs))
    for i, out in done.items():
        assert out == generate(model, [PROMPTS[i]], max_new_tokens=len(out), do_sample=False, eos_token_id=None)[0]
    assert [len(done[i]) for i in range(3)] == [5, 9, 6]
