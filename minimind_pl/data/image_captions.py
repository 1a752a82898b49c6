"""(image, caption) pairs from VLM jsonl files, for the SigLIP stage (``stages.siglip``) that trains a vision tower.

A pair is a row's first image and its first assistant answer (``{"conversations": [...], "images": [...]}``, paths
relative to the jsonl file, rows checked as the vlm format checks them). Captions are tokenized up front; images are
decoded and preprocessed (``vision.tower.tower_image_spec``) in the loader workers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from minimind_pl.data.formats.vlm import check_vlm_record, record_images
from minimind_pl.data.jsonl import read_jsonl
from minimind_pl.errors import UserError
from minimind_pl.tokenizer import Tokenizer
from minimind_pl.vision.preprocess import ImageSpec, decode_image
from minimind_pl.vision.tower import tower_image_spec


def first_image_and_answer(row: Any, where: str) -> tuple[str, str]:
    """A VLM row's first image path and its first assistant answer (the row checked as the vlm data format checks
    its rows); a UserError naming the row otherwise."""
    problem = check_vlm_record(row)
    answers = [] if problem else [t["content"] for t in row["conversations"] if t["role"] == "assistant" and t["content"]]
    if problem or not record_images(row) or not answers:
        raise UserError(f"{where}: {problem or 'an image-caption pair needs an image and an assistant answer'}")
    return record_images(row)[0], answers[0]


class ImageCaptionPairs(Dataset):
    """(pixel tensor, caption token ids) of each row of a VLM jsonl file; captions are encoded up front
    (``<bos>`` caption ``<eos>``, cut to ``seq_len``), images are decoded when an item is read."""

    def __init__(self, path: str | Path, tokenizer: Tokenizer, spec: ImageSpec, seq_len: int) -> None:
        folder = Path(path).parent
        pairs = [first_image_and_answer(row, f"{path}:{line}") for line, row in read_jsonl(path)]
        self.images = [folder / image for image, _ in pairs]
        self.captions = [caption for _, caption in pairs]
        self.ids = [(tokenizer.encode_text(c) + [tokenizer.eos_id])[-seq_len:] for c in self.captions]
        self.spec, self.pad_id = spec, tokenizer.pad_id

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, list[int]]:
        try:
            image = decode_image(self.images[i])
        except (ValueError, OSError) as error:
            raise UserError(f"{self.images[i]} (row {i + 1}): {error}") from None
        return self.spec(image), self.ids[i]

    def collate(self, items: list[tuple[torch.Tensor, list[int]]]) -> dict[str, torch.Tensor]:
        """``pixel_values`` (B, 3, H, W), ``input_ids`` (B, T) right-padded, ``last_index`` (B,): each caption's
        last token, ``real_tokens`` (0-d): the caption tokens."""
        lengths = torch.tensor([len(ids) for _, ids in items])
        input_ids = torch.full((len(items), int(lengths.max())), self.pad_id, dtype=torch.long)
        for row, (_, ids) in enumerate(items):
            input_ids[row, :len(ids)] = torch.tensor(ids)
        return {"pixel_values": torch.stack([pixels for pixels, _ in items]), "input_ids": input_ids,
                "last_index": lengths - 1, "real_tokens": lengths.sum()}


class ImageCaptionDataModule(L.LightningDataModule):
    """(image, caption) pairs from VLM jsonl files for the SigLIP stage."""

    def __init__(self, train_path: str, tokenizer: str, val_path: Optional[str] = None, image_size: int = 64,
                 seq_len: int = 32, batch_size: int = 64, num_workers: int = 0, seed: int = 0) -> None:
        """Read the pairs.

        Args:
            train_path: VLM jsonl file to train on (``{"conversations": [...], "images": [...]}``, image paths
                relative to the file): each row's first image and first assistant answer make a pair.
            tokenizer: Tokenizer directory of the text tower.
            val_path: VLM jsonl file for validation (loss and in-batch retrieval accuracy).
            image_size: Side of the square the images are resized to; must be the stage's ``image_size``.
            seq_len: Caption tokens kept (the last ones, so the final ``<eos>`` stays).
            batch_size: Pairs per batch: each image is contrasted with the batch's other captions, so larger
                batches give more negatives. Training drops the last incomplete batch.
            num_workers: DataLoader worker processes that decode and resize the images (0: in the training process).
            seed: Seed of the training order (reshuffled every epoch).
        """
        super().__init__()
        self.save_hyperparameters()
        self.datasets: dict[str, ImageCaptionPairs] = {}

    def setup(self, stage: str | None = None) -> None:
        tokenizer = Tokenizer.from_file(self.hparams.tokenizer)
        spec = tower_image_spec(self.hparams.image_size)
        for split in ("train", "val"):
            path = self.hparams[f"{split}_path"]
            if path and split not in self.datasets:
                self.datasets[split] = ImageCaptionPairs(path, tokenizer, spec, self.hparams.seq_len)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset = self.datasets[split]
        generator = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(dataset, batch_size=self.hparams.batch_size, shuffle=shuffle, drop_last=shuffle,
                          collate_fn=dataset.collate, num_workers=self.hparams.num_workers, generator=generator,
                          persistent_workers=self.hparams.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        self.setup("validate")
        return self._loader("val", shuffle=False) if "val" in self.datasets else []
