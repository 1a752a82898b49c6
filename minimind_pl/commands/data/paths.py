"""The paths the data tools read and write: each input checked, an output that is never one of the inputs."""
from __future__ import annotations

from pathlib import Path
from minimind_pl.data.parquet import is_parquet
from minimind_pl.errors import UserError, check_input_file


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


def input_files(paths: list[str], argument: str, parquet: bool = False) -> list[Path]:
    """The jsonl files a command reads, each checked (missing, a directory, unreadable); a Parquet file only where
    ``parquet`` says the command reads them (``data stats``), else a :class:`UserError`."""
    if not paths:
        raise UserError(f"name at least one jsonl file ({argument})")
    files = [check_input_file(path, argument) for path in paths]
    for path in files:
        if not parquet and is_parquet(path):
            raise UserError(f"{path} is a Parquet file; this command reads and writes jsonl (data stats reads both)")
    return files
