"""Decode speed against the reference engine: our eager KV-cache decoder vs llama.cpp on the same model and dtype.

For each size (random weights, MiniMind's tokenizer), the model is exported with ``export --format gguf`` (f32, and
bf16 with ``--dtypes f32,bf16``) and both engines decode greedily from the same chat prompt with the same number of
threads, ``--new_tokens`` tokens with no early stop, in one process, alternating ``--repeats`` times (the median is
reported):

- single stream: one prompt;
- 8 streams: 8 prompts decoded as one batch. Ours: ``generate`` (one ``DecodeBatch``). llama.cpp: its C API through
  llama-cpp-python's bindings (the high-level ``Llama`` class has no multi-sequence batch): one context with 8
  sequences, the prompts prefilled in one ``llama_decode``, then one ``llama_decode`` of 8 tokens per step, the
  greedy token of each sequence taken from its logits with numpy. The single stream runs through the same loop.

Tokens/s counts new tokens over wall time, prefill included (the prompt is 20-odd tokens). The greedy tokens of the
two engines are compared (f32: they must agree). Needs the dev extra (gguf, llama-cpp-python).

    python bench/decode_vs_llamacpp.py [--threads 2] [--new_tokens 64] [--repeats 3] [--dtypes f32,bf16] [--out x.json]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from minimind_pl.checkpoints.gguf import save_gguf
from minimind_pl.config import ModelConfig
from minimind_pl.generation import generate
from minimind_pl.model import MiniMindForCausalLM
from minimind_pl.tokenizer import Tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared"
SIZES = {  # name -> ModelConfig overrides of minimind-3 (tiny: 64 wide, 2 layers; demo: 128, 4; minimind-3: 768, 8)
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                 "num_key_value_heads": 2},
    "demo": {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                                  "num_key_value_heads": 2},
    "minimind-3": {},
}
STREAMS = 8
TORCH_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}
KV_TYPES = {"f32": 0, "bf16": 30}  # GGML_TYPE_F32, GGML_TYPE_BF16: llama.cpp's KV cache in the model's dtype, as ours


def random_model(overrides: dict) -> MiniMindForCausalLM:
    torch.manual_seed(0)
    return MiniMindForCausalLM(ModelConfig.from_preset("minimind-3", max_position_embeddings=1024, **overrides)).eval()


@contextlib.contextmanager
def llama_cpp_context(path: Path, threads: int, streams: int, kv_type: int):
    """(llama.cpp's C API, context, vocabulary size) for ``path``: ``streams`` sequences of up to 256 positions each,
    ``kv_type`` KV cache (ours: the model's dtype), llama.cpp's default model settings (its extra CPU buffer types,
    which crash on q8_0 weights on AMX CPUs, see tests/checkpoints/test_gguf.py, hold no f32 or bf16 kernels)."""
    from llama_cpp import _logger, llama_cpp as api

    _logger.set_verbose(False)  # llama.cpp's log goes through llama-cpp-python's logger: errors only
    model = api.llama_model_load_from_file(str(path).encode(), api.llama_model_default_params())
    params = api.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_seq_max = 256 * streams, 256 * streams, streams
    params.n_threads = params.n_threads_batch = threads
    params.type_k = params.type_v = kv_type
    context = api.llama_init_from_model(model, params)
    try:
        yield api, context, api.llama_vocab_n_tokens(api.llama_model_get_vocab(model))
    finally:
        api.llama_free(context)
        api.llama_model_free(model)


def llama_greedy(llama, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (one sequence each) decoded together through llama.cpp's batch API."""
    api, context, vocab = llama
    api.llama_memory_clear(api.llama_get_memory(context), True)
    batch = api.llama_batch_init(sum(map(len, prompts)), 0, 1)
    try:
        # prefill: every prompt in one batch, logits only at each prompt's last position
        entries = [(ids[p], p, row, p == len(ids) - 1) for row, ids in enumerate(prompts) for p in range(len(ids))]
        outputs = [[] for _ in prompts]
        for step in range(new_tokens):
            fill_batch(batch, entries)
            if api.llama_decode(context, batch) != 0:
                raise RuntimeError("llama_decode failed")
            logit_rows = [i for i, entry in enumerate(entries) if entry[3]]
            for row, i in enumerate(logit_rows):
                logits = np.ctypeslib.as_array(api.llama_get_logits_ith(context, i), shape=(vocab,))
                outputs[row].append(int(logits.argmax()))
            entries = [(outputs[row][-1], len(prompts[row]) + step, row, True) for row in range(len(prompts))]
        return outputs
    finally:
        api.llama_batch_free(batch)


def fill_batch(batch, entries: list[tuple[int, int, int, bool]]) -> None:
    """Write (token, position, sequence, wants logits) entries into a llama_batch."""
    for i, (token, position, sequence, logits) in enumerate(entries):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, position, 1, logits
        batch.seq_id[i][0] = sequence
    batch.n_tokens = len(entries)


def ours_greedy(model: MiniMindForCausalLM, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    with torch.inference_mode():
        return generate(model, prompts, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)


def timed(decode, *args) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    tokens = decode(*args)
    return time.perf_counter() - start, tokens


def measure(name: str, overrides: dict, dtype: str, tokenizer: Tokenizer, args: argparse.Namespace,
            folder: Path) -> dict:
    model = random_model(overrides).to(TORCH_DTYPES[dtype])
    path = save_gguf(model.state_dict(), model.config, tokenizer, folder / "model.gguf", dtype)
    prompt = tokenizer.encode_chat([{"role": "user", "content": "请介绍一下你自己, and say it in English too."}])
    row = {"model": name, "dtype": dtype, "parameters": sum(p.numel() for p in model.parameters())}
    for streams in (1, STREAMS):
        prompts = [prompt] * streams
        with llama_cpp_context(path, args.threads, streams, KV_TYPES[dtype]) as llama:
            ours_greedy(model, prompts, 4), llama_greedy(llama, prompts, 4)  # warm-up: first shapes are slow
            timings, same = [], True
            for _ in range(args.repeats):
                (ours_time, ours_tokens), (llama_time, llama_tokens) = (
                    timed(ours_greedy, model, prompts, args.new_tokens), timed(llama_greedy, llama, prompts, args.new_tokens))
                timings.append((ours_time, llama_time))
                same = same and ours_tokens == llama_tokens
        tokens = streams * args.new_tokens
        ours_rate = tokens / statistics.median(t for t, _ in timings)
        llama_rate = tokens / statistics.median(t for _, t in timings)
        row[f"{streams}_stream"] = {"ours_tokens_per_s": round(ours_rate, 1),
                                    "llama_cpp_tokens_per_s": round(llama_rate, 1),
                                    "ours_over_llama_cpp": round(ours_rate / llama_rate, 2), "same_tokens": same}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", default=",".join(SIZES), help="comma-separated names of SIZES to run")
    parser.add_argument("--dtypes", default="f32", help="comma-separated: f32, bf16")
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = Tokenizer.from_file(SHARED / "minimind")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, dtype in itertools.product(args.sizes.split(","), args.dtypes.split(",")):
            rows.append(measure(name, SIZES[name], dtype, tokenizer, args, Path(folder)))
            print(json.dumps(rows[-1], ensure_ascii=False), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2, ensure_ascii=False))
    print(f"\n{'model':12} {'dtype':5} {'streams':>7} {'ours tok/s':>11} {'llama.cpp tok/s':>16} {'ratio':>6} same")
    for row in rows:
        for streams in (1, STREAMS):
            cell = row[f"{streams}_stream"]
            print(f"{row['model']:12} {row['dtype']:5} {streams:>7} {cell['ours_tokens_per_s']:>11} "
                  f"{cell['llama_cpp_tokens_per_s']:>16} {cell['ours_over_llama_cpp']:>6} {cell['same_tokens']}")


if __name__ == "__main__":
    main()
