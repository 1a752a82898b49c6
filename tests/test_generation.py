"""Tests for minimind_pl.generation: KV-cache decoding, batching, sampling controls, streaming."""

from __future__ import annotations

import pytest
import torch

from minimind_pl.config import ModelConfig
from minimind_pl.generation import (
    GREEDY, DecodeBatch, SamplingSettings, apply_repetition_penalty, filter_top_k, filter_top_p, generate,
    inference_step, sample_next, sample_rows, stream_generate,
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


def greedy_by_recomputation(model: MiniMindForCausalLM, prompt: list[int], n: int, penalty: float = 1.0) -> list[int]:
    """Reference greedy decoding: run the whole sequence again for every new token, no cache; ``penalty`` is
    MiniMind's repetition penalty written out (seen tokens: positive logits divided, negative multiplied)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1]
            seen = logits[ids]
            logits[ids] = torch.where(seen > 0, seen / penalty, seen * penalty)
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def alone(model: MiniMindForCausalLM, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens of ``prompt`` decoded by itself."""
    return generate(model, [prompt], max_new_tokens=n, do_sample=False, eos_token_id=None)[0]


def greedy_steps(batch, outputs: list[list[int]], n: int) -> None:
    """``n`` greedy steps of a `DecodeBatch`, appending each row's token to ``outputs``."""
    for _ in range(n):
        tokens = batch.logits.argmax(-1)
        for out, token in zip(outputs, tokens.tolist()):
            out.append(token)
        batch.feed(tokens)


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


def test_a_model_in_training_mode_generates_as_in_eval_mode() -> None:
    """Dropout is off while generating (RL rollouts run on a policy in training mode), and training mode returns."""
    torch.manual_seed(0)
    model = MiniMindForCausalLM(ModelConfig.from_preset("debug", dropout=0.5))
    reference = generate(model.eval(), [PROMPTS[0]], max_new_tokens=12, do_sample=False, eos_token_id=None)
    model.train()
    assert generate(model, [PROMPTS[0]], max_new_tokens=12, do_sample=False, eos_token_id=None) == reference
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
    model = debug_model()
    batch = DecodeBatch(model)
    rows: list[list[int]] = []
    outputs: list[list[int]] = []

    with inference_step(model):
        batch.add([PROMPTS[0], PROMPTS[1]])
        rows += [0, 1]
        outputs += [[], []]
        greedy_steps(batch, outputs, 3)
        batch.add([PROMPTS[2]])  # longer than the cache so far: the batch's cache is left-padded
        rows.append(2)
        outputs.append([])
        greedy_steps(batch, outputs, 2)
        batch.keep([1, 2])  # the first row leaves; the padding it needed goes with it
        done = {rows.pop(0): outputs.pop(0)}
        assert batch.mask is None or bool(batch.mask[:, 0].any())  # no cache column that no row uses
        greedy_steps(batch, outputs, 4)
    done.update(zip(rows, outputs))
    for i, out in done.items():
        assert out == alone(model, PROMPTS[i], len(out))
    assert [len(done[i]) for i in range(3)] == [5, 9, 6]


# ----------------------------------------------------------------------------- sampling distributions (issue 24)
# Frequencies of a fixed seeded run against distributions worked out by hand: with 40 000 draws a frequency's
# standard error is at most 0.0025, so a tolerance of 0.015 (6 standard errors) never flakes, while an ignored
# temperature, top-k or top-p moves some frequency by 0.05 or more.

PROBS = [0.5, 0.3, 0.15, 0.05]
DRAWS = 40_000


def frequencies(seen: torch.Tensor | None = None, **sampling) -> list[float]:
    """How often each of the 4 tokens of ``log(PROBS)`` is drawn, over ``DRAWS`` rows sampled in one call."""
    logits = torch.log(torch.tensor(PROBS)).expand(DRAWS, 4)
    if seen is not None:
        seen = seen.expand(DRAWS, 4)
    tokens = sample_next(logits, seen, generator=torch.Generator().manual_seed(0), **sampling)
    return (torch.bincount(tokens, minlength=4).float() / DRAWS).tolist()


HAND_WORKED = [
    # temperature 2: p^(1/2) = .7071 .5477 .3873 .2236, sum 1.8657
    (dict(temperature=2.0, top_k=0, top_p=1.0), [0.3790, 0.2936, 0.2076, 0.1198]),
    # temperature 0.5: p^2 = .25 .09 .0225 .0025, sum .365
    (dict(temperature=0.5, top_k=0, top_p=1.0), [0.6849, 0.2466, 0.0616, 0.0068]),
    # top-k 3: .5 .3 .15 renormalised by .95
    (dict(temperature=1.0, top_k=3, top_p=1.0), [0.5263, 0.3158, 0.1579, 0.0]),
    # top-p 0.7: the mass before token 1 (.5) is below .7, before token 2 (.8) above: keep 0 and 1, / .8
    (dict(temperature=1.0, top_k=0, top_p=0.7), [0.625, 0.375, 0.0, 0.0]),
    # temperature before top-p: tempered (T=2) mass before token 2 is .379 + .2936 = .6726 < .7, so token 2 stays:
    # .3790 .2936 .2076 / .8802 (top-p on the untempered probabilities would keep only tokens 0 and 1)
    (dict(temperature=2.0, top_k=0, top_p=0.7), [0.4306, 0.3336, 0.2358, 0.0]),
    # top-k 2 at temperature 2: .7071 .5477 / 1.2548
    (dict(temperature=2.0, top_k=2, top_p=1.0), [0.5635, 0.4365, 0.0, 0.0]),
    # MiniMind's defaults (T .85, top-p .85, top-k 50): p^(1/.85) = .4427 .2428 .1077 .0296, sum .8228;
    # tempered .5380 .2951 .1309 .0360: mass before token 2 is .8331 < .85, before token 3 .9640: keep 0..2, / .9640
    (dict(), [0.5581, 0.3061, 0.1358, 0.0]),
]


@pytest.mark.parametrize("sampling, expected", HAND_WORKED)
def test_sampled_frequencies_follow_temperature_top_k_and_top_p(sampling, expected) -> None:
    assert frequencies(**sampling) == pytest.approx(expected, abs=0.015)


def test_one_batch_of_mixed_settings_gives_every_row_its_own_distribution() -> None:
    """Every hand-worked setting above plus greedy rows, interleaved row by row in ONE batch (one sampling call):
    each setting's rows follow its own distribution, the greedy rows take the argmax every time."""
    settings = [SamplingSettings(**s) for s, _ in HAND_WORKED] + [GREEDY]
    per_setting = 6000  # se <= .0065, tolerance .025
    rows = settings * per_setting
    logits = torch.log(torch.tensor(PROBS)).expand(len(rows), 4)
    torch.manual_seed(0)
    tokens = sample_rows(logits, None, rows, [None] * len(rows)).view(per_setting, len(settings))
    for column, (_, expected) in enumerate(HAND_WORKED):
        freq = torch.bincount(tokens[:, column], minlength=4).float() / per_setting
        assert freq.tolist() == pytest.approx(expected, abs=0.025), HAND_WORKED[column][0]
    assert tokens[:, -1].tolist() == [0] * per_setting


def test_repetition_penalty_changes_sampled_frequencies() -> None:
    # tokens 0 and 3 seen, penalty 2: logits log .5 = -.693 -> -1.386 (x2, negative), log .05 -> x2 = log .0025;
    # probabilities .25 .3 .15 .0025, sum .7025
    seen = torch.tensor([[True, False, False, True]])
    assert frequencies(seen, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=2.0) == pytest.approx(
        [0.3559, 0.4270, 0.2135, 0.0036], abs=0.015)


def test_generate_samples_the_real_models_tempered_top_k_distribution() -> None:
    """End to end through `generate`: the first answer token of many copies of one prompt, drawn in one batch,
    follows softmax(top-3 logits / 0.05) of the real model's next-token logits (worked out here with plain
    torch ops, not the sampler's filters)."""
    model = debug_model()
    with torch.no_grad():
        logits = model(torch.tensor([PROMPTS[0]])).logits[0, -1].double()
    top = torch.topk(logits, 3)
    expected = torch.softmax(top.values / 0.05, -1)
    draws = 6000
    out = generate(model, [PROMPTS[0]] * draws, max_new_tokens=1, temperature=0.05, top_k=3, top_p=1.0,
                   eos_token_id=None, generator=torch.Generator().manual_seed(0))
    tokens = torch.tensor([o[0] for o in out])
    assert set(tokens.tolist()) <= set(top.indices.tolist())
    freq = [(tokens == t).float().mean().item() for t in top.indices.tolist()]
    assert freq == pytest.approx(expected.tolist(), abs=0.025)  # standard error <= .0065
    # this random model's top logits are close together: at temperature 1 the three would be near 1/3 each
    assert (torch.softmax(top.values, -1) - expected).abs().max() > 0.05


def test_sample_rows_gives_each_row_its_own_settings_and_generator() -> None:
    logits = torch.log(torch.tensor(PROBS)).expand(2 * DRAWS // 4, 4)
    top2 = SamplingSettings(temperature=1.0, top_k=2, top_p=1.0)
    rows = len(logits)
    # half greedy, half top-k 2 (.5 .3 / .8 = .625 .375): the greedy rows always take token 0
    tokens = sample_rows(logits, None, [GREEDY, top2] * (rows // 2), [None] * rows)
    assert tokens[0::2].tolist() == [0] * (rows // 2)
    sampled = torch.bincount(tokens[1::2], minlength=4).float() / (rows // 2)
    assert sampled.tolist() == pytest.approx([0.625, 0.375, 0.0, 0.0], abs=0.02)  # 5000 draws: se <= .007
    # one setting for every row, no seed: one batched draw with the same distribution
    alike = torch.bincount(sample_rows(logits, None, [top2] * rows, [None] * rows), minlength=4).float() / rows
    assert alike.tolist() == pytest.approx([0.625, 0.375, 0.0, 0.0], abs=0.02)
    # a seeded row draws exactly what sample_next draws alone with the same seed
    hot = SamplingSettings(temperature=2.0, top_k=0, top_p=1.0)
    seeded = sample_rows(logits[:3], None, [hot] * 3, [torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    assert seeded.tolist() == [int(sample_next(logits[:1], sampling=hot, generator=torch.Generator().manual_seed(s)))
                               for s in (1, 2, 3)]
    one = torch.bincount(torch.cat([sample_rows(logits[:1], None, [top2], [None]) for _ in range(400)]), minlength=4)
    assert one[2:].tolist() == [0, 0] and 0 < one[1] < one[0]  # a single row alone: top-k 2 as well
    # greedy rows with a repetition penalty use each row's seen tokens: token 0 (logit log .5 -> x2) loses
    seen = torch.tensor([[True, False, False, False], [False, False, False, False]])
    penalised = SamplingSettings(do_sample=False, repetition_penalty=2.0)
    assert sample_rows(logits[:2], seen, [penalised] * 2, [None, None]).tolist() == [1, 0]
    seen3 = torch.tensor([[True, False, False, False]] * 2 + [[False] * 4])
    assert sample_rows(logits[:3], seen3, [penalised, GREEDY, penalised], [None] * 3).tolist() == [1, 0, 0]  # row by row
    # every row greedy: each row's own argmax
    mixed = torch.stack([logits[0], logits[0].flip(0), logits[0]])
    assert sample_rows(mixed, None, [GREEDY] * 3, [None] * 3).tolist() == [0, 3, 0]


def test_generate_applies_the_repetition_penalty_to_prompt_and_output() -> None:
    model = debug_model()
    reference = greedy_by_recomputation(model, PROMPTS[0], 12, penalty=2.0)
    assert reference != greedy_by_recomputation(model, PROMPTS[0], 12)  # the penalty changes this answer
    assert generate(model, [PROMPTS[0]], max_new_tokens=12, do_sample=False, repetition_penalty=2.0,
                    eos_token_id=None) == [reference]


class ConstantModel(torch.nn.Module):
    """Always predicts ``token`` (a model-shaped stand-in: logits and a one-layer cache)."""

    def __init__(self, token: int, vocab_size: int = 16) -> None:
        super().__init__()
        self.token, self.vocab_size = token, vocab_size
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, past_key_values=None, **_):
        from minimind_pl.model import CausalLMOutput

        b, t = input_ids.shape
        logits = torch.zeros(b, 1, self.vocab_size)
        logits[:, :, self.token] = 100.0  # every sampler picks it
        cache = torch.zeros(b, 1, t + (past_key_values[0][0].shape[2] if past_key_values else 0), 1)
        return CausalLMOutput(logits, torch.zeros(()), [(cache, cache)])


def test_generate_defaults_stop_at_minimind_s_eos_or_after_256_tokens() -> None:
    assert generate(ConstantModel(2), [[5]]) == [[]]  # eos (id 2) first: an empty answer
    assert list(stream_generate(ConstantModel(2), [5])) == []
    assert generate(ConstantModel(7), [[5]]) == [[7] * 256]
    assert list(stream_generate(ConstantModel(7), [5])) == [7] * 256


def test_sampling_settings_refuse_bad_values_with_the_numbers() -> None:
    with pytest.raises(ValueError, match=r"^temperature and top_k must be >= 0, got -0.5, 50$"):
        SamplingSettings(temperature=-0.5)
    with pytest.raises(ValueError, match=r"got 0.85, -1$"):
        SamplingSettings(top_k=-1)
    with pytest.raises(ValueError, match=r"^top_p must be in \(0, 1\] and repetition_penalty > 0, got 1.5, 1.0$"):
        SamplingSettings(top_p=1.5)
    with pytest.raises(ValueError, match=r"got 0.85, 0.0$"):
        SamplingSettings(repetition_penalty=0.0)
    with pytest.raises(ValueError, match=r"^every prompt needs at least one token$"):
        generate(ConstantModel(7), [[]])
    with pytest.raises(ValueError, match=r"^max_new_tokens must be >= 0, got -1$"):
        generate(ConstantModel(7), [[1]], max_new_tokens=-1)


def test_decode_batch_rows_join_a_single_row_and_leave_its_padding_behind() -> None:
    """A row joins a batch of one (no mask yet), two rows of different lengths join together, and once the long
    rows leave, the cache shrinks to what the remaining row uses and the mask goes."""
    model = debug_model()
    batch = DecodeBatch(model)
    outputs: list[list[int]] = [[]]
    with inference_step(model):
        batch.add([PROMPTS[1]])
        greedy_steps(batch, outputs, 2)
        batch.add([PROMPTS[0]])  # 1 + 2 cached keys vs 4: the batch's cache is left-padded
        outputs.append([])
        greedy_steps(batch, outputs, 2)
        batch.add([PROMPTS[2], [11, 12]])  # lengths 7 and 2 in one prefill, padded among themselves
        outputs += [[], []]
        greedy_steps(batch, outputs, 2)
        batch.keep([0, 3])  # the rows with 1 + 6 and 2 + 2 tokens stay: 7 columns, 2 of them padding for the second
        outputs = [outputs[0], outputs[3]]
        assert batch.cache[0][0].shape[2] == 7 and batch.mask.tolist() == [[1] * 7, [0] * 3 + [1] * 4]
        greedy_steps(batch, outputs, 1)
        batch.keep([0])  # alone, nothing is padded: no mask
        assert batch.mask is None and batch.cache[0][0].shape[2] == 8
        greedy_steps(batch, outputs[:1], 1)
    assert outputs[0] == alone(model, PROMPTS[1], 8) and outputs[1] == alone(model, [11, 12], 3)


def test_decode_batch_tracks_seen_tokens_and_survives_emptying() -> None:
    model = debug_model()
    batch = DecodeBatch(model, track_seen=True)
    with inference_step(model):
        batch.add([[5, 6, 6]])
        batch.add([[7], [8, 9]])
        batch.feed(torch.tensor([10, 11, 12]))
        assert [row.nonzero().flatten().tolist() for row in batch.seen] == [[5, 6, 10], [7, 11], [8, 9, 12]]
        batch.keep([2, 0])
        assert [row.nonzero().flatten().tolist() for row in batch.seen] == [[8, 9, 12], [5, 6, 10]]
        batch.keep([])
        assert batch.size == 0
        batch.add([[5, 6]])  # an emptied batch takes new rows
        outputs: list[list[int]] = [[]]
        greedy_steps(batch, outputs, 2)
    assert outputs[0] == alone(model, [5, 6], 2)


def test_rows_of_equal_length_leave_without_a_mask() -> None:
    model = debug_model()
    batch = DecodeBatch(model)
    outputs: list[list[int]] = [[], []]
    with inference_step(model):
        batch.add([[5, 6], [7, 8]])
        assert batch.mask is None
        greedy_steps(batch, outputs, 1)
        batch.keep([1])
        outputs = outputs[1:]
        greedy_steps(batch, outputs, 2)
    assert outputs[0] == alone(model, [7, 8], 3)


# ----------------------------------------------------------------------------- rows with images (MiniMind-V)

IMAGE_RUN = [12] * 16  # the tiny VLM's placeholder: 16 × id 12, one run per image


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    from helpers import random_vlm, tiny_tower_folder

    return random_vlm(tiny_tower_folder(tmp_path_factory.mktemp("tower") / "siglip"))


def pictures(n: int, seed: int) -> torch.Tensor:
    """(n, 3, 32, 32) preprocessed-looking pixels."""
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def greedy_full_forward(model, prompt: list[int], images: torch.Tensor, n: int) -> list[int]:
    """Reference: the whole sequence and its images through the model again for every token (no cache)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]), pixel_values=images[None]).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_continuation_with_images_equals_full_forward(vlm) -> None:
    prompt = [1, 5, *IMAGE_RUN, 7, 8, *IMAGE_RUN, 9]
    images = pictures(2, seed=1)
    out = generate(vlm, [prompt], max_new_tokens=8, do_sample=False, eos_token_id=None, images=[images])[0]
    assert out == greedy_full_forward(vlm, prompt, images, 8)
    streamed = list(stream_generate(vlm, prompt, 8, GREEDY, eos_token_id=None, images=images))
    assert streamed == out
    other = generate(vlm, [prompt], max_new_tokens=8, do_sample=False, eos_token_id=None,
                     images=[pictures(2, seed=2)])[0]
    assert other != out  # the images are read: other pictures, another answer


def test_image_rows_and_text_rows_batched_decode_as_each_alone(vlm) -> None:
    image_prompt, text_prompt = [1, *IMAGE_RUN, 30, 31], [4, 5, 6]
    image_two = [1, *IMAGE_RUN, 2, *IMAGE_RUN]
    rows = [(image_prompt, pictures(1, 3)), (text_prompt, None), (image_two, pictures(2, 4))]
    batched = generate(vlm, [p for p, _ in rows], max_new_tokens=6, do_sample=False, eos_token_id=None,
                       images=[i for _, i in rows])
    for (prompt, images), out in zip(rows, batched):
        assert out == generate(vlm, [prompt], max_new_tokens=6, do_sample=False, eos_token_id=None,
                               images=[images])[0]
    assert batched[1] == generate(vlm, [text_prompt], max_new_tokens=6, do_sample=False, eos_token_id=None)[0]


def test_an_image_row_joins_a_running_batch_at_its_own_prefill(vlm) -> None:
    """The server's case: a text row decodes, an image row joins later, the first leaves; each as alone."""
    image_prompt, images = [3, *IMAGE_RUN, 40], pictures(1, 5)
    batch, outputs = DecodeBatch(vlm), [[]]
    with inference_step(vlm):
        batch.add([[4, 5, 6]])
        greedy_steps(batch, outputs, 2)
        batch.add([image_prompt], [images])
        outputs.append([])
        greedy_steps(batch, outputs, 3)
        batch.keep([1])
        greedy_steps(batch, outputs[1:], 2)
    assert outputs[0] == greedy_by_recomputation(vlm, [4, 5, 6], 5)
    assert outputs[1] == greedy_full_forward(vlm, image_prompt, images, 5)


def test_images_must_fit_the_prompts() -> None:
    from minimind_pl.generation import stack_images

    assert stack_images([None, torch.zeros(0, 3, 4, 4)], 2, torch.device("cpu")) is None
    padded = stack_images([None, torch.ones(2, 3, 4, 4)], 2, torch.device("cpu"))
    assert padded.shape == (2, 2, 3, 4, 4) and padded[0].eq(0).all() and padded[1].eq(1).all()
    with pytest.raises(ValueError, match="one entry"):
        stack_images([torch.ones(1, 3, 4, 4)], 2, torch.device("cpu"))
    with pytest.raises(ValueError, match="same H, W"):
        stack_images([torch.ones(1, 3, 4, 4), torch.ones(1, 3, 8, 8)], 2, torch.device("cpu"))
