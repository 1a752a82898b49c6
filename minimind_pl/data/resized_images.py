"""A token cache's images already resized for one vision tower, so a loader worker only normalises them.

Decoding and resizing are most of an image's cost in a worker (bench/RESULTS.md, "VLMDataModule rows in one loader
worker"). :func:`ensure_resized_images` decodes and resizes every image of an image format's cache once, in the
process that builds the caches, into ``<cache>/resized-<ImageSpec.key()>/`` (one sidecar per spec, so another tower's
preprocessing gets its own):

- ``pixels.bin``: uint8 (n_images, height, width, 3), each image as ``ImageSpec.resized`` gives it;
- ``stamps.bin``: int64 (n_images, 2): the image file's size and mtime in ns when it was read (0, 0 for encoded
  bytes, which cannot change; -1, -1 when the image did not decode).

:class:`ResizedImages` reads them: an image whose file still has its stamp gives its stored pixels, whose
``ImageSpec.normalised`` is the tensor ``ImageSpec`` gives on the decoded file, bit for bit; one that did not decode or whose file changed since
(or a file that is gone) is None, and the caller decodes it as before (which names a broken image). The sidecar is
written to a temporary folder and renamed into place, as the cache is.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

import numpy as np

from minimind_pl.vision.preprocess import ImageError, ImageSpec, decode_image

from .cache import TokenCache
from .formats.vlm import image_location

UNCHANGING = (0, 0)  # the stamp of encoded bytes
BROKEN = (-1, -1)  # the stamp of an image that did not decode


def image_reference(cache: TokenCache, reference: bytes) -> Union[Path, bytes]:
    """What to decode for one stored image reference: the file (a path relative to the data file's folder) or the
    encoded bytes (Parquet)."""
    return image_location(cache.meta["source"], reference, cache.meta["images"] == "paths")


def file_stamp(data: Union[Path, bytes]) -> tuple[int, int]:
    """(size, mtime in ns) of an image file; ``UNCHANGING`` for bytes; ``BROKEN`` for a file that is gone."""
    if isinstance(data, bytes):
        return UNCHANGING
    try:
        stat = os.stat(data)
    except OSError:
        return BROKEN
    return stat.st_size, stat.st_mtime_ns


def sidecar_folder(cache: TokenCache, spec: ImageSpec) -> Path:
    """Where ``cache``'s images resized by ``spec`` are kept."""
    return cache.path / f"resized-{spec.key()}"


def ensure_resized_images(cache: TokenCache, spec: ImageSpec) -> Path:
    """The sidecar of ``cache`` for ``spec``, written first when missing (each image decoded and resized once)."""
    folder = sidecar_folder(cache, spec)
    if (folder / "stamps.bin").exists():
        return folder
    n = int(cache.meta["n_images"])
    tmp = Path(tempfile.mkdtemp(dir=cache.path, prefix=".resized-"))
    try:
        pixels = np.memmap(tmp / "pixels.bin", dtype=np.uint8, mode="w+", shape=(max(n, 1), spec.height, spec.width, 3))
        stamps = np.zeros((n, 2), dtype=np.int64)
        for j in range(n):
            data = image_reference(cache, cache.image(j))
            stamps[j] = file_stamp(data)
            try:
                pixels[j] = np.asarray(spec.resized(decode_image(data)))
            except (ImageError, OSError):
                stamps[j] = BROKEN
        pixels.flush()
        del pixels
        stamps.tofile(tmp / "stamps.bin")
        os.replace(tmp, folder)
    except OSError:
        if not (folder / "stamps.bin").exists():  # not another process's finished sidecar
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


class ResizedImages:
    """Reads one cache's sidecar (opened lazily, so a DataLoader worker opens its own memory maps)."""

    def __init__(self, cache: TokenCache, spec: ImageSpec) -> None:
        self.cache, self.spec = cache, spec
        self.folder = ensure_resized_images(cache, spec)
        self._arrays: Optional[tuple[np.ndarray, np.ndarray]] = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None}

    def _open(self) -> tuple[np.ndarray, np.ndarray]:
        if self._arrays is None:
            n, spec = int(self.cache.meta["n_images"]), self.spec
            pixels = np.memmap(self.folder / "pixels.bin", dtype=np.uint8, mode="r",
                               shape=(max(n, 1), spec.height, spec.width, 3))
            stamps = np.fromfile(self.folder / "stamps.bin", dtype=np.int64).reshape(n, 2)
            self._arrays = (pixels, stamps)
        return self._arrays

    def pixels(self, j: int, data: Union[Path, bytes]) -> Optional[np.ndarray]:
        """The cache's ``j``-th image (``data``: its file or bytes) as stored, (H, W, 3) uint8 for
        ``ImageSpec.normalised``, or None when it must be decoded (it did not decode, or its file changed or is gone
        since the sidecar was written)."""
        pixels, stamps = self._open()
        stamp = tuple(int(v) for v in stamps[j])
        if stamp == BROKEN or file_stamp(data) != stamp:
            return None
        return pixels[j]
