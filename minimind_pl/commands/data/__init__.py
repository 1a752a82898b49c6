"""``python main.py data <subcommand>``: look at, clean, split, mix and prepare datasets before training.

Every subcommand streams its files (memory stays flat in their size), shows a progress bar and prints a summary;
none modifies its input. ``prepare`` takes ``fit``'s arguments; the others are typed functions parsed by
jsonargparse, so ``data <subcommand> --help`` documents each argument.
"""
from __future__ import annotations

import importlib
import json
from typing import Any, Sequence

from minimind_pl.errors import UserError

# subcommand -> (module, function, positional arguments or None for prepare's own parsing, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str, Any, str]] = {
    "stats": ("stats", "stats_command", True,
              "documents, characters, tokens, lengths, languages, duplicates, padding waste: data stats FILE..."),
    "clean": ("clean", "clean_command", True,
              "normalise, filter and deduplicate (exact + MinHash near duplicates): data clean INPUT --output OUT"),
    "split": ("split_mix", "split_command", True, "a validation split by documents: data split INPUT --val_docs N"),
    "mix": ("split_mix", "mix_command", False,
            "several files mixed by weights into one, seeded: data mix --inputs A B --weights 2 1 --output OUT"),
    "prepare": ("prepare", "prepare_command", None,
                "build the token caches of a training config: data prepare --config CONFIG.yaml"),
}


# Arguments that take several values (``""``: the leading positional ones), written as on a shell command line.
LIST_ARGUMENTS = {"stats": ("",), "mix": ("--inputs", "--weights")}


def gather_lists(args: Sequence[str], options: Sequence[str]) -> list[str]:
    """``args`` with the values following each of ``options`` (``""``: the leading values) gathered into one JSON
    list, as jsonargparse reads a list: ``stats a.jsonl b.jsonl`` -> ``stats '["a.jsonl", "b.jsonl"]'``."""
    out: list[str] = []
    i = 0
    while i < len(args):
        option = "" if i == 0 and "" in options and not args[0].startswith("-") else args[i]
        if option not in options:
            out.append(args[i])
            i += 1
            continue
        start = i if option == "" else i + 1
        end = start
        while end < len(args) and not args[end].startswith("--"):
            end += 1
        values = args[start:end]
        one_list = len(values) == 1 and values[0].lstrip().startswith("[")  # already written as a list
        out += ([option] if option else []) + [values[0] if one_list else json.dumps(values)]
        i = end
    return out


def usage() -> str:
    """The ``data --help`` text: each subcommand with one line."""
    lines = ["usage: python main.py data <subcommand> [--help] ...", "", "subcommands:"]
    lines += [f"  {name:<8} {text}" for name, (_, _, _, text) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def data_command(args: list[str]) -> Any:
    """Run a ``data`` subcommand with the rest of ``args``."""
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return None
    if args[0] not in SUBCOMMANDS:
        raise UserError(f"unknown data subcommand {args[0]!r}; choose one of {', '.join(SUBCOMMANDS)}")
    module_name, function_name, positional, _ = SUBCOMMANDS[args[0]]
    function = getattr(importlib.import_module(f"{__name__}.{module_name}"), function_name)
    if positional is None:
        return function(args[1:])
    from jsonargparse import CLI

    rest = gather_lists(args[1:], LIST_ARGUMENTS.get(args[0], ()))
    return CLI(function, args=rest, prog=f"main.py data {args[0]}", as_positional=positional)

