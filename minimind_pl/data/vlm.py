"""VLMDataModule: conversations about images (MiniMind-V), from jsonl + image files or MiniMind-V's Parquet files.

The format (tags, images, what makes a line invalid) is :mod:`minimind_pl.data.formats.vlm`; Parquet rows are read
by :mod:`minimind_pl.data.parquet`; the rows and their images by :mod:`minimind_pl.data.image_rows`.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import Dataset

from minimind_pl.vision.preprocess import ImageSpec

from .formats.vlm import DEFAULT_IMAGE_TOKEN, DEFAULT_IMAGE_TOKEN_LEN, VisionSFTEncoder
from .image_rows import SKIPPED_DOCUMENTS, ImageRows, collate_images, count_images
from .packing import DocumentStream
from .resized_images import ResizedImages
from .sft import SFTDataModule


class VLMDataModule(SFTDataModule):
    """Image conversations: jsonl lines ``{"conversations": [...], "images": ["a.jpg", ...]}`` (paths relative to
    the jsonl file) or MiniMind-V's Parquet files (``conversations``, ``image_bytes``), told apart by content.

    Each ``<image>`` of a non-system turn becomes ``image_token`` × ``image_token_len``; the text is then SFT's
    (chat template, augmentations, loss on the assistant answers, never on image tokens), cached once. Rows are
    packed as in SFT (documents kept apart by ``doc_ids``) or padded one per row (``packing: false``); each row
    carries the images of its image-token runs, decoded and preprocessed in the loader workers, as
    ``pixel_values`` (B, N, 3, H, W) (see :mod:`minimind_pl.data.image_rows`).

    Its arguments are those of :class:`SFTDataModule` (``train_path`` and ``val_path`` may be Parquet files;
    ``skip_invalid`` also skips lines whose tags and images disagree, and, when rows are loaded, documents whose
    image is missing or broken, counted and reported) and the four below.

    Args:
        vision_encoder: the vision tower's folder: its ``preprocessor_config.json`` says how an image is
            resized, rescaled and normalised (MiniMind-V: ``siglip2-base-p32-256-ve``).
        image_token: the token an image's features replace (minimind-3v: ``<|image_pad|>``, id 12; MiniMind2-V:
            ``@``); one token of the tokenizer.
        image_token_len: image tokens per ``<image>`` (the tower's patch features: minimind-3v 64,
            MiniMind2-V 196).
        store_resized_images: keep every image decoded and resized for the tower beside the token cache
            (:mod:`minimind_pl.data.resized_images`, written once at setup), so the loader workers only normalise
            them (1.4-2.2 times the rows/s, bench/RESULTS.md); costs height × width × 3 bytes of disk per image
            (196 KB at 256×256, about 6 times a MiniMind-V JPEG). false: decode each image whenever it is read.
        args: the positional arguments of :class:`SFTDataModule` (``train_path``, ``seq_len``, ...).
        kwargs: the keyword arguments of :class:`SFTDataModule`.
    """

    def __init__(self, *args: Any, vision_encoder: str, image_token: str = DEFAULT_IMAGE_TOKEN,
                 image_token_len: int = DEFAULT_IMAGE_TOKEN_LEN, store_resized_images: bool = True,
                 **kwargs: Any) -> None:
        self.image_token, self.image_token_len = image_token, int(image_token_len)
        self.store_resized_images = bool(store_resized_images)
        super().__init__(*args, **kwargs)  # builds the encoder, which checks the image token
        self.vision_encoder = vision_encoder
        self.image_spec = ImageSpec.from_folder(vision_encoder)
        self.skipped_documents = 0

    @property
    def image_token_id(self) -> int:
        """The id of ``image_token`` in the data's tokenizer (what the model's placeholder id must be)."""
        return self.encoder.image_token_id

    def make_encoder(self) -> VisionSFTEncoder:
        """SFT's encoder with ``<image>`` expanded into image tokens and the images kept per document."""
        return VisionSFTEncoder(self.tokenizer, image_token=self.image_token, image_token_len=self.image_token_len,
                                seed=self.seed, system_prompt_ratio=self.system_prompt_ratio,
                                empty_think_drop_ratio=self.empty_think_drop_ratio)

    def make_dataset(self, stream: DocumentStream) -> Dataset:
        """SFT's rows (packed or padded), each with its images (with ``store_resized_images``, stored resized for
        the tower's ImageSpec beside each cache, written the first time: ``data.resized_images``)."""
        resized = {str(cache.path): ResizedImages(cache, self.image_spec) for cache in stream.caches
                   if cache.has_images and self.store_resized_images}
        return ImageRows(super().make_dataset(stream), self.image_spec, self.encoder.image_token_id,
                         self.image_token_len, self.tokenizer.pad_id, skip_invalid=self.skip_invalid, resized=resized)

    @property
    def collate_fn(self) -> Callable[[Sequence[Any]], dict]:
        """Text keys as SFT, plus ``pixel_values`` (B, N, 3, H, W) zero-padded."""
        return collate_images

    def describe(self, stream: DocumentStream, dataset: Dataset) -> dict:
        """SFT's statistics of a split, plus its images."""
        rows = dataset.rows if isinstance(dataset, ImageRows) else dataset
        return {**super().describe(stream, rows), "images": count_images(stream)}

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """The base's move; a batch's count of skipped documents (broken images) is taken out, summed and
        reported here."""
        skipped = int(batch.pop(SKIPPED_DOCUMENTS, 0)) if isinstance(batch, dict) else 0
        if skipped:
            self.skipped_documents += skipped
            rank_zero_info(f"[minimind_pl.data] {self.skipped_documents} document(s) skipped so far for a missing or "
                           "broken image (the warnings name them)")
        return super().transfer_batch_to_device(batch, device, dataloader_idx)
