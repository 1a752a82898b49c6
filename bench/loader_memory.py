"""Memory of DataLoader workers reading one token cache: the cache is memory-mapped, shared, never copied.

Writes a pretrain jsonl of ``--megabytes`` (the shared corpus repeated), builds its token cache, then reads
``--batches`` batches through the training loader with ``--workers`` workers and reports, for the main process and
each worker (Linux ``/proc/<pid>/smaps_rollup``): resident memory (RSS), proportional share (PSS: a page shared by n
processes counts 1/n in each) and private memory (pages no other process maps). If each worker copied the cache,
the private memory of each would grow with the cache; mapped, it stays the interpreter's own.

    python bench/loader_memory.py --megabytes 400 --workers 8
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from minimind_pl.data import PretrainDataModule

SHARED = Path(__file__).resolve().parents[2] / "shared"


def memory_mb(pid: int) -> dict[str, float]:
    """RSS, PSS and private memory of a process in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0]) / 1024
    return {"rss": fields["Rss"], "pss": fields["Pss"], "private": fields["Private_Clean"] + fields["Private_Dirty"]}


def children(pid: int) -> list[int]:
    """Direct child processes (the loader's workers)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(p) for p in (task / "children").read_text().split()]
    return found


def write_corpus(path: Path, megabytes: int) -> None:
    lines = (SHARED / "corpus" / "pretrain_real.jsonl").read_bytes()
    with path.open("wb") as out:
        for _ in range(max(1, megabytes * 2**20 // len(lines))):
            out.write(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=int, default=400)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/minimind_pl-loader-memory"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    corpus = args.work / "pretrain_big.jsonl"
    if not corpus.exists() or corpus.stat().st_size < args.megabytes * 2**20 * 0.9:
        write_corpus(corpus, args.megabytes)
    module = PretrainDataModule(train_path=str(corpus), seq_len=1024, batch_size=16, tokenizer=str(SHARED / "minimind"),
                                num_workers=args.workers, cache_dir=str(args.work / "cache"))
    module.prepare_data()
    module.setup("fit")
    cache_mb = sum(f.stat().st_size for cache in module.caches.values() for f in cache.path.iterdir()) / 2**20
    start = time.perf_counter()
    loader = iter(module.train_dataloader())
    for _ in range(args.batches):
        next(loader)
    seconds = time.perf_counter() - start
    workers = {pid: memory_mb(pid) for pid in children(os.getpid())}
    del loader  # shuts the workers down (else the interpreter waits for them at exit)
    result = {"jsonl_mb": corpus.stat().st_size / 2**20, "cache_mb": cache_mb, "workers": len(workers),
              "batches": args.batches, "seconds": seconds, "main": memory_mb(os.getpid()),
              "per_worker": list(workers.values())}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    print(f"jsonl {result['jsonl_mb']:.0f} MB -> token cache {cache_mb:.0f} MB; {args.batches} batches of 16 x 1024 "
          f"read by {len(workers)} workers in {seconds:.1f} s")
    print(f"{'process':<10}{'RSS MB':>10}{'PSS MB':>10}{'private MB':>12}")
    for name, mem in [("main", result["main"])] + [(f"worker {i}", m) for i, m in enumerate(workers.values())]:
        print(f"{name:<10}{mem['rss']:>10.0f}{mem['pss']:>10.0f}{mem['private']:>12.0f}")
    total_private = sum(m["private"] for m in workers.values())
    print(f"workers' private memory in all: {total_private:.0f} MB ({len(workers)} x {total_private / max(len(workers), 1):.0f}); "
          f"PSS of all processes: {result['main']['pss'] + sum(m['pss'] for m in workers.values()):.0f} MB")


if __name__ == "__main__":
    main()
