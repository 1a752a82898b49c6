"""Command line: ``python main.py <command> ...``.

Training commands (``fit``, ``validate``) go to Lightning's ``LightningCLI`` with the stage
and data classes chosen in YAML (``class_path`` / ``init_args``). The other commands are typed Python
functions exposed through jsonargparse, so every command parses and documents its arguments the same way.

Shared settings: ``python main.py fit --config configs/<preset>/<stage>.yaml`` reads ``configs/<preset>/base.yaml``
first, i.e. it runs as ``fit --config configs/<preset>/base.yaml --config configs/<preset>/<stage>.yaml``
(``with_base_configs``). The base holds what every stage of the preset shares (seed, Trainer settings, logger,
checkpointing); the stage file only what differs, merged on top as a later ``--config`` always is.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from minimind_pl.callbacks import SampleLogger, StopOnSignal, SyncFreeProgressBar
from minimind_pl.checkpoint_io import with_atomic_checkpoints
from minimind_pl.checkpoints.files import read_torch_file
from minimind_pl.errors import DEBUG_ENV, REPORTED_ERRORS, UserError, reported_cause
from minimind_pl.stages.resume import ResumeReport

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

# command -> (module, function, one-line help) of commands that take their arguments as they are (a group of
# subcommands, or LightningCLI's arguments).
GROUP_COMMANDS: dict[str, tuple[str, str, str]] = {
    "data": ("minimind_pl.commands.data", "data_command",
             "datasets before training: data stats | clean | split | mix | prepare (data --help lists them)"),
}


class MiniMindCLI(LightningCLI):
    """LightningCLI with the project's argument links and defaults.

    ``run_lightning`` starts it; it reads a preset's ``base.yaml`` before the preset's stage config
    (``with_base_configs``), so the stage files hold only what differs from the shared settings.
    """

    def add_arguments_to_parser(self, parser) -> None:
        """Share the tokenizer and the row length between data and model.

        The stage checks that the tokenizer fits the model's vocabulary and the rows fit its positions,
        and uses the tokenizer to log generated samples.
        """
        parser.link_arguments("data.init_args.tokenizer", "model.init_args.tokenizer")
        parser.link_arguments("data.init_args.seq_len", "model.init_args.seq_len")

    def instantiate_classes(self) -> None:
        """Build the stage, the DataModule and the Trainer; an error of ours raised while jsonargparse builds them
        comes out as itself, not buried in jsonargparse's "Does not validate against any of the Union subtypes"."""
        try:
            super().instantiate_classes()
        except Exception as error:
            cause = reported_cause(error)
            if cause is None or cause is error:
                raise
            raise cause from None

    def before_fit(self) -> None:
        """A stage that optimises by hand (the RL stages) clips and steps itself: refuse Trainer settings that
        Lightning would reject with a traceback."""
        model, trainer = self.model, self.trainer
        if not getattr(model, "automatic_optimization", True):
            clip, accumulate = trainer.gradient_clip_val, trainer.accumulate_grad_batches
            if clip or accumulate != 1:
                raise UserError(f"{type(model).__name__} clips and steps by itself: set --trainer.gradient_clip_val "
                                f"null (got {clip}; clip with --model.max_grad_norm) and --trainer.accumulate_grad_batches "
                                f"1 (got {accumulate})")

    def _parse_ckpt_path(self) -> None:
        """Resume (``--ckpt_path``) with this run's arguments, saying what changed.

        LightningCLI would replace the model's arguments with the ones saved in the checkpoint, silently
        dropping e.g. a lower ``--model.learning_rate`` given to recover from a loss spike. Here this run's
        training settings stay and are listed; another stage or another architecture is refused.
        """
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        saved = read_torch_file(ckpt_path)
        run = self.config[subcommand]
        check_same_stage(ckpt_path, saved.get("stage"), run.model.class_path)
        report = ResumeReport().compare(saved.get("hyper_parameters") or {}, namespace_dict(run.model.init_args), "model")
        report.compare(saved.get("datamodule_hyper_parameters") or {}, namespace_dict(run.data.init_args), "data")
        if report.architecture:
            raise UserError(f"{ckpt_path} was trained with another architecture than this run's: "
                            f"{'; '.join(report.architecture)}. Resume with the checkpoint's values (pass them as "
                            f"--model.config.<field>), or start a new run from its weights with --model.init_weights.")
        if report.changes:
            rank_zero_info(f"Resuming from {ckpt_path} with these arguments changed (this run's values are used): "
                           + "; ".join(report.changes))

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Any:
        """Add the sample logger, the sync-free progress bar, the stop on SIGTERM/SIGINT and atomic checkpoint
        writes (each unless the config names its own, or disables the bar)."""
        named = list(config.get("callbacks") or []) + list(callbacks)
        if not any(isinstance(c, SampleLogger) for c in named):
            callbacks = [*callbacks, SampleLogger()]
        if config.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in named):
            callbacks = [*callbacks, SyncFreeProgressBar()]
        if not any(isinstance(c, StopOnSignal) for c in named):
            callbacks = [*callbacks, StopOnSignal()]
        return super()._instantiate_trainer(with_atomic_checkpoints(config), callbacks)


def namespace_dict(namespace: Any) -> dict[str, Any]:
    """A parsed jsonargparse ``Namespace`` (or None) as nested plain dicts."""
    if namespace is None:
        return {}
    return namespace.as_dict() if hasattr(namespace, "as_dict") else dict(namespace)


def check_same_stage(ckpt_path: str, saved_stage: str | None, class_path: str) -> None:
    """``--ckpt_path`` continues a run of the same stage; starting another stage from it is ``--model.init_weights``."""
    stage = class_path.rsplit(".", 1)[-1]
    if saved_stage and saved_stage != stage:
        raise UserError(f"{ckpt_path} is a {saved_stage} checkpoint but this config trains {stage}: --ckpt_path "
                        f"resumes a run of the same stage. To start {stage} from its weights, use "
                        f"--model.init_weights {ckpt_path} instead.")


BASE_CONFIG = "base.yaml"


def _is_file(path: Path) -> bool:
    """Whether ``path`` is an existing file (False for a config string too long to be a file name)."""
    try:
        return path.is_file()
    except OSError:
        return False


def with_base_configs(args: list[str]) -> list[str]:
    """``args`` with ``--config <folder>/base.yaml`` put before the first ``--config <folder>/<file>`` of each folder
    that has a ``base.yaml`` (the preset's shared settings; see the module docstring).

    jsonargparse merges several ``--config`` files in order: a later file overrides single values, merges a
    class's ``init_args`` (a ``logger`` or ``callbacks`` entry without ``class_path`` keeps the earlier class and
    arguments) and merges a list of callbacks of the same length entry by entry. Config strings (``--config
    '{...}'``) and a base named on the command line itself are left as they are.
    """
    out: list[str] = []
    done: set[Path] = set()
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-c", "--config") and i + 1 < len(args):
            value, taken = args[i + 1], 2
        elif arg.startswith("--config="):
            value, taken = arg.split("=", 1)[1], 1
        else:
            out.append(arg)
            i += 1
            continue
        path = Path(value)
        if _is_file(path):
            base = path.parent / BASE_CONFIG
            if base.is_file() and base.resolve() not in done:
                done.add(base.resolve())
                if path.resolve() != base.resolve():
                    out += ["--config", str(base)]
        out += args[i:i + taken]
        i += taken
    return out


def run_lightning(args: list[str], extra_callbacks: list | None = None,
                  cli_class: type[MiniMindCLI] = MiniMindCLI, run: bool = True) -> MiniMindCLI:
    """Run a LightningCLI subcommand (``fit``, ``validate``, ...) with the given arguments.

    A ``--config configs/<preset>/<stage>.yaml`` is read on top of ``configs/<preset>/base.yaml``
    (``with_base_configs``). ``extra_callbacks`` are added to every run beside the ones the config names
    (programmatic use). With ``run=False`` ``args`` name no subcommand: the config is parsed and ``cli_class``
    instantiates what it needs (``data prepare`` builds only the DataModule).
    """
    from lightning import LightningDataModule

    from minimind_pl.stages import Stage

    # The arguments are always passed explicitly (main() strips the program name; the demo builds its own).
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    return cli_class(
        Stage,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=with_base_configs(args),
        trainer_defaults={"callbacks": list(extra_callbacks or [])},
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        run=run,
    )


def run_tool(command: str, args: list[str]) -> Any:
    """Parse ``args`` against the typed signature of a tool command's function and call it."""
    from jsonargparse import CLI

    module_name, function_name, _ = TOOL_COMMANDS[command]
    function: Callable = getattr(importlib.import_module(module_name), function_name)
    return CLI(function, args=args, prog=f"main.py {command}", as_positional=False)


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
        return run_lightning(argv)
    print(f"unknown command {command!r}\n\n{usage()}", file=sys.stderr)
    raise SystemExit(2)
