"""``python main.py data prepare``: build a training config's token caches.

    data prepare --config CONFIG.yaml [--data.<argument> VALUE ...]

``prepare`` builds the token caches a training config needs, exactly as ``fit`` would (same files, same
settings, same cache keys), so that a later ``fit`` (and every rank of a multi-GPU run) finds them ready and
starts at once instead of waiting while one process tokenizes.
"""

from __future__ import annotations

import time

from minimind_pl.cli import MiniMindCLI, namespace_dict, run_lightning
from minimind_pl.errors import UserError, reported_cause


class DataOnlyCLI(MiniMindCLI):
    """Parses a training config (base.yaml first, overrides last) and builds only its DataModule."""

    def instantiate_classes(self) -> None:
        """Build ``self.datamodule`` from the config's ``data`` section; the stage and Trainer are not built."""
        from jsonargparse import ArgumentParser
        from lightning import LightningDataModule

        parser = ArgumentParser(exit_on_error=False)
        parser.add_subclass_arguments(LightningDataModule, "data")
        try:
            config = parser.parse_object({"data": namespace_dict(self.config.get("data"))})
            self.datamodule = parser.instantiate_classes(config).data
        except Exception as error:
            cause = reported_cause(error)
            if cause is None or cause is error:
                raise
            raise cause from None


def prepare_command(args: list[str]) -> dict[str, dict]:
    """Build (or find) the token caches of the config in ``args`` and print what they hold.

    ``args`` are ``fit``'s: ``--config`` files and ``--data.*`` overrides (``--model.*`` and ``--trainer.*`` are
    accepted and ignored). Returns the statistics of each split.
    """
    if "-h" in args or "--help" in args:
        print(__doc__)
        return {}
    if not any(a in ("-c", "--config") or a.startswith("--config=") for a in args):
        raise UserError("data prepare needs the training config: python main.py data prepare --config CONFIG.yaml")
    datamodule = run_lightning(args, cli_class=DataOnlyCLI, run=False).datamodule
    start = time.perf_counter()
    datamodule.prepare_data()  # builds every cache the config names, tokenizing in parallel (num_proc)
    datamodule.setup("fit")
    print(f"token caches ready in {time.perf_counter() - start:.1f} s:")
    for cache in datamodule.caches.values():
        print(f"  {cache.path}")
    for split, stats in datamodule.stats.items():
        print(f"  {split}: " + ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v:.3f}" for k, v in stats.items()))
    return datamodule.stats
