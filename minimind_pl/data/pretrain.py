"""PretrainDataModule: ``{"text": ...}`` lines (MiniMind's pretrain_t2t*.jsonl) for causal LM pretraining."""
from __future__ import annotations

from .base import JsonlDataModule
from .formats.pretrain import PretrainEncoder


class PretrainDataModule(JsonlDataModule):
    """Pretraining data: jsonl lines ``{"text": "..."}``, each a document ``<|im_start|> text <|im_end|>``.

    Documents are packed into full rows of ``seq_len`` tokens (see :mod:`minimind_pl.data.packing`),
    or padded one per row (``packing: false``; a too-long text is cut and still ends with eos, as in
    MiniMind). Every token after a document's first is a target.

    Its arguments are those of :class:`JsonlDataModule`; ``skip_invalid`` skips lines that are not JSON
    or valid UTF-8, or whose ``text`` is missing or blank.
    """

    keep_eos_on_truncate = True

    def make_encoder(self) -> PretrainEncoder:
        """Text documents wrapped in bos/eos."""
        return PretrainEncoder(self.tokenizer)
