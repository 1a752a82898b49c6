"""Images in, pixel tensors out: safe decoding and the preprocessing a vision tower's folder asks for.

``decode_image`` opens untrusted bytes (a data file, an upload): the byte count is checked before anything is read
and the pixel count from the header before anything is decoded, so a decompression bomb is refused cheaply.
``ImageSpec`` is what a Hugging Face ``preprocessor_config.json`` (SigLIP, SigLIP2 at fixed resolution, CLIP)
says: resize (straight to height × width, or the short side then a centre crop), rescale, normalise. It follows
transformers' Pillow image processors step by step (Pillow's resampling on uint8 pixels, the rescale in float64
then float32, the normalisation in float32), so its tensors equal theirs (tests/vision/test_preprocess.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from minimind_pl.errors import UserError

# Pillow's resampling filters by the names we accept, and by the numbers preprocessor_config.json stores.
RESAMPLE_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
RESAMPLE_NAMES = {int(code): name for name, code in RESAMPLE_FILTERS.items()}

DEFAULT_MAX_BYTES = 20 * 1024 * 1024  # a camera JPEG is a few MB
DEFAULT_MAX_PIXELS = 50_000_000  # 50 megapixels: ~150 MB as RGB, under Pillow's own bomb limit (89M)


class ImageError(ValueError):
    """An image that cannot be used: undecodable, too many bytes or too many pixels (the message says which)."""


def decode_image(data: bytes | str | os.PathLike, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The decoded image in ``data`` (raw bytes or a file path); :class:`ImageError` when it is larger than
    ``max_bytes``, declares more than ``max_pixels`` pixels in its header (checked before decoding), or does not
    decode. The image keeps its mode; :class:`ImageSpec` converts it to RGB."""
    size = len(data) if isinstance(data, (bytes, bytearray, memoryview)) else os.stat(data).st_size
    if size > max_bytes:
        raise ImageError(f"image too large: {size} bytes, the limit is {max_bytes}")
    source = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    try:
        image = Image.open(source)  # reads the header only
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(f"image has too many pixels: {width}x{height} = {width * height}, "
                             f"the limit is {max_pixels}")
        image.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as error:  # Pillow's own limit, met while reading the header
        raise ImageError(f"image has too many pixels: {error}") from None
    except (OSError, ValueError, SyntaxError) as error:
        raise ImageError(f"undecodable image: {error}") from None
    return image


TOWER_FOLDER = "a Hugging Face vision tower folder (config.json, model.safetensors, preprocessor_config.json)"


def read_tower_json(folder: str | Path, name: str) -> tuple[Path, dict]:
    """The path and parsed content of the JSON file ``name`` in a vision tower folder; a UserError naming the
    file when it is missing or unreadable."""
    path = Path(folder) / name
    try:
        return path, json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} is missing: the vision encoder must be {TOWER_FOLDER}") from None
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"{path} cannot be read: {error}") from None


@dataclass(frozen=True)
class ImageSpec:
    """How an image becomes the (3, height, width) float32 tensor a vision tower reads.

    ``shortest_edge`` None (SigLIP): resize straight to height × width. Set (CLIP): resize so the short side is
    ``shortest_edge`` (the long side ``int(shortest_edge * long / short)``), then crop the centre height × width.
    Then ``pixel * rescale``, then ``(x - mean) / std`` per channel.
    """

    height: int
    width: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale: float = 1 / 255
    resample: str = "bicubic"
    shortest_edge: Optional[int] = None

    def __post_init__(self) -> None:
        if self.resample not in RESAMPLE_FILTERS:
            raise ValueError(f"resample must be one of {sorted(RESAMPLE_FILTERS)}, not {self.resample!r}")
        if self.shortest_edge is not None and self.shortest_edge < max(self.height, self.width):
            raise ValueError(f"a centre crop of {self.height}x{self.width} needs shortest_edge >= "
                             f"{max(self.height, self.width)}, not {self.shortest_edge}")

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ImageSpec":
        """The spec a Hugging Face vision folder's ``preprocessor_config.json`` describes (SigLIP / SigLIP2 /
        CLIP image processors, old feature-extractor files included)."""
        path, raw = read_tower_json(folder, "preprocessor_config.json")
        try:
            return cls._from_processor_config(raw)
        except (KeyError, TypeError, ValueError) as error:
            raise UserError(f"{path}: unsupported image processor settings ({error})") from None

    @classmethod
    def _from_processor_config(cls, raw: dict) -> "ImageSpec":
        crop = raw.get("do_center_crop", False)
        size = raw["size"] if raw.get("do_resize", True) else None
        if size is None:
            raise ValueError("do_resize false: images of any size would reach the tower")
        if isinstance(size, int):  # old files: an int is the short side when cropping, else a square
            size = {"shortest_edge": size} if crop else {"height": size, "width": size}
        if crop:
            crop_size = raw["crop_size"]
            crop_size = {"height": crop_size, "width": crop_size} if isinstance(crop_size, int) else crop_size
            height, width, shortest = crop_size["height"], crop_size["width"], size["shortest_edge"]
        else:
            height, width, shortest = size["height"], size["width"], None
        resample = raw.get("resample", int(Image.Resampling.BICUBIC))
        if resample not in RESAMPLE_NAMES:
            raise ValueError(f"resample {resample} is neither bilinear (2) nor bicubic (3)")
        normalize = raw.get("do_normalize", True)
        return cls(height=height, width=width,
                   mean=tuple(raw["image_mean"]) if normalize else (0.0, 0.0, 0.0),
                   std=tuple(raw["image_std"]) if normalize else (1.0, 1.0, 1.0),
                   rescale=raw.get("rescale_factor", 1 / 255) if raw.get("do_rescale", True) else 1.0,
                   resample=RESAMPLE_NAMES[resample], shortest_edge=shortest)

    def key(self) -> str:
        """A short stable name of these settings (the resized-image sidecar of a token cache is kept per spec)."""
        fields = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(fields.encode()).hexdigest()[:16]

    def resized(self, image: Image.Image) -> Image.Image:
        """``image`` in RGB at height × width (resized, and centre-cropped when ``shortest_edge`` is set)."""
        image = image.convert("RGB")
        resample = RESAMPLE_FILTERS[self.resample]
        if self.shortest_edge is None:
            return image.resize((self.width, self.height), resample=resample)
        width, height = image.size
        short, long = min(width, height), max(width, height)
        long = int(self.shortest_edge * long / short)
        new_width, new_height = (self.shortest_edge, long) if width <= height else (long, self.shortest_edge)
        image = image.resize((new_width, new_height), resample=resample)
        top, left = (new_height - self.height) // 2, (new_width - self.width) // 2
        return image.crop((left, top, left + self.width, top + self.height))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """(3, height, width) float32: the resized image's pixels rescaled and normalised per channel."""
        return self.normalised(np.asarray(self.resized(image)))

    def normalised(self, resized: np.ndarray) -> torch.Tensor:
        """(3, height, width) float32 from an image already resized by :meth:`resized`, as (H, W, 3) uint8 (what
        a token cache's resized-image sidecar stores: ``data.resized_images``)."""
        pixels = torch.from_numpy(np.array(resized, dtype=np.uint8)).permute(2, 0, 1)  # (3, H, W) uint8, a copy
        scaled = (pixels.to(torch.float64) * self.rescale).to(torch.float32)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return (scaled - mean) / std
