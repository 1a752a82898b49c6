"""The image-conversation format (MiniMind-V): SFT conversations whose turns hold ``<image>`` tags, plus their images.

Lines of a jsonl file: ``{"conversations": [messages], "images": ["a.jpg", ...]}``, image paths relative to the
jsonl file's folder (or absolute); a line without images may leave ``images`` out or empty (no placeholder image).
MiniMind-V's Parquet files give the same records (:mod:`minimind_pl.data.parquet`: ``images`` holds the encoded
bytes). Trained on by :class:`minimind_pl.data.VLMDataModule`.

The text is MiniMind-V's: every ``<image>`` in a non-system turn's ``content`` becomes ``image_token`` ×
``image_token_len`` before the chat template renders it (system turns are left as they are, so a tag there is
text, not an image). Then everything is SFT's (:mod:`minimind_pl.data.formats.sft`: the augmentations, the
assistant-only loss mask), except that image tokens never carry loss, even inside an assistant turn.

A record is invalid (an error naming file and line or row, or skipped with ``skip_invalid``) when its tags and
images disagree in number, an image entry is not a path or bytes, or its rendered image tokens are not
``image_token_len`` per image (``image_token`` written in the text itself). Two tags side by side make one run of
two images' tokens, which the model splits into images of ``image_token_len`` (:func:`image_starts`). Whether an
image file exists and decodes is found when it is loaded (:mod:`minimind_pl.data.image_rows`).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from ...chat_format import IMAGE_TAG, IMAGES_FIELD, count_image_tags, expand_image_tags
from ...errors import UserError
from ...vision.config import VISION_PRESETS
from .record import DataFormat
from .sft import SFTEncoder, check_sft_record, conversation_texts, map_conversation

#: The minimind-3v preset's image token and run length (SigLIP2 p32/256: 64 patch features): the DataModule's
#: defaults. MiniMind2-V's are "@" × 196.
DEFAULT_IMAGE_TOKEN = VISION_PRESETS["minimind-3v"].image_token
DEFAULT_IMAGE_TOKEN_LEN = VISION_PRESETS["minimind-3v"].image_token_len


def record_images(obj: dict) -> list:
    """The record's images (paths or bytes; none when the field is absent or null)."""
    return list(obj.get(IMAGES_FIELD) or [])


def check_images(obj: dict) -> Optional[str]:
    """Why the record's images do not fit its tags (count, entry types), or None."""
    images = obj.get(IMAGES_FIELD)
    if images is not None and not isinstance(images, list):
        return f"{IMAGES_FIELD!r} must be a list of image paths, got {type(images).__name__}"
    images = record_images(obj)
    for k, image in enumerate(images):
        if not (isinstance(image, (bytes, bytearray)) or isinstance(image, str)) or not image:
            return f"image {k + 1} must be a non-empty path (or image bytes), got {image!r:.40}"
    tags = count_image_tags(obj["conversations"])
    if tags != len(images):
        return (f"{tags} {IMAGE_TAG} tag{'s' * (tags != 1)} in the non-system turns but {len(images)} "
                f"image{'s' * (len(images) != 1)}: each image needs one tag where it goes, each tag one image")
    return None


def image_runs(ids: np.ndarray, image_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, lengths)`` of the runs of ``image_token_id`` in ``ids``."""
    is_image = np.concatenate([[False], np.asarray(ids) == image_token_id, [False]])
    edges = np.flatnonzero(is_image[1:] != is_image[:-1])
    return edges[0::2], edges[1::2] - edges[0::2]


def image_starts(ids: np.ndarray, image_token_id: int, image_token_len: int) -> np.ndarray:
    """Where each image's tokens start in a whole document, in order: the model's rule (``merge_image_features``)
    read on complete runs: each run is one image, or consecutive images of ``image_token_len`` tokens each."""
    runs = zip(*image_runs(ids, image_token_id))
    return np.asarray([start for first, n in runs for start in range(first, first + n, image_token_len)], np.int64)


class VisionSFTEncoder(SFTEncoder):
    """Image conversations -> SFT tokens with ``image_token_len`` image tokens per ``<image>``, the assistant mask
    without image tokens, and each document's images (paths or bytes), which the token cache stores beside it.

    Args:
        tokenizer: the tokenizer (ChatML; ``image_token`` must be one token of it).
        image_token: the token an image's features replace (minimind-3v: ``<|image_pad|>``).
        image_token_len: image tokens per image (minimind-3v: 64).
        kwargs: :class:`~minimind_pl.data.formats.sft.SFTEncoder`'s (seed, augmentation ratios, ...).
    """

    kind = "vlm"
    version = 1
    has_images = True

    def __init__(self, tokenizer: Any, image_token: str = DEFAULT_IMAGE_TOKEN,
                 image_token_len: int = DEFAULT_IMAGE_TOKEN_LEN, **kwargs: Any) -> None:
        super().__init__(tokenizer, **kwargs)
        ids = tokenizer.encode(image_token)
        if len(ids) != 1:
            raise UserError(f"the image token {image_token!r} is {len(ids)} tokens of this tokenizer; it must be one "
                            "(--data.image_token)")
        if image_token_len < 1:
            raise UserError(f"--data.image_token_len must be >= 1, got {image_token_len}")
        self.image_token, self.image_token_len, self.image_token_id = image_token, int(image_token_len), ids[0]

    def settings(self) -> dict:
        """SFT's settings plus the image token and run length."""
        return {**super().settings(), "image_token": self.image_token, "image_token_len": self.image_token_len,
                "image_token_id": self.image_token_id}

    def render(self, conversation: list, line_no: int) -> str:
        """SFT's rendering of the conversation with its tags expanded into image tokens."""
        return super().render(expand_image_tags(conversation, self.image_token * self.image_token_len), line_no)

    def run_error(self, ids: np.ndarray, n_images: int) -> Optional[str]:
        """Why the rendered image tokens are not ``image_token_len`` per image, in whole images, or None."""
        _, lengths = image_runs(ids, self.image_token_id)
        if lengths.sum() == n_images * self.image_token_len and not (lengths % self.image_token_len).any():
            return None
        return (f"{n_images} image(s) but runs of {self.image_token} of lengths {lengths.tolist()[:8]} (expected "
                f"{self.image_token_len} per image): the text itself holds {self.image_token}; remove it")

    def encode_records(self, records: Sequence[tuple[int, Any]]) -> list:
        """SFT's documents, each with its images; records whose images do not fit become error strings."""
        image_errors = [check_images(obj) if isinstance(obj, dict) and isinstance(obj.get("conversations"), list)
                        else None for _, obj in records]
        out = super().encode_records(records)  # an SFT error wins over an image error
        for i, ((_, obj), image_error) in enumerate(zip(records, image_errors)):
            if isinstance(out[i], str) or image_error:
                out[i] = out[i] if isinstance(out[i], str) else image_error
                continue
            (ids, mask), = out[i]
            images = [image.encode() if isinstance(image, str) else bytes(image) for image in record_images(obj)]
            error = self.run_error(ids, len(images))
            out[i] = error or [(ids, mask * (ids != self.image_token_id), images)]
        return out


def vlm_encoder(tokenizer: Any, augment: bool = True) -> VisionSFTEncoder:
    """VLMDataModule's encoder at its default settings; ``augment=False``: no random system prompt and the empty
    think blocks kept."""
    if augment:
        return VisionSFTEncoder(tokenizer)
    return VisionSFTEncoder(tokenizer, system_prompt_ratio=0.0, empty_think_drop_ratio=0.0)


def has_images_field(obj: dict) -> bool:
    """Conversations with an ``images`` field (a plain SFT line has none, so this never takes one)."""
    return "conversations" in obj and IMAGES_FIELD in obj


def check_vlm_record(obj: Any) -> Optional[str]:
    """SFT's check, then whether the images fit the tags."""
    return check_sft_record(obj) or check_images(obj)


def count_record_images(obj: dict) -> int:
    """Images of a valid record (``data stats``)."""
    return len(record_images(obj))


VLM = DataFormat(name="vlm", data_module="VLMDataModule", fields='{"conversations": [messages], "images": [paths]}',
                 detect=has_images_field, check=check_vlm_record, texts=conversation_texts,
                 map_texts=map_conversation, encoder=vlm_encoder, count_images=count_record_images)
