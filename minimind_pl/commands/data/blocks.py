"""Streaming a jsonl file through worker processes in blocks of lines, results in file order, with a progress bar,
and the checks and atomic writes of the files the data tools create."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from minimind_pl.data.cache import (BLOCK_BYTES, default_num_proc, iter_line_blocks, pool_results, process_pool,
                                    progress_bar)
from minimind_pl.errors import UserError, check_input_file


def map_blocks(path: Path, processor: Callable[[int, bytes], Any], num_proc: Optional[int], desc: str,
               progress: bool = True, block_bytes: int = BLOCK_BYTES) -> Iterator[Any]:
    """``processor(first line number, block of complete lines)`` of each block of ``path``, in file order.

    Memory stays flat in the file size: at most two blocks per process are in flight.

    Args:
        path: the jsonl file.
        processor: a picklable callable run in the worker processes.
        num_proc: worker processes (None: every CPU; 1, or a file of at most two blocks: this process).
        desc: the progress bar's label.
        progress: show the progress bar.
        block_bytes: bytes per block.
    """
    size = path.stat().st_size
    num_proc = default_num_proc() if num_proc is None else max(1, int(num_proc))
    blocks = iter_line_blocks(path, block_bytes=block_bytes)
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


def check_output(output: Path, inputs: list[Path], argument: str = "--output") -> Path:
    """``output`` as a path to write, refused when it is one of the ``inputs`` (the data tools never change
    their input)."""
    output = Path(output)
    for source in inputs:
        if output.resolve() == Path(source).resolve():
            raise UserError(f"{argument} {output} is an input file; the data tools never modify their input: "
                            "name another output file")
    if output.is_dir():
        raise UserError(f"{argument} {output} is a directory; name a .jsonl file to write")
    return output


def input_files(paths: list[str], argument: str) -> list[Path]:
    """The jsonl files a command reads, each checked (missing, a directory, unreadable)."""
    if not paths:
        raise UserError(f"name at least one jsonl file ({argument})")
    return [check_input_file(path, argument) for path in paths]
