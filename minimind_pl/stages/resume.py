"""What a resumed run (``--ckpt_path``) restores besides weights, optimizer and loop: RNG states, and the
comparison of this run's arguments with the checkpoint's.

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
from typing import Any

import numpy as np
import torch

from minimind_pl.config import TRAINING_ONLY_FIELDS, ModelConfig

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


def optimizer_settings_changed(saved: dict[str, Any], current: dict[str, Any],
                               keys: tuple[str, ...] = OPTIMIZER_HPARAMS) -> bool:
    """Whether a resumed run must re-apply the optimizer and schedule settings (``keys``) over the restored ones."""
    return any(plain(saved.get(key)) != plain(current.get(key)) for key in keys if key in saved)
