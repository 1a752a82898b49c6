"""``data clean`` speed (MB of jsonl per second per core) and peak memory, with near-duplicate removal.

    python bench/data_clean.py corpus --runs 3        # each file of ../shared/corpus, one process, best of 3
    python bench/data_clean.py big --gigabytes 1      # a generated file under /tmp, every core

Speed is given per wall-clock second and per CPU second of the processes (this one and its workers): on a shared
machine another load stretches the wall clock, while CPU seconds count only the work done here.

``big`` writes mostly distinct documents (random sentences of the corpus) with planted exact and near
duplicates, so the duplicate index grows as it would on a real dataset; peak memory is the largest resident set
of this process and of any worker (ru_maxrss).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import resource
import time
from pathlib import Path

from minimind_pl.commands.data.clean import clean_command

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"


def cpu_seconds() -> float:
    """CPU seconds of this process and its waited-for children (the workers), user + system."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def clean_timed(source: Path, output: Path, num_proc: int) -> dict:
    start, cpu_start = time.perf_counter(), cpu_seconds()
    with contextlib.redirect_stdout(io.StringIO()):
        report = clean_command(str(source), output=str(output), num_proc=num_proc, progress=False)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    size_mb = source.stat().st_size / 1e6
    return {"file": source.name, "MB": round(size_mb, 2), "seconds": round(seconds, 3), "processes": num_proc,
            "MB_per_s_per_core": round(size_mb / seconds / num_proc, 2), "cpu_seconds": round(cpu, 3),
            "MB_per_cpu_s": round(size_mb / cpu, 2), "kept": report["kept"],
            "removed": {k: v for k, v in report["removed"].items() if v}}


def generate(path: Path, gigabytes: float, seed: int = 0) -> None:
    """Documents of 4-12 random corpus sentences; every 50th an exact copy, every 50th a near copy."""
    sentences = [s for line in open(CORPUS / "pretrain_real.jsonl", encoding="utf-8")
                 for s in json.loads(line)["text"].split("\n") if len(s) > 10]
    rng = random.Random(seed)
    target, written, previous = int(gigabytes * 1e9), 0, "start"
    with open(path, "w", encoding="utf-8") as handle:
        while written < target:
            text = "\n".join(rng.choices(sentences, k=rng.randint(4, 12)))
            roll = rng.random()
            if roll < 0.02:
                text = previous
            elif roll < 0.04:
                text = previous + " (edited)"
            line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
            handle.write(line)
            written += len(line.encode("utf-8"))
            previous = text


def peak_memory_mb() -> dict:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"peak_rss_main_MB": round(own), "peak_rss_largest_worker_MB": round(children)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["corpus", "big"])
    parser.add_argument("--gigabytes", type=float, default=1.0)
    parser.add_argument("--num_proc", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--workdir", default="/tmp/minimind_data_bench")
    parser.add_argument("--runs", type=int, default=3, help="corpus: runs per file (each printed)")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.mode == "corpus":
        for run in range(args.runs):
            for name in ("pretrain_real.jsonl", "sft_real.jsonl", "dpo_real.jsonl"):
                print(json.dumps({"run": run + 1, **clean_timed(CORPUS / name, workdir / f"clean_{name}", 1)}))
        return
    source = workdir / f"generated_{args.gigabytes:g}GB.jsonl"
    if not source.exists():
        start = time.perf_counter()
        generate(source, args.gigabytes)
        print(f"generated {source} in {time.perf_counter() - start:.0f} s")
    print(json.dumps({**clean_timed(source, workdir / "clean_generated.jsonl", args.num_proc), **peak_memory_mb()}))


if __name__ == "__main__":
    main()
