"""``fit`` and ``validate``: Lightning's ``LightningCLI`` with the project's links, checks and callbacks.

``cli.py`` imports this module only for the commands that train (``fit``, ``validate``, ``data prepare``, the
demo's training), so the other commands start without importing Lightning.

Shared settings: ``python main.py fit --config configs/<preset>/<stage>.yaml`` reads ``configs/<preset>/base.yaml``
first, i.e. it runs as ``fit --config configs/<preset>/base.yaml --config configs/<preset>/<stage>.yaml``
(``with_base_configs``). The base holds what every stage of the preset shares (seed, Trainer settings, logger,
checkpointing); the stage file only what differs, merged on top as a later ``--config`` always is.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ProgressBar

from minimind_pl.callbacks import SampleLogger, StopOnSignal, SyncFreeProgressBar
from minimind_pl.checkpoint_io import with_atomic_checkpoints
from minimind_pl.errors import UserError, reported_cause
from minimind_pl.lightning_compat import ResumingLightningCLI
from minimind_pl.stages.resume import check_resume


class MiniMindCLI(ResumingLightningCLI):
    """LightningCLI with the project's argument links and defaults.

    ``run_lightning`` starts it; it reads a preset's ``base.yaml`` before the preset's stage config
    (``with_base_configs``), so the stage files hold only what differs from the shared settings.
    """

    #: ``(--ckpt_path, what check_resume read)`` until the Trainer's checkpoint plugin takes it over.
    resumed: tuple[str, dict[str, Any]] | None = None

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

    def before_instantiate_classes(self) -> None:
        """Resume (``--ckpt_path``) with this run's arguments, saying what changed; another stage or another
        architecture is refused (``stages.resume.check_resume``). What it read is handed to Lightning, which
        would otherwise read the file again."""
        subcommand = self.config.get("subcommand")
        if not subcommand:  # run=False (data prepare): nothing is resumed
            return
        run = self.config[subcommand]
        saved = check_resume(run.get("ckpt_path"), run.model.class_path, namespace_dict(run.model.init_args),
                             namespace_dict(run.data.init_args))
        self.resumed = (run.ckpt_path, saved) if saved is not None else None

    def trainer_arguments(self, config: dict[str, Any], callbacks: list) -> tuple[dict[str, Any], list]:
        """Add the sample logger, the sync-free progress bar, the stop on SIGTERM/SIGINT and atomic checkpoint
        writes (each unless the config names its own, or disables the bar)."""
        named = list(config.get("callbacks") or []) + list(callbacks)
        if not any(isinstance(c, SampleLogger) for c in named):
            callbacks = [*callbacks, SampleLogger()]
        if config.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in named):
            callbacks = [*callbacks, SyncFreeProgressBar()]
        if not any(isinstance(c, StopOnSignal) for c in named):
            callbacks = [*callbacks, StopOnSignal()]
        resumed, self.resumed = self.resumed, None  # the Trainer's plugin holds it from now on
        return with_atomic_checkpoints(config, resumed), callbacks


def namespace_dict(namespace: Any) -> dict[str, Any]:
    """A parsed jsonargparse ``Namespace`` (or None) as nested plain dicts."""
    if namespace is None:
        return {}
    return namespace.as_dict() if hasattr(namespace, "as_dict") else dict(namespace)


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
