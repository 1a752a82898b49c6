"""Decode speed against the reference engine: our eager KV-cache decoder vs llama.cpp on the same model and dtype.

For each size (random weights, MiniMind's tokenizer), the model is exported with ``export --format gguf`` (f32) and
both engines decode greedily from the same chat prompt with the same number of threads, ``--new_tokens`` tokens
with no early stop, in one process, alternating ``--repeats`` times (the median is reported):

- single stream: one prompt;
- 8 streams: ours decodes the 8 prompts as one batch (``generate``); llama-cpp-python's ``Llama`` decodes one
  sequence at a time (its high-level class has no multi-sequence batch), so its 8-stream figure is 8 sequential
  streams, the throughput a llama-cpp-python user gets for 8 requests.

Tokens/s counts new tokens over wall time, prefill included (the prompt is 20-odd tokens). Needs the dev extra
(gguf, llama-cpp-python).

    python bench/decode_vs_llamacpp.py [--threads 2] [--new_tokens 64] [--repeats 3] [--out x.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

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


def random_model(overrides: dict) -> MiniMindForCausalLM:
    torch.manual_seed(0)
    return MiniMindForCausalLM(ModelConfig.from_preset("minimind-3", max_position_embeddings=1024, **overrides)).eval()


@contextlib.contextmanager
def llama_cpp_model(path: Path, threads: int):
    """The GGUF file in llama.cpp (f32 KV cache as ours; extra CPU buffer types off: see tests/checkpoints/test_gguf.py)."""
    import llama_cpp

    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def without_extra_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_cpp.llama_model_default_params = without_extra_buffers
    llm = llama_cpp.Llama(str(path), n_ctx=256, n_threads=threads, n_threads_batch=threads, verbose=False,
                          type_k=0, type_v=0)
    try:
        yield llm
    finally:
        llm.close()
        llama_cpp.llama_cpp.llama_model_default_params = defaults


def ours_seconds(model: MiniMindForCausalLM, prompts: list[list[int]], new_tokens: int) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        generate(model, prompts, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
    return time.perf_counter() - start


def llama_seconds(llm, prompts: list[list[int]], new_tokens: int) -> float:
    start = time.perf_counter()
    for ids in prompts:  # one sequence at a time: the high-level API has no multi-sequence batch
        llm.reset()
        for n, _ in enumerate(llm.generate(ids, temp=0.0, top_k=1, reset=True), start=1):
            if n == new_tokens:
                break
    return time.perf_counter() - start


def measure(name: str, overrides: dict, tokenizer: Tokenizer, args: argparse.Namespace, folder: Path) -> dict:
    model = random_model(overrides)
    path = save_gguf(model.state_dict(), model.config, tokenizer, folder / "model.gguf", "f32")
    prompt = tokenizer.encode_chat([{"role": "user", "content": "请介绍一下你自己, and say it in English too."}])
    row = {"model": name, "parameters": sum(p.numel() for p in model.parameters())}
    with llama_cpp_model(path, args.threads) as llm:
        for streams in (1, STREAMS):
            prompts = [prompt] * streams
            ours_seconds(model, prompts, 4), llama_seconds(llm, prompts[:1], 4)  # warm-up: first shapes are slow
            timings = [(ours_seconds(model, prompts, args.new_tokens), llama_seconds(llm, prompts, args.new_tokens))
                       for _ in range(args.repeats)]
            tokens = streams * args.new_tokens
            ours_rate = tokens / statistics.median(t for t, _ in timings)
            llama_rate = tokens / statistics.median(t for _, t in timings)
            row[f"{streams}_stream"] = {"ours_tokens_per_s": round(ours_rate, 1),
                                        "llama_cpp_tokens_per_s": round(llama_rate, 1),
                                        "ours_over_llama_cpp": round(ours_rate / llama_rate, 2)}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", default=",".join(SIZES), help="comma-separated names of SIZES to run")
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = Tokenizer.from_file(SHARED / "minimind")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.sizes.split(","):
            rows.append(measure(name, SIZES[name], tokenizer, args, Path(folder)))
            print(json.dumps(rows[-1], ensure_ascii=False), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2, ensure_ascii=False))
    print(f"\n{'model':12} {'streams':>7} {'ours tok/s':>11} {'llama.cpp tok/s':>16} {'ratio':>6}")
    for row in rows:
        for streams in (1, STREAMS):
            cell = row[f"{streams}_stream"]
            print(f"{row['model']:12} {streams:>7} {cell['ours_tokens_per_s']:>11} "
                  f"{cell['llama_cpp_tokens_per_s']:>16} {cell['ours_over_llama_cpp']:>6}")


if __name__ == "__main__":
    main()
