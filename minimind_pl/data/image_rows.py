"""Training rows with their images: the text rows of :mod:`minimind_pl.data.packing` plus ``pixel_values``.

:class:`ImageRows` wraps a :class:`~minimind_pl.data.packing.PackedDataset` (or a ``PaddedDataset``) over an
image format's token caches. For each row it takes the images whose tokens lie (at least partly) among the row's
inputs, document by document, in order (a document's k-th image is its k-th run of image tokens, a run of adjacent
images counting as that many: :func:`~minimind_pl.data.formats.vlm.image_starts`), decodes them and applies the
vision tower's :class:`~minimind_pl.vision.preprocess.ImageSpec`: all in ``__getitem__``, so in the DataLoader's
worker processes, never in the training loop. The row's ``pixel_values`` are (n, 3, H, W), its documents in order.

A document cut by the row's end continues in the next row (packing's rule for long documents). An image whose run
is cut goes with both rows: the first row's shorter run takes the image's first features (the model's rule for a
cut run, as MiniMind-V's truncation), and the continuation's run, which opens the next row, takes its last features
(the model's rule for a short run at a row's first position: ``vision.vlm.image_slots``), the features its tokens
stood for.

An image that is missing or does not decode raises :class:`~minimind_pl.data.cache.DataFormatError` naming the
data file, the line (jsonl) or row (Parquet) and the image; with ``skip_invalid`` that document's piece of the row
becomes padding without loss (no image, no tokens counted), a warning names it and the batch's
``skipped_documents`` counts it (the DataModule sums and reports them).

:func:`collate_images` batches the rows: the text keys as :func:`~minimind_pl.data.packing.collate`, and
``pixel_values`` (B, N, 3, H, W) float32, N the most images a row holds, zero-padded (no key when no row has one).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from minimind_pl.vision.preprocess import ImageError, ImageSpec, decode_image

from .cache import SKIP_INVALID_HINT, DataFormatError, TokenCache
from .formats.vlm import image_starts
from .packing import IGNORE_INDEX, DocumentStream, PackedDataset, PaddedDataset, collate
from .resized_images import ResizedImages, image_reference

PIXEL_VALUES = "pixel_values"
SKIPPED_DOCUMENTS = "skipped_documents"


def describe_image(cache: TokenCache, k: int, j: int, data: Union[Path, bytes]) -> str:
    """``FILE, line N: image J (PATH)``: where a document's image comes from, for errors."""
    where = "row" if cache.meta["images"] == "bytes" else "line"
    what = str(data) if isinstance(data, Path) else f"{len(data)} bytes in the file"
    return f"{cache.meta['source']}, {where} {cache.doc_line(k)}: image {j + 1} ({what})"


class ImageRows(Dataset):
    """Rows of ``rows`` with the images of their image-token runs (see the module doc).

    Args:
        rows: the text rows (packed, or one padded document per row) over caches of an image format.
        image_spec: how an image becomes the tower's input tensor.
        image_token_id: the id whose runs stand for images.
        image_token_len: its tokens per image.
        pad_id: the id a skipped document's tokens become.
        skip_invalid: skip documents whose image is missing or broken (else raise).
        resized: per cache (its path), its images already resized for ``image_spec``
            (:mod:`minimind_pl.data.resized_images`): those are only normalised; the others are decoded.
    """

    def __init__(self, rows: Union[PackedDataset, PaddedDataset], image_spec: ImageSpec, image_token_id: int,
                 image_token_len: int, pad_id: int, skip_invalid: bool = False,
                 resized: Optional[dict[str, ResizedImages]] = None) -> None:
        self.rows = rows
        self.resized = dict(resized or {})
        self.image_spec = image_spec
        self.image_token_id, self.image_token_len = int(image_token_id), int(image_token_len)
        self.pad_id = int(pad_id)
        self.skip_invalid = bool(skip_invalid)

    @property
    def stream(self) -> DocumentStream:
        """The documents the rows are cut from."""
        return self.rows.stream

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        sample = self.rows[index]
        pixels, skipped, position = [], 0, 0
        for doc, first, length in self.rows.row_pieces(index):
            try:
                pixels += self.piece_images(doc, first, length)
            except DataFormatError as error:
                if not self.skip_invalid:
                    raise
                warnings.warn(f"skipped: {error}", stacklevel=1)
                self.blank(sample, position, length)
                skipped += 1
            position += length
        if pixels:
            sample[PIXEL_VALUES] = torch.stack(pixels)
        sample[SKIPPED_DOCUMENTS] = skipped
        return sample

    def piece_images(self, doc: int, first: int, length: int) -> list[torch.Tensor]:
        """The tensors of the images whose runs overlap tokens ``[first, first + length)`` of stream document
        ``doc``, in order."""
        cache, k = self.stream.locate(doc)
        starts = image_starts(cache.doc(k)[0], self.image_token_id, self.image_token_len)
        overlapping = np.flatnonzero((starts < first + length) & (starts + self.image_token_len > first))
        references = cache.doc_images(k) if overlapping.size else []
        return [self.load(cache, k, int(j), references[j]) for j in overlapping]

    def load(self, cache: TokenCache, k: int, j: int, reference: bytes) -> torch.Tensor:
        """Image ``j`` of document ``k`` of ``cache``, preprocessed (from its stored resized pixels when the cache
        has them, else decoded); :class:`DataFormatError` naming it when it is missing or broken."""
        data = image_reference(cache, reference)
        resized = self.resized.get(str(cache.path))
        stored = resized.pixels(cache.first_image(k) + j, data) if resized is not None else None
        if stored is not None:
            return self.image_spec.normalised(stored)
        try:
            return self.image_spec(decode_image(data))
        except FileNotFoundError:
            problem = "no such file"
        except (ImageError, OSError) as error:
            problem = str(error)
        raise DataFormatError(f"{describe_image(cache, k, j, data)}: {problem} (fix or remove the line, or "
                              f"{SKIP_INVALID_HINT})")

    def blank(self, sample: dict, position: int, length: int) -> None:
        """Make ``length`` inputs from ``position`` padding without loss (a skipped document's piece)."""
        piece = slice(position, position + length)
        sample["input_ids"][piece] = self.pad_id
        sample["labels"][piece] = IGNORE_INDEX
        sample["real_tokens"] -= length


def collate_images(samples: Sequence[dict]) -> dict:
    """Batch :class:`ImageRows` samples: :func:`~minimind_pl.data.packing.collate`'s keys, ``pixel_values``
    (B, N, 3, H, W) zero-padded when some row has an image, ``skipped_documents`` (0-d) when some were skipped."""
    image_keys = (PIXEL_VALUES, SKIPPED_DOCUMENTS)
    batch = collate([{key: value for key, value in s.items() if key not in image_keys} for s in samples])
    images = [s.get(PIXEL_VALUES) for s in samples]
    most = max((len(x) for x in images if x is not None), default=0)
    if most:
        shape = next(x for x in images if x is not None).shape[1:]
        batch[PIXEL_VALUES] = torch.zeros(len(samples), most, *shape, dtype=torch.float32)
        for row, x in enumerate(images):
            if x is not None:
                batch[PIXEL_VALUES][row, :len(x)] = x
    skipped = sum(int(s.get(SKIPPED_DOCUMENTS, 0)) for s in samples)
    if skipped:
        batch[SKIPPED_DOCUMENTS] = torch.tensor(skipped, dtype=torch.long)
    return batch


def count_images(stream: DocumentStream) -> int:
    """Images of the stream's documents."""
    return sum(int(cache.image_counts()[stream.documents_of(p)].sum()) for p, cache in enumerate(stream.caches))
