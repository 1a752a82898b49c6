"""Hand-built image rows for the vision-language stage tests, and a DataModule serving them through the project's
resumable loader (so ``--ckpt_path`` resumes at the exact batch), usable as ``--data.class_path vlm_rows.ColourRows``
with ``tests`` on ``PYTHONPATH``."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader

from minimind_pl.data.loader import make_train_loader
from minimind_pl.losses import IGNORE_INDEX

IMAGE_ID, PATCHES = 12, 16  # <|image_pad|> in MiniMind's tokenizer; the tiny tower's 4 x 4 patches
ANSWERS = (300, 301)  # the answer token: which of two colours the image shows


def colour_rows(n: int, seed: int = 0, text_only_every: int = 0) -> list[dict[str, torch.Tensor]]:
    """Rows ``bos, 3 prompt tokens, 16 x <|image_pad|>, answer, eos``: the image is one of two colours and the
    answer token says which; labels (shifted) only on the answer and eos, as SFT labels an assistant turn. With
    ``text_only_every`` k, every k-th row (from the first) has no image: its placeholders are ordinary tokens."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for index in range(n):
        colour = int(torch.randint(0, 2, (), generator=g))
        pixels = torch.full((1, 3, 32, 32), -0.8) + 0.1 * torch.randn(1, 3, 32, 32, generator=g)
        pixels[0, colour] = 0.9
        text_only = text_only_every and index % text_only_every == 0
        ids = torch.tensor([1, 40, 41, 42, *[60 if text_only else IMAGE_ID] * PATCHES, ANSWERS[colour], 2])
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[-3:-1] = ids[-2:]  # position t predicts token t + 1
        rows.append({"input_ids": ids, "labels": labels, "pixel_values": pixels[:0] if text_only else pixels})
    return rows


def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stacked rows; ``pixel_values`` (B, N, 3, H, W) zero-padded to the most images of a row, absent when no row
    has one (the batch contract of the VLM DataModule)."""
    batch = {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "labels")}
    most = max(len(r["pixel_values"]) for r in rows)
    if most:
        pixels = torch.zeros(len(rows), most, 3, 32, 32)
        for i, row in enumerate(rows):
            pixels[i, :len(row["pixel_values"])] = row["pixel_values"]
        batch["pixel_values"] = pixels
    return batch


def loader(rows, batch_size: int = 4) -> DataLoader:
    return DataLoader(rows, batch_size=batch_size, collate_fn=collate)


class ColourRows(L.LightningDataModule):
    """``colour_rows`` for ``fit``: a resumable shuffled train loader (dealt across DDP ranks), 8 validation rows.

    Args:
        tokenizer: The tokenizer folder (linked into the stage by the CLI; the rows are token ids already).
        seq_len: The rows' length (linked into the stage).
        batch_size: Rows per batch and rank.
        rows: Training rows.
        text_only_every: Every k-th row has no image (0: none).
        seed: The loader's shuffling seed.
    """

    def __init__(self, tokenizer: str, seq_len: int = 22, batch_size: int = 4, rows: int = 32,
                 text_only_every: int = 0, seed: int = 42) -> None:
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self):
        trainer = self.trainer
        return make_train_loader(colour_rows(self.hparams.rows, text_only_every=self.hparams.text_only_every),
                                 self.hparams.batch_size, self.hparams.seed, 0, collate,
                                 num_replicas=trainer.world_size if trainer else 1,
                                 rank=trainer.global_rank if trainer else 0)

    def val_dataloader(self):
        return loader(colour_rows(8, seed=1), self.hparams.batch_size)
