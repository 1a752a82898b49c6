"""Resuming a run (``--ckpt_path``), in one place: the check before anything is built, and what the stage
restores besides weights, optimizer and loop.

The checkpoint is read once. ``check_resume`` (called by the CLI before it builds the stage) reads it, refuses
another stage or architecture and lists the arguments that changed; the CLI hands what it read to the
checkpoint plugin (``checkpoint_io.AtomicCheckpointIO``), so Lightning restores from it instead of reading the
file again. The stage's hooks keep a ``ResumedRun`` of it and apply it when training starts again: changed
optimizer settings, then the RNG states right before the first step.

Random number generators (torch CPU and CUDA, numpy, python) are saved with every checkpoint, so dropout
draws the same masks after a resume as in a run that was never interrupted. They are stored as tensors and
plain Python values, which ``torch.load(weights_only=True)`` accepts.

A resumed run keeps the arguments it was started with now: training-only settings (learning rate,
schedule, dropout, batch size, ...) may change, and ``ResumeReport`` lists what did; the architecture and
the stage may not.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from minimind_pl.checkpoints.files import read_torch_file
from minimind_pl.config import TRAINING_ONLY_FIELDS, ModelConfig
from minimind_pl.errors import UserError

#: Stage arguments that define the optimizer's param groups and schedule (applied again after a resume).
OPTIMIZER_HPARAMS = ("learning_rate", "weight_decay", "betas", "warmup_ratio", "min_lr_ratio")
#: Arguments that do not matter once training resumes: the weights come from the checkpoint.
IGNORED_ON_RESUME = frozenset({"init_weights", "_instantiator", "_class_path"})


def collect_rng_states() -> dict[str, Any]:
    """The state of every random number generator a training step may draw from."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Put back what ``collect_rng_states`` saved (a generator missing from ``states`` is left as it is)."""
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "numpy" in states:
        kind, keys, pos, has_gauss, gauss = states["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "python" in states:
        version, internal, gauss_next = states["python"]
        random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def plain(value: Any) -> Any:
    """``value`` with tuples as lists and mappings as dicts, so saved and parsed arguments compare equal."""
    if hasattr(value, "items"):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


@dataclass
class ResumeReport:
    """How this run's arguments differ from the checkpoint's: ``changes`` take effect, ``architecture`` is refused."""

    changes: list[str] = field(default_factory=list)
    architecture: list[str] = field(default_factory=list)

    def compare(self, saved: dict[str, Any], current: dict[str, Any], prefix: str) -> "ResumeReport":
        """Add every argument present in both whose value differs (``config`` field by field)."""
        for key in sorted(saved.keys() & current.keys() - IGNORED_ON_RESUME):
            if key == "config":
                self._compare_config(saved[key], current[key], f"{prefix}.config")
            elif plain(saved[key]) != plain(current[key]):
                self.changes.append(f"{prefix}.{key}: {plain(saved[key])!r} -> {plain(current[key])!r}")
        return self

    def _compare_config(self, saved: Any, current: Any, prefix: str) -> None:
        old = ModelConfig.from_dict(plain(saved or {})).to_dict()
        new = ModelConfig.from_dict(plain(current or {})).to_dict()
        for key in old:
            if old[key] != new[key]:
                line = f"{prefix}.{key}: {old[key]!r} -> {new[key]!r}"
                (self.changes if key in TRAINING_ONLY_FIELDS else self.architecture).append(line)


def check_resume(ckpt_path: str | None, stage_class_path: str, model_args: dict[str, Any],
                 data_args: dict[str, Any]) -> dict[str, Any] | None:
    """Read the checkpoint to resume and check it against this run; return what was read (None: nothing to check).

    Another stage or another architecture is refused; changed training settings are listed and this run's
    values are used. A path that is not a file (a DeepSpeed folder, ``"last"``) is left to Lightning.

    Args:
        ckpt_path: ``--ckpt_path``.
        stage_class_path: this run's ``--model.class_path``.
        model_args: this run's stage arguments (``--model.init_args``) as plain dicts.
        data_args: this run's DataModule arguments (``--data.init_args``) as plain dicts.
    """
    if not ckpt_path or not Path(ckpt_path).is_file():
        return None
    saved = read_torch_file(ckpt_path)
    check_same_stage(ckpt_path, saved.get("stage"), stage_class_path)
    report = ResumeReport().compare(saved.get("hyper_parameters") or {}, model_args, "model")
    report.compare(saved.get("datamodule_hyper_parameters") or {}, data_args, "data")
    if report.architecture:
        raise UserError(f"{ckpt_path} was trained with another architecture than this run's: "
                        f"{'; '.join(report.architecture)}. Resume with the checkpoint's values (pass them as "
                        f"--model.config.<field>), or start a new run from its weights with --model.init_weights.")
    if report.changes:
        rank_zero_info(f"Resuming from {ckpt_path} with these arguments changed (this run's values are used): "
                       + "; ".join(report.changes))
    return saved


def check_same_stage(ckpt_path: str, saved_stage: str | None, class_path: str) -> None:
    """``--ckpt_path`` continues a run of the same stage; starting another stage from it is ``--model.init_weights``."""
    stage = class_path.rsplit(".", 1)[-1]
    if saved_stage and saved_stage != stage:
        raise UserError(f"{ckpt_path} is a {saved_stage} checkpoint but this config trains {stage}: --ckpt_path "
                        f"resumes a run of the same stage. To start {stage} from its weights, use "
                        f"--model.init_weights {ckpt_path} instead.")


@dataclass
class ResumedRun:
    """What a stage applies once training resumes: the checkpoint's arguments and its RNG states."""

    #: The stage arguments the checkpoint was trained with.
    hparams: dict[str, Any]
    #: ``collect_rng_states()`` at the saved step (None: an older checkpoint without them).
    rng_states: dict[str, Any] | None

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any]) -> "ResumedRun":
        """The parts of a loaded checkpoint that resuming applies (the rest is restored by Lightning)."""
        return cls(dict(checkpoint.get("hyper_parameters") or {}), checkpoint.get("rng_states"))

    def optimizer_settings_changed(self, current: dict[str, Any], keys: tuple[str, ...] = OPTIMIZER_HPARAMS) -> bool:
        """Whether this run must re-apply its optimizer and schedule settings (``keys``) over the restored ones."""
        return any(plain(self.hparams.get(key)) != plain(current.get(key)) for key in keys if key in self.hparams)

    def restore_rng_states(self) -> None:
        """Put the generators back where the uninterrupted run had them (right before the next step)."""
        if self.rng_states is not None:
            restore_rng_states(self.rng_states)
