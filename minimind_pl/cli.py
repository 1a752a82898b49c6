"""Command line: ``python main.py <command> ...``.

Training commands (``fit``, ``validate``) go to Lightning's ``LightningCLI`` (``training_cli.MiniMindCLI``) with
the stage and data classes chosen in YAML (``class_path`` / ``init_args``). The other commands are typed Python
functions exposed through jsonargparse, so every command parses and documents its arguments the same way.

Start-up: this module imports no Lightning. ``--help`` and the tools that do not train (``chat``, ``serve``,
``eval``, ``export``, ``generate``, ``tokenizer``, ``data``) start without it; ``training_cli`` (Lightning) is
imported only when a command trains. Its names (``MiniMindCLI``, ``run_lightning``, ``with_base_configs``, ...)
can still be imported from here; that import loads it.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any, Callable

from minimind_pl.errors import DEBUG_ENV, REPORTED_ERRORS
from minimind_pl.lazy import lazy_exports

TRAINING_COMMANDS = {
    "fit": "train a stage: python main.py fit --config configs/<preset>/<stage>.yaml [--ckpt_path to resume]",
    "validate": "validation loss/perplexity of a checkpoint: python main.py validate --config ... --ckpt_path ...",
}

# command -> (module, function, one-line help). Modules are imported only when their command runs.
TOOL_COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("minimind_pl.demo.command", "demo_command", "generate the demo corpus and train every stage on CPU, then chat"),
    "tokenizer": ("minimind_pl.commands.tokenizer", "tokenizer_command", "train a byte-level BPE tokenizer on jsonl files"),
    "chat": ("minimind_pl.commands.chat", "chat_command", "chat with a checkpoint in the terminal (streaming)"),
    "generate": ("minimind_pl.commands.generate", "generate_command",
                 "answer prompts with a teacher checkpoint, writing SFT jsonl (black-box distillation)"),
    "export": ("minimind_pl.commands.export", "export_command",
               "write a checkpoint as a MiniMind .pth or a Hugging Face (Qwen3) directory for transformers/vLLM/llama.cpp"),
    "serve": ("minimind_pl.commands.serve", "serve_command", "OpenAI-compatible chat API and a web chat page"),
    "eval": ("minimind_pl.commands.evaluate", "eval_command",
             "loss / perplexity / bits per byte on a jsonl, or multiple-choice accuracy"),
}

# command -> its list arguments that may be repeated (``--image a.jpg --image b.jpg``), which jsonargparse writes
# ``--image+ a.jpg --image+ b.jpg``.
REPEATABLE_ARGUMENTS: dict[str, tuple[str, ...]] = {"chat": ("image",)}

# command -> (module, function, one-line help) of commands that take their arguments as they are (a group of
# subcommands, or LightningCLI's arguments).
GROUP_COMMANDS: dict[str, tuple[str, str, str]] = {
    "data": ("minimind_pl.commands.data", "data_command",
             "datasets before training: data stats | clean | split | mix | prepare (data --help lists them)"),
}


#: Names defined in ``training_cli`` (it imports Lightning) that callers import from ``minimind_pl.cli``.
TRAINING_CLI_NAMES = ("MiniMindCLI", "run_lightning", "namespace_dict", "with_base_configs", "BASE_CONFIG")


__getattr__, _ = lazy_exports(__name__, dict.fromkeys(TRAINING_CLI_NAMES, "minimind_pl.training_cli"))


def run_tool(command: str, args: list[str]) -> Any:
    """Parse ``args`` against the typed signature of a tool command's function and call it."""
    from jsonargparse import CLI

    module_name, function_name, _ = TOOL_COMMANDS[command]
    function: Callable = getattr(importlib.import_module(module_name), function_name)
    return CLI(function, args=repeated_as_appended(args, REPEATABLE_ARGUMENTS.get(command, ())),
               prog=f"main.py {command}", as_positional=False)


def repeated_as_appended(args: list[str], names: tuple[str, ...]) -> list[str]:
    """``args`` with each ``--NAME VALUE`` / ``--NAME=VALUE`` of a repeatable list argument written as jsonargparse's
    append form ``--NAME+ VALUE``, so that every occurrence adds one item."""
    out = []
    for arg in args:
        flag, eq, value = arg.partition("=")
        if flag.startswith("--") and flag[2:] in names:
            out += [f"{flag}+"] + ([value] if eq else [])
        else:
            out.append(arg)
    return out


def usage() -> str:
    """The top-level ``--help`` text: every command with one line each."""
    lines = ["usage: python main.py <command> [--help] [arguments]", "", "training (LightningCLI):"]
    lines += [f"  {name:<10} {text}" for name, text in TRAINING_COMMANDS.items()]
    lines += ["", "tools:"]
    lines += [f"  {name:<10} {text}" for name, (_, _, text) in {**TOOL_COMMANDS, **GROUP_COMMANDS}.items()]
    lines += ["", "python main.py <command> --help shows the arguments of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Any:
    """Entry point of ``python main.py`` and the ``minimind-pl`` console script.

    Errors the project reports (``errors.ReportedError``: user mistakes, a run that stopped) and missing or
    unreadable files end in one ``error:`` line and a non-zero exit; ``MINIMIND_DEBUG=1`` re-raises them with
    the traceback.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return dispatch(argv)
    except REPORTED_ERRORS as error:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        code = getattr(error, "exit_code", 2)
        print(f"error: {error}\n(set {DEBUG_ENV}=1 to see the traceback)", file=sys.stderr)
        raise SystemExit(code) from None


def dispatch(argv: list[str]) -> Any:
    """Run ``argv[0]`` (a training or tool command) with the rest of the arguments."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return None
    command, rest = argv[0], argv[1:]
    if command in TOOL_COMMANDS:
        return run_tool(command, rest)
    if command in GROUP_COMMANDS:
        module_name, function_name, _ = GROUP_COMMANDS[command]
        return getattr(importlib.import_module(module_name), function_name)(rest)
    if command in TRAINING_COMMANDS:
        from minimind_pl.training_cli import run_lightning

        return run_lightning(argv)
    print(f"unknown command {command!r}\n\n{usage()}", file=sys.stderr)
    raise SystemExit(2)
