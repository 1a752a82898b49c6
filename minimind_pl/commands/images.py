"""Images for the inference commands (chat, generate, serve): whether a model reads them, the placeholder text a
``<image>`` tag becomes for it, and reading one image into the tensor its tower takes."""

from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import nn

from minimind_pl.chat_format import IMAGE_TAG, count_image_tags, expand_image_tags
from minimind_pl.errors import UserError
from minimind_pl.vision.preprocess import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, decode_image


def reads_images(model: nn.Module) -> bool:
    """A vision-language model with its tower attached."""
    return getattr(model, "vision_config", None) is not None and getattr(model, "tower", None) is not None


def image_problem(model: nn.Module) -> str | None:
    """Why ``model`` cannot be shown images (a text model, or a MiniMind-V model loaded without its tower), or
    None."""
    if getattr(model, "vision_config", None) is None:
        return "this is a text model (no vision projector): it cannot read images"
    if getattr(model, "tower", None) is None:
        return "no vision tower is loaded: give --vision_encoder DIR (the SigLIP / CLIP folder it was trained with)"
    return None


def image_placeholder(model: nn.Module) -> str:
    """The text one ``<image>`` becomes for ``model``: its placeholder token × features per image."""
    vision = model.vision_config
    return vision.image_token * vision.image_token_len


def with_image_tags(text: str, images: int) -> str:
    """``text`` with one ``<image>`` line in front per image when it has no tags itself (MiniMind-V's prompts put
    the image first); text that places its own tags stays as it is."""
    return text if IMAGE_TAG in text or not images else f"{IMAGE_TAG}\n" * images + text


def expanded_conversation(model: nn.Module, messages: Sequence[dict], images: int, where: str) -> list[dict]:
    """``messages`` ready to render for ``model``: with images, each tag replaced by the placeholder text; a
    UserError naming ``where`` when the tags and the images disagree in number. A text model's tags stay text."""
    if getattr(model, "vision_config", None) is None and not images:
        return list(messages)
    tags = count_image_tags(messages)
    if tags != images:
        raise UserError(f"{where}: {tags} {IMAGE_TAG} tag(s) in the conversation but {images} image(s): each image "
                        f"needs one tag where it goes, each tag one image")
    return expand_image_tags(messages, image_placeholder(model)) if images else list(messages)


def read_image(model: nn.Module, source: bytes | str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """(3, H, W) float32: ``source`` (bytes or a path) decoded within the limits (``ImageError`` naming the
    problem otherwise) and preprocessed as ``model``'s tower folder says."""
    return model.tower.image_spec(decode_image(source, max_bytes=max_bytes, max_pixels=max_pixels))


def stacked(images: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """A row's images as (N, 3, H, W), or None for none."""
    return torch.stack(list(images)) if images else None
