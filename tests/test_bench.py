"""The benchmark scripts run (their figures are read in bench/RESULTS.md, never asserted here)."""

from __future__ import annotations

import json

from helpers import REPO, require_module, run_python


def test_throughput_benchmark_runs_every_runner_on_the_cpu(tmp_path, shared_dir):
    out = tmp_path / "throughput.json"
    result = run_python([str(REPO / "bench" / "throughput.py"), "--modes", "padded-loop,sft-loop,moe-fit",
                         "--steps", "2", "--warmup", "1", "--seq_len", "64", "--batch_size", "2",
                         "--corpus", str(shared_dir / "corpus"), "--tokenizer", str(shared_dir / "minimind"),
                         "--cache_dir", str(tmp_path / "cache"), "--out", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results["modes"]) == {"padded-loop", "sft-loop", "moe-fit"}
    assert all(mode["finite"] and mode["real_tokens_per_s"] > 0 for mode in results["modes"].values())
    assert results["modes"]["padded-loop"]["real_token_fraction"] < results["modes"]["sft-loop"]["real_token_fraction"]
    assert "packed_over_padded" in results["ratios"]
    table = result.stdout[result.stdout.rindex("\nmode "):]  # the table comes last
    assert all(f"\n{name} " in table for name in results["modes"]) and "packed_over_padded: " in table


def test_serve_batching_benchmark_runs(tmp_path, shared_dir):
    out = tmp_path / "serve.json"
    result = run_python([str(REPO / "bench" / "serve_batching.py"), "--sizes", "tiny", "--clients", "2",
                         "--max_tokens", "4", "--repeats", "1", "--tokenizer", str(shared_dir / "minimind"),
                         "--out", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["size"], r["mode"]) for r in rows] == [("tiny", "greedy"), ("tiny", "sampled")]
    for row in rows:  # 2 clients x 4 tokens, the bare loop 2 rows x 4 steps
        assert (row["single"]["tokens"], row["batched"]["tokens"], row["bare"]["tokens"]) == (4, 8, 8)
        assert row["bare_one_row"]["tokens"] == 4
        assert row["over_bare"] > 0 and row["over_single"] > 0
    assert "load average" in result.stdout and "\n       tiny sampled" in result.stdout


def test_decode_vs_llama_cpp_benchmark_runs_and_both_engines_decode_the_same_tokens(tmp_path):
    require_module("llama_cpp")
    out = tmp_path / "decode.json"
    result = run_python([str(REPO / "bench" / "decode_vs_llamacpp.py"), "--sizes", "tiny", "--new_tokens", "4",
                         "--repeats", "1", "--threads", "1", "--out", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = json.loads(out.read_text())
    for streams in ("1_stream", "8_stream"):  # llama.cpp's batched greedy tokens equal ours, row by row
        assert row[streams]["same_tokens"] is True and row[streams]["ours_over_llama_cpp"] > 0
