"""Preprocessing equals transformers' Pillow image processors; decoding refuses bombs, oversize and garbage."""

from __future__ import annotations

import io
import json
import struct
import zlib

import pytest
import torch
from PIL import Image, ImageDraw

from helpers import require_module
from minimind_pl.errors import UserError
from minimind_pl.vision.preprocess import ImageError, ImageSpec, decode_image

transformers = require_module("transformers")

SIGLIP = {"do_resize": True, "size": {"height": 32, "width": 48}, "resample": 3, "do_rescale": True,
          "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
          "image_std": [0.5, 0.5, 0.5], "image_processor_type": "SiglipImageProcessor"}
CLIP = {"do_resize": True, "size": {"shortest_edge": 40}, "resample": 3, "do_center_crop": True,
        "crop_size": {"height": 32, "width": 36}, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "image_processor_type": "CLIPImageProcessor"}


def drawn_image(width: int, height: int, seed: int) -> Image.Image:
    """Shapes, a gradient and text on a coloured background: sharp edges that resampling must get right."""
    generator = torch.Generator().manual_seed(seed)
    colours = [tuple(torch.randint(0, 256, (3,), generator=generator).tolist()) for _ in range(4)]
    image = Image.new("RGB", (width, height), colours[0])
    draw = ImageDraw.Draw(image)
    for x in range(0, width, 3):
        draw.line([(x, 0), (x, height // 4)], fill=(x * 255 // width, 128, 255 - x * 255 // width))
    draw.ellipse([width // 5, height // 3, width // 2, height - 2], fill=colours[1], outline=colours[2])
    draw.rectangle([width // 2, height // 5, width - 3, height // 2], fill=colours[3])
    draw.text((2, height // 2), "MiniMind", fill=colours[2])
    return image


def write_folder(tmp_path, config: dict):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config), encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize("size", [(97, 61), (61, 97), (33, 33), (301, 17)])
@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_pixels_equal_transformers_pil_image_processors(tmp_path, kind, size):
    """transformers 5 names its Pillow processors ``...ImageProcessorPil`` (``SiglipImageProcessor`` is the
    torchvision one there, not installed here; transformers 4, which MiniMind-V ran, used Pillow)."""
    config = SIGLIP if kind == "siglip" else CLIP
    folder = write_folder(tmp_path, config)
    reference_class = (transformers.SiglipImageProcessorPil if kind == "siglip"
                       else transformers.CLIPImageProcessorPil)
    reference = reference_class.from_pretrained(folder)
    image = drawn_image(*size, seed=size[0])
    expected = reference(images=image, return_tensors="pt")["pixel_values"][0]
    ours = ImageSpec.from_folder(folder)(image)
    assert ours.dtype == torch.float32 and ours.shape == expected.shape == (3, 32, 48 if kind == "siglip" else 36)
    assert (ours - expected).abs().max().item() <= 1e-5


def test_bilinear_and_unnormalised_settings_follow_the_file(tmp_path):
    config = dict(SIGLIP, resample=2, do_normalize=False, size={"height": 20, "width": 20})
    folder = write_folder(tmp_path, config)
    image = drawn_image(53, 29, seed=3)
    expected = transformers.SiglipImageProcessorPil.from_pretrained(folder)(images=image, return_tensors="pt")
    ours = ImageSpec.from_folder(folder)(image)
    assert ImageSpec.from_folder(folder).resample == "bilinear"
    assert (ours - expected["pixel_values"][0]).abs().max().item() <= 1e-5
    assert 0.0 <= ours.min().item() and ours.max().item() <= 1.0  # rescaled only


def test_old_clip_feature_extractor_file_with_int_sizes():
    """openai/clip-vit-base-patch16 (MiniMind2-V's tower) stores ``size: 224, crop_size: 224``."""
    spec = ImageSpec._from_processor_config(dict(CLIP, size=224, crop_size=224))
    assert (spec.height, spec.width, spec.shortest_edge) == (224, 224, 224)


def test_greyscale_and_rgba_images_become_three_channels():
    spec = ImageSpec(height=8, width=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    grey = spec(Image.new("L", (10, 10), 255))
    assert grey.shape == (3, 8, 8) and torch.allclose(grey, torch.ones(3, 8, 8))
    # MiniMind-V converts RGBA with convert("RGB"): the colour under the alpha stays
    rgba = spec(Image.new("RGBA", (10, 10), (0, 0, 0, 0)))
    assert torch.allclose(rgba, -torch.ones(3, 8, 8))


def test_a_missing_or_unusable_preprocessor_config_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="preprocessor_config.json is missing"):
        ImageSpec.from_folder(tmp_path)
    write_folder(tmp_path, dict(SIGLIP, resample=1))
    with pytest.raises(UserError, match="resample 1"):
        ImageSpec.from_folder(tmp_path)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A PNG header declaring width × height pixels, with a tiny (invalid) body: decoding it would be the bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decode_image_reads_bytes_and_paths(tmp_path):
    image = drawn_image(40, 30, seed=1)
    data = png_bytes(image)
    (tmp_path / "a.png").write_bytes(data)
    for source in (data, tmp_path / "a.png", str(tmp_path / "a.png")):
        decoded = decode_image(source, max_bytes=len(data), max_pixels=40 * 30)
        assert decoded.size == (40, 30) and list(decoded.getdata()) == list(image.getdata())


def test_decode_image_refuses_too_many_bytes(tmp_path):
    data = png_bytes(drawn_image(40, 30, seed=1))
    with pytest.raises(ImageError, match=f"too large: {len(data)} bytes, the limit is {len(data) - 1}"):
        decode_image(data, max_bytes=len(data) - 1, max_pixels=10 ** 6)
    (tmp_path / "a.png").write_bytes(data)
    with pytest.raises(ImageError, match="too large"):
        decode_image(tmp_path / "a.png", max_bytes=len(data) - 1, max_pixels=10 ** 6)


def test_decode_image_refuses_a_decompression_bomb_from_its_header():
    """5000 × 5000 declared in a few bytes: refused by the header check before decoding. 100000 × 100000 is past
    Pillow's own limit, which refuses it while opening; that too is an ImageError about pixels."""
    with pytest.raises(ImageError, match="too many pixels: 5000x5000 = 25000000, the limit is 1000000"):
        decode_image(bomb_png(5000, 5000), max_pixels=10 ** 6)
    with pytest.raises(ImageError, match="too many pixels: 41x30 = 1230, the limit is 1229"):
        decode_image(png_bytes(drawn_image(41, 30, seed=2)), max_pixels=1229)
    with pytest.raises(ImageError, match="too many pixels: Image size"):
        decode_image(bomb_png(100_000, 100_000), max_pixels=10 ** 11)


TRUNCATED_PNG = png_bytes(drawn_image(60, 40, seed=4))[:400]


@pytest.mark.parametrize("data", [b"", b"not an image at all", TRUNCATED_PNG], ids=["empty", "text", "truncated"])
def test_decode_image_names_an_undecodable_image(data):
    with pytest.raises(ImageError, match="undecodable image"):
        decode_image(data)
