"""How fast VLMDataModule's rows load in one loader worker, against SFT's text rows: ``python bench/vlm_rows.py``.

Writes ``--images`` noisy 256×256 JPEGs (quality 85, about 34 KB, near MiniMind-V's pre-resized images) and one
conversation per image (``<image>`` + a 60-word answer) into a temporary folder, a SigLIP2-style
preprocessor_config.json (256×256, bilinear, mean/std 0.5) and packs them into rows of ``--seq_len`` with 64 image
tokens per image (minimind-3v). Reports rows/s of the text part alone and of whole rows (images decoded and
preprocessed; from the images the cache stores resized, and decoding each one), the time of one image's decode and
of its preprocessing, and the real tokens a worker supplies per second. Everything runs in this process, as one DataLoader worker would.
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Callable

from PIL import Image, ImageDraw

from minimind_pl.data import VLMDataModule
from minimind_pl.vision.preprocess import ImageSpec, decode_image

WORDS = "the a red green blue circle square large small left right top bottom next to above below shows".split()


def write_data(folder: Path, n: int) -> Path:
    """``n`` images and their conversations; the jsonl path."""
    rng = random.Random(0)
    (folder / "img").mkdir()
    (folder / "tower").mkdir()
    (folder / "tower" / "preprocessor_config.json").write_text(json.dumps({
        "size": {"height": 256, "width": 256}, "resample": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    lines = []
    for i in range(n):
        image = Image.effect_noise((256, 256), 40).convert("RGB")
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x, y = rng.randrange(200), rng.randrange(200)
            draw.ellipse((x, y, x + 50, y + 50), fill=tuple(rng.randrange(256) for _ in range(3)))
        image.save(folder / "img" / f"{i}.jpg", quality=85)
        answer = " ".join(rng.choice(WORDS) for _ in range(60))
        lines.append({"conversations": [{"role": "user", "content": "<image>Describe the image in detail."},
                                        {"role": "assistant", "content": answer}], "images": [f"img/{i}.jpg"]})
    path = folder / "vlm.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def per_second(function: Callable[[int], object], n: int) -> float:
    started = time.perf_counter()
    for i in range(n):
        function(i)
    return n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--seq_len", type=int, default=768)
    parser.add_argument("--tokenizer", default="../shared/minimind")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = write_data(folder, args.images)
        dm = VLMDataModule(str(data), seq_len=args.seq_len, batch_size=16, tokenizer=args.tokenizer,
                           vision_encoder=str(folder / "tower"), num_workers=0)
        started = time.perf_counter()
        dm.setup("fit")  # tokenizes, then stores every image resized (data.resized_images)
        setup = time.perf_counter() - started
        rows, n = dm.train_dataset, len(dm.train_dataset)
        text = per_second(lambda i: rows.rows[i], n)
        whole = per_second(lambda i: rows[i], n)
        stored, rows.resized = rows.resized, {}  # the same rows decoding every image, as before the sidecar
        decoding = per_second(lambda i: rows[i], n)
        rows.resized = stored
        files = [folder / "img" / f"{i}.jpg" for i in range(args.images)]
        decoded = [decode_image(f) for f in files]
        decode = per_second(lambda i: decode_image(files[i]), args.images)
        spec = ImageSpec.from_folder(folder / "tower")
        preprocess = per_second(lambda i: spec(decoded[i]), args.images)
        real = dm.stats["train"]["real_token_fraction"] * args.seq_len
        print(f"{n} rows of {args.seq_len}, {dm.stats['train']['images'] / n:.2f} images per row")
        print(f"text rows/s {text:.0f} ({text * real:.0f} real tokens/s); whole rows/s {whole:.1f} "
              f"({whole * real:.0f} real tokens/s) from the resized images; decoding each image {decoding:.1f} "
              f"({decoding * real:.0f} real tokens/s); setup (tokenizing + storing resized) {setup:.1f} s")
        print(f"per image: decode {1000 / decode:.2f} ms, preprocess {1000 / preprocess:.2f} ms")


if __name__ == "__main__":
    main()
