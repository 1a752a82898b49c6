"""Continuous batching of `serve`: aggregate tokens/s of 8 concurrent streaming clients over one client's.

Starts the `serve` server (`make_server`) in a subprocess (a random model of the given size with MiniMind's
tokenizer, so clients and server do not share a Python interpreter), then streams greedy chat answers of
`--max_tokens` tokens: one client alone, then `--clients` at once, `--repeats` times (after one untimed round
of each, as the CPU kernels are slow the first time they meet a shape); the round with the median ratio is
reported. Tokens are counted from the server-sent chunks' usage; tokens/s is completion tokens over wall time.

    python bench/serve_batching.py [--clients 8] [--max_tokens 128] [--hidden_size 128] [--layers 4] [--threads 1]
        [--out x.json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"


def serve(args: argparse.Namespace) -> None:
    """The server process: a random model behind the API on a free port; prints the port, then serves."""
    import torch

    from minimind_pl.commands.serve import ChatEngine, ServerSettings, make_server
    from minimind_pl.config import ModelConfig
    from minimind_pl.model import MiniMindForCausalLM
    from minimind_pl.tokenizer import Tokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = ModelConfig(hidden_size=args.hidden_size, num_hidden_layers=args.layers, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=1024)
    model = MiniMindForCausalLM(config).eval()
    settings = ServerSettings(max_batch_size=args.clients)
    server = make_server(ChatEngine(model, Tokenizer.from_file(args.tokenizer), settings=settings), port=0,
                         access_log=False)
    print(server.server_address[1], flush=True)
    server.serve_forever()


def stream_answer(port: int, max_tokens: int, question: str, temperature: float = 0.0) -> int:
    """Stream one chat answer (greedy at temperature 0); returns its completion tokens (from the usage chunk)."""
    body = json.dumps({"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
                       "temperature": temperature, "stream": True, "stream_options": {"include_usage": True}})
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


def run_clients(port: int, clients: int, max_tokens: int, temperature: float = 0.0) -> dict[str, float]:
    """``clients`` concurrent streaming requests: total tokens, seconds, aggregate tokens/s."""
    counts = [0] * clients

    def client(i: int) -> None:
        counts[i] = stream_answer(port, max_tokens, f"请介绍一下你自己，第{i}次。", temperature)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    return {"clients": clients, "tokens": sum(counts), "seconds": seconds, "tokens_per_s": sum(counts) / seconds}


def main() -> None:
    """Start the server, measure one client then many, print and optionally write the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3,
                        help="measured rounds (one client, then all); the median counts")
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sampling temperature of every request (0: greedy; the server's default is 0.85)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server (the machine is shared)")
    parser.add_argument("--tokenizer", default=str(SHARED / "minimind"))
    parser.add_argument("--out", help="write the figures as JSON here")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args)
        return
    command = [sys.executable, __file__, "--serve", "--clients", str(args.clients), "--hidden_size",
               str(args.hidden_size), "--layers", str(args.layers), "--threads", str(args.threads),
               "--tokenizer", args.tokenizer]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        for clients in (1, args.clients):  # warm-up: the CPU kernels first meet each shape slowly
            run_clients(port, clients, args.max_tokens, args.temperature)
        rounds = [(run_clients(port, 1, args.max_tokens, args.temperature),
                   run_clients(port, args.clients, args.max_tokens, args.temperature))
                  for _ in range(args.repeats)]
    finally:
        server.terminate()
        server.wait(timeout=30)
    # the round of median ratio: one client then all of them, back to back, so both see the same machine load
    single, batched = sorted(rounds, key=lambda r: r[1]["tokens_per_s"] / r[0]["tokens_per_s"])[len(rounds) // 2]
    ratio = batched["tokens_per_s"] / single["tokens_per_s"]
    results = {"model": {"hidden_size": args.hidden_size, "layers": args.layers}, "threads": args.threads,
               "max_tokens": args.max_tokens, "single": single, "batched": batched, "ratio": ratio,
               "ratios": [b["tokens_per_s"] / s["tokens_per_s"] for s, b in rounds]}
    print(f"{'clients':>8}{'tokens':>8}{'seconds':>9}{'tokens/s':>10}")
    for row in (single, batched):
        print(f"{row['clients']:>8}{row['tokens']:>8}{row['seconds']:>9.2f}{row['tokens_per_s']:>10.1f}")
    print(f"ratio: {ratio:.2f} (median of {', '.join(f'{r:.2f}' for r in results['ratios'])})")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
