"""SFTDataModule: ``{"conversations": [...]}`` lines in MiniMind's chat format, loss on assistant turns only.

The format (rendering, augmentations, the loss mask, what makes a line invalid) is
:mod:`minimind_pl.data.formats.sft`.
"""
from __future__ import annotations

from typing import Any

from .base import JsonlDataModule
from .formats.sft import SFTEncoder


class SFTDataModule(JsonlDataModule):
    """Supervised fine-tuning data: jsonl lines ``{"conversations": [...]}`` in MiniMind's chat format.

    Each conversation is rendered with the tokenizer's chat template (see :mod:`minimind_pl.data.sft`)
    and trained on its assistant turns only. With packing, several conversations share a row without
    seeing each other; ``packing: false`` pads one conversation per row (cut at ``seq_len``) as MiniMind does.

    Its arguments are those of :class:`JsonlDataModule` (a document is a conversation; ``seed`` also
    seeds the per-line augmentations; ``skip_invalid`` also skips conversations that are empty, malformed,
    without an assistant turn or with a blank assistant answer) and the two below.

    Args:
        system_prompt_ratio: probability that a conversation without a system message (and without
            tools) gets a random system prompt (MiniMind: 0.2).
        empty_think_drop_ratio: probability that the empty ``<think>`` blocks of a conversation are
            removed (MiniMind: 0.8).
        args: the positional arguments of :class:`JsonlDataModule` (``train_path``, ``seq_len``, ...).
        kwargs: the keyword arguments of :class:`JsonlDataModule`.
    """

    def __init__(self, *args: Any, system_prompt_ratio: float = 0.2, empty_think_drop_ratio: float = 0.8,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # its save_hyperparameters also records the two ratios
        self.system_prompt_ratio = float(system_prompt_ratio)
        self.empty_think_drop_ratio = float(empty_think_drop_ratio)
        self.make_encoder()  # validate the ratios now, not at the first build

    def make_encoder(self) -> SFTEncoder:
        """Chat-template rendering with the seeded augmentations, assistant-only mask."""
        return SFTEncoder(self.tokenizer, seed=self.seed, system_prompt_ratio=self.system_prompt_ratio,
                          empty_think_drop_ratio=self.empty_think_drop_ratio)
