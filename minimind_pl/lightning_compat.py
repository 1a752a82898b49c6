"""Every use of a private Lightning name, in one place.

Lightning keeps these out of its public API, so a release may rename them or change what they mean without a
deprecation. The rest of the package calls the functions and the CLI base class here instead;
``tests/test_lightning_compat.py`` checks each one against the installed Lightning (naming its version when one
breaks), and ``setup.cfg`` pins the range of versions that passed. Versions tried: see docs/DESIGN.md.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

#: The installed Lightning version, named by the compatibility tests' failures.
LIGHTNING_VERSION: str = L.__version__


def should_accumulate(trainer: L.Trainer) -> bool:
    """Whether the batch that just ran is inside an accumulation window (its gradients are not applied yet):
    False after the batch that steps the optimizer. Lightning's own test for stepping (``fit_loop._should_accumulate``),
    which also steps on an epoch's last batch."""
    return trainer.fit_loop._should_accumulate()


def every_n_train_steps(callback: ModelCheckpoint) -> int:
    """How many optimizer steps apart ``callback`` saves (0: it does not save by steps). ``ModelCheckpoint`` keeps
    its ``every_n_train_steps`` argument only as the private ``_every_n_train_steps``."""
    return int(getattr(callback, "_every_n_train_steps", 0) or 0)


def is_local_path(path: Any) -> bool:
    """Whether ``path`` is on the local filesystem (no ``s3://``-style protocol), by Lightning's own rule."""
    return _is_local_file_protocol(path)


def configured_checkpoint_io(strategy: Any) -> Any:
    """The ``CheckpointIO`` a strategy instance was given (None if none): its private ``_checkpoint_io``, because
    the public ``checkpoint_io`` property makes a default one when none was given."""
    return getattr(strategy, "_checkpoint_io", None)


def has_trainer(module: L.LightningModule) -> bool:
    """Whether ``module`` is attached to a Trainer (its ``trainer`` property raises when it is not)."""
    return module._trainer is not None


class ResumingLightningCLI(LightningCLI):
    """``LightningCLI`` with its two private steps replaced by public hooks of ours.

    ``--ckpt_path``: LightningCLI (2.5 and later, in ``_parse_ckpt_path``) replaces the model's arguments with the
    ones saved in the checkpoint. That step is switched off here; a subclass checks the checkpoint against this
    run's arguments in the public ``before_instantiate_classes`` hook instead, which every supported version calls.
    The Trainer: ``trainer_arguments`` may change the Trainer's arguments and callbacks before it is built.
    """

    def _parse_ckpt_path(self) -> None:
        """Keep this run's arguments when resuming (see the class docstring)."""

    def trainer_arguments(self, config: dict[str, Any], callbacks: list) -> tuple[dict[str, Any], list]:
        """The Trainer's keyword arguments and the extra callbacks to build it with; as given unless overridden."""
        return config, callbacks

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Any:
        """Build the Trainer from what ``trainer_arguments`` returns."""
        return super()._instantiate_trainer(*self.trainer_arguments(config, callbacks))
