"""Images sent to the server: ``image_url`` content parts read into the tensors the model's tower takes.

A ``data:image/...;base64,...`` URL is decoded from the request itself. An ``http(s)`` URL is refused (400)
unless the server runs with ``--allow_image_urls``: by default it fetches nothing on a client's behalf; allowed,
it is fetched with a byte limit and a timeout. Every image then goes through ``vision.preprocess.decode_image``
(the byte limit, the pixel limit read from the header before decoding, so a decompression bomb is refused
cheaply) and the tower folder's preprocessing. Every problem is a 400 naming the content part.
"""

from __future__ import annotations

import base64
import binascii
import urllib.error
import urllib.request
from typing import Sequence

import torch
from torch import nn

from minimind_pl.commands.images import read_image
from minimind_pl.commands.serve.requests import APIError, ImagePart, ServerSettings
from minimind_pl.vision.preprocess import ImageError

REMOTE_SCHEMES = ("http://", "https://")


def image_bytes(part: ImagePart, settings: ServerSettings) -> bytes:
    """The encoded image of a content part: a data URL's payload, or (allowed) a fetched http(s) body."""
    url = part.url
    if url.startswith("data:"):
        return data_url_bytes(part, settings.max_image_bytes)
    if url.lower().startswith(REMOTE_SCHEMES):
        if not settings.allow_image_urls:
            raise APIError(400, f"{part.param}: remote image URLs are not fetched by this server; send the image "
                           "as a data:image/...;base64 URL (or start the server with --allow_image_urls)",
                           param=part.param, code="image_url_not_allowed")
        return fetch(part, settings.max_image_bytes, settings.image_fetch_timeout)
    raise APIError(400, f"{part.param}: unsupported image URL {url[:40]!r}: send a data:image/...;base64 URL",
                   param=part.param, code="invalid_image_url")


def data_url_bytes(part: ImagePart, max_bytes: int) -> bytes:
    """The decoded payload of ``data:image/<type>;base64,<payload>``; too large is refused before decoding."""
    header, comma, payload = part.url.partition(",")
    if not comma or not header[len("data:"):].startswith("image/") or not header.endswith(";base64"):
        raise APIError(400, f"{part.param}: a data URL must be data:image/<type>;base64,<data>", param=part.param,
                       code="invalid_image_url")
    if len(payload) // 4 * 3 > max_bytes + 2:
        raise APIError(400, f"{part.param}: image too large: about {len(payload) // 4 * 3} bytes, the limit is "
                       f"{max_bytes}", param=part.param, code="image_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as error:
        raise APIError(400, f"{part.param}: invalid base64 in the data URL ({error})", param=part.param,
                       code="invalid_image_url") from None


def fetch(part: ImagePart, max_bytes: int, timeout: float) -> bytes:
    """The body at an http(s) URL, at most ``max_bytes`` (read no further), within ``timeout`` seconds."""
    try:
        with urllib.request.urlopen(part.url, timeout=timeout) as response:  # noqa: S310 - schemes checked above
            body = response.read(max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise APIError(400, f"{part.param}: cannot fetch the image: {error}", param=part.param,
                       code="image_fetch_failed") from None
    if len(body) > max_bytes:
        raise APIError(400, f"{part.param}: image too large: more than {max_bytes} bytes", param=part.param,
                       code="image_too_large")
    return body


def read_images(model: nn.Module, parts: Sequence[ImagePart], settings: ServerSettings) -> torch.Tensor:
    """The request's images as (N, 3, H, W) for ``model``; a 400 naming the part for any problem."""
    tensors = []
    for part in parts:
        try:
            tensors.append(read_image(model, image_bytes(part, settings), settings.max_image_bytes,
                                      settings.max_image_pixels))
        except ImageError as error:
            raise APIError(400, f"{part.param}: {error}", param=part.param, code="invalid_image") from None
    return torch.stack(tensors)
