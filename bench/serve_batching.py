"""`serve` against its own decoder: the server's aggregate tokens/s with 8 streaming clients over the bare
`DecodeBatch` loop on the same model, batch and sampling settings, and over one client.

For each model size (random weights of the `decode_vs_llamacpp.SIZES` configs, MiniMind's tokenizer) the `serve`
server (`make_server`) runs in a subprocess, so clients and server do not share a Python interpreter; this process
builds the same model (same seed) for the bare loop. For each sampling mode (greedy; sampled: temperature 1.0,
top-p 0.85, top-k 50) it measures, after one untimed round of each (the CPU kernels are slow the first time they
meet a shape), ``--repeats`` rounds of, back to back:

- bare: the 8 chat prompts prefilled into one `DecodeBatch`, then ``--max_tokens`` steps of `sample_batch` +
  `feed`, the tokens handed to Python each step (what any consumer of the loop does), no early stop;
- one client streaming one chat answer of ``--max_tokens`` tokens;
- ``--clients`` clients at once.

The round with the median server/bare ratio is reported. Tokens are counted from the server-sent chunks' usage;
tokens/s is completion tokens over wall time, prefill and HTTP included. The machine's load average is recorded.

    python bench/serve_batching.py [--sizes tiny,demo,minimind-3] [--modes greedy,sampled] [--clients 8]
        [--max_tokens 64] [--repeats 2] [--threads 1] [--out x.json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from decode_vs_llamacpp import SIZES, random_model
from minimind_pl.generation import DecodeBatch, RowSampling, SamplingSettings, inference_step, sample_batch

SHARED = Path(__file__).resolve().parents[2] / "shared"
MODES = {  # name -> the request's sampling fields (the server's repetition penalty stays 1)
    "greedy": {"temperature": 0.0},
    "sampled": {"temperature": 1.0, "top_p": 0.85, "top_k": 50},
}


def question(i: int) -> str:
    """The i-th client's question (all about the same length)."""
    return f"请介绍一下你自己，第{i}次。"


def serve(args: argparse.Namespace) -> None:
    """The server process: a random model behind the API on a free port; prints the port, then serves."""
    from minimind_pl.commands.serve import ChatEngine, ServerSettings, make_server
    from minimind_pl.tokenizer import Tokenizer

    torch.set_num_threads(args.threads)
    model = random_model(SIZES[args.sizes])
    settings = ServerSettings(max_batch_size=args.clients)
    server = make_server(ChatEngine(model, Tokenizer.from_file(args.tokenizer), settings=settings), port=0,
                         access_log=False)
    print(server.server_address[1], flush=True)
    server.serve_forever()


def stream_answer(port: int, max_tokens: int, text: str, sampling: dict) -> int:
    """Stream one chat answer; returns its completion tokens (from the usage chunk)."""
    body = json.dumps({"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, **sampling,
                       "stream": True, "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    tokens = 0
    for line in response:
        if line.startswith(b"data: {"):
            usage = json.loads(line[6:]).get("usage")
            if usage:
                tokens = usage["completion_tokens"]
    conn.close()
    return tokens


def run_clients(port: int, clients: int, max_tokens: int, sampling: dict) -> dict[str, float]:
    """``clients`` concurrent streaming requests: total tokens, seconds, aggregate tokens/s."""
    counts = [0] * clients

    def client(i: int) -> None:
        counts[i] = stream_answer(port, max_tokens, question(i), sampling)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    return {"clients": clients, "tokens": sum(counts), "seconds": seconds, "tokens_per_s": sum(counts) / seconds}


def run_bare(model: torch.nn.Module, prompts: list[list[int]], max_tokens: int, sampling: SamplingSettings
             ) -> dict[str, float]:
    """The decoder alone: ``prompts`` as one batch, ``max_tokens`` steps, tokens to Python every step."""
    start = time.perf_counter()
    batch = DecodeBatch(model)
    with inference_step(model):
        batch.add(prompts)
    rows = RowSampling.of([sampling] * len(prompts), batch.logits.shape[-1], batch.device)
    for step in range(max_tokens):
        with inference_step(model):
            if step:
                batch.feed(tokens)
            tokens = sample_batch(batch.logits, None, rows)
        tokens.tolist()
    seconds = time.perf_counter() - start
    produced = len(prompts) * max_tokens
    return {"rows": len(prompts), "tokens": produced, "seconds": seconds, "tokens_per_s": produced / seconds}


def measure_mode(mode: str, model: torch.nn.Module, prompts: list[list[int]], port: int, args: argparse.Namespace
                 ) -> dict:
    """One sampling mode: a warm-up round, then ``--repeats`` rounds of (bare, one client, all clients)."""
    request = MODES[mode]
    sampling = SamplingSettings(repetition_penalty=1.0).with_overrides(**request)

    def one_round() -> tuple[dict, dict, dict]:
        return (run_bare(model, prompts, args.max_tokens, sampling), run_clients(port, 1, args.max_tokens, request),
                run_clients(port, args.clients, args.max_tokens, request))

    one_round()
    rounds = [one_round() for _ in range(args.repeats)]
    bare, single, batched = sorted(rounds, key=lambda r: r[2]["tokens_per_s"] / r[0]["tokens_per_s"])[len(rounds) // 2]
    return {"mode": mode, "bare": bare, "single": single, "batched": batched,
            "over_bare": batched["tokens_per_s"] / bare["tokens_per_s"],
            "over_single": batched["tokens_per_s"] / single["tokens_per_s"],
            "over_bare_rounds": [r[2]["tokens_per_s"] / r[0]["tokens_per_s"] for r in rounds],
            "over_single_rounds": [r[2]["tokens_per_s"] / r[1]["tokens_per_s"] for r in rounds]}


def measure_size(name: str, args: argparse.Namespace) -> list[dict]:
    """Every mode on one model size: its own server process, the bare loop here."""
    from minimind_pl.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_file(args.tokenizer)
    prompts = [tokenizer.encode_chat([{"role": "user", "content": question(i)}]) for i in range(args.clients)]
    model = random_model(SIZES[name])
    command = [sys.executable, __file__, "--serve", "--sizes", name, "--clients", str(args.clients),
               "--threads", str(args.threads), "--tokenizer", args.tokenizer]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        results = [measure_mode(mode, model, prompts, port, args) for mode in args.modes.split(",")]
    finally:
        server.terminate()
        server.wait(timeout=30)
    return [{"size": name, **row} for row in results]


def main() -> None:
    """Measure every size and mode; print and optionally write the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(SIZES), help="comma-separated names of SIZES")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated names of MODES")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="measured rounds; the median over_bare counts")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on each side (the machine is shared)")
    parser.add_argument("--tokenizer", default=str(SHARED / "minimind"))
    parser.add_argument("--out", help="write the figures as JSON here")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args)
        return
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows = [row for name in args.sizes.split(",") for row in measure_size(name, args)]
    results = {"threads": args.threads, "clients": args.clients, "max_tokens": args.max_tokens,
               "load_average": {"before": load_before, "after": os.getloadavg()}, "rows": rows}
    print(f"{'size':>11}{'mode':>8}{'bare':>9}{'1 client':>10}{f'{args.clients} clients':>11}"
          f"{'/bare':>7}{'/1 client':>10}   (tokens/s)")
    for row in rows:
        print(f"{row['size']:>11}{row['mode']:>8}{row['bare']['tokens_per_s']:>9.1f}"
              f"{row['single']['tokens_per_s']:>10.1f}{row['batched']['tokens_per_s']:>11.1f}"
              f"{row['over_bare']:>7.2f}{row['over_single']:>10.2f}")
    print(f"load average (1, 5, 15 min): before {load_before}, after {results['load_average']['after']}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
