"""A data file mapped block by block over a process pool, in file order, with a progress bar.

The token cache tokenizes through :func:`map_blocks`, and so do the data tools (``data stats``, ``data clean``):
one pool, one small-file rule, one progress loop. A jsonl block is a run of complete lines (about ``BLOCK_BYTES``);
a Parquet block is a batch of rows already read (:mod:`minimind_pl.data.parquet`); :func:`block_records` turns
either into ``(line number, record)`` pairs. The first line's number travels with a block, so errors name the
right line (or row) whatever the block size.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

from .jsonl import parse_block
from .parquet import RecordBlock, is_parquet, parquet_blocks

BLOCK_BYTES = 4 << 20  # bytes of jsonl per work item

_WORKER_TASK: Optional[Callable[..., Any]] = None


def _init_worker(task: Callable[..., Any]) -> None:
    global _WORKER_TASK
    # Ctrl+C reaches every process of the terminal's group: the parent alone handles it (its `finally`
    # terminates the pool); a worker dying of it mid-task could leave the parent waiting on the lost task.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER_TASK = task


def _run_task(*args: Any) -> Any:
    assert _WORKER_TASK is not None
    return _WORKER_TASK(*args)


def process_pool(num_proc: int, task: Callable[..., Any]) -> Any:
    """A pool of ``num_proc`` worker processes (forked where the platform can) that run ``task`` (picklable) on the
    arguments :func:`pool_results` gives them. Workers ignore Ctrl+C (SIGINT): the parent handles it and must
    terminate the pool (``pool.terminate()`` in a ``finally``)."""
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    return ctx.Pool(num_proc, initializer=_init_worker, initargs=(task,))


def pool_results(pool: Any, tasks: Iterator[tuple[tuple, int]], max_pending: int) -> Iterator:
    """``(task(*args), nbytes)`` of each ``(args, nbytes)`` run in ``pool`` (:func:`process_pool`'s task), in order,
    with at most ``max_pending`` in flight (bounded: RAM does not grow with the file)."""
    queue: deque = deque()
    for args, nbytes in tasks:
        queue.append((pool.apply_async(_run_task, args), nbytes))
        if len(queue) >= max_pending:
            res, nb = queue.popleft()
            yield res.get(), nb
    while queue:
        res, nb = queue.popleft()
        yield res.get(), nb


def iter_line_blocks(path: Path, hasher: Any = None,
                     block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[int, bytes, int]]:
    """Yield ``(first_line_number, block_of_complete_lines, bytes_consumed)``, hashing all bytes (if ``hasher``)."""
    line_no = 1
    pending = b""
    with open(path, "rb") as f:
        while True:
            block = f.read(block_bytes)
            if not block:
                if pending:
                    yield line_no, pending, len(pending)
                return
            if hasher is not None:
                hasher.update(block)
            data = pending + block
            cut = data.rfind(b"\n")
            if cut < 0:
                pending = data
                continue
            chunk, pending = data[:cut], data[cut + 1:]
            yield line_no, chunk, cut + 1
            line_no += chunk.count(b"\n") + 1


def iter_blocks(path: Path, hasher: Any = None,
                block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[int, Union[bytes, RecordBlock], int]]:
    """``(first line or row number, block, bytes consumed)`` of a jsonl or a Parquet file (by its content)."""
    if is_parquet(path):
        return parquet_blocks(path, hasher)
    return iter_line_blocks(path, hasher, block_bytes)


def block_records(first_line: int, block: Union[bytes, RecordBlock]) -> tuple[list, list, int]:
    """``(records, errors, n_lines)`` of a block of :func:`iter_blocks`: jsonl lines parsed, Parquet rows as read."""
    if isinstance(block, RecordBlock):
        return block.records, block.errors, block.n_lines
    return parse_block(first_line, block)


def progress_bar(total: int, desc: str, enabled: bool = True) -> Any:
    """A tqdm bar over ``total`` bytes (a no-op one when disabled)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with lightning
        enabled = False
    if not enabled:
        return contextlib.nullcontext(type("_NoBar", (), {"update": lambda self, n: None})())
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, dynamic_ncols=True)


def default_num_proc() -> int:
    """The CPUs this process may use, at most 32."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 32))


def map_blocks(path: Path, processor: Callable[[int, bytes], Any], num_proc: Optional[int], desc: str,
               progress: bool = True, block_bytes: int = BLOCK_BYTES, hasher: Any = None) -> Iterator[Any]:
    """``processor(first line number, block)`` of each block of ``path`` (:func:`iter_blocks`), in file order.

    Memory stays flat in the file size: at most two blocks per process are in flight. The pool is terminated when
    the generator ends or is closed (wrap it in ``contextlib.closing`` when the loop may stop early).

    Args:
        path: the jsonl (or Parquet) file.
        processor: a picklable callable run in the worker processes (:func:`block_records` reads its block).
        num_proc: worker processes (None: every CPU; 1, or a file of at most two blocks: this process).
        desc: the progress bar's label.
        progress: show the progress bar.
        block_bytes: bytes per block.
        hasher: a ``hashlib`` object updated with every byte of the file (the token cache's fingerprint).
    """
    size = path.stat().st_size
    num_proc = default_num_proc() if num_proc is None else max(1, int(num_proc))
    blocks = iter_blocks(path, hasher, block_bytes)
    pool = None
    try:
        if num_proc > 1 and size > 2 * block_bytes:
            pool = process_pool(num_proc, processor)
            tasks = (((first, data), nbytes) for first, data, nbytes in blocks)
            results = pool_results(pool, tasks, 2 * num_proc)
        else:
            results = ((processor(first, data), nbytes) for first, data, nbytes in blocks)
        with progress_bar(size, desc, progress) as bar:
            for result, nbytes in results:
                yield result
                bar.update(nbytes)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
