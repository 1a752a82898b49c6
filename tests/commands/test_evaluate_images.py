"""``eval`` on image conversations (MiniMind-V): the loss over the assistant tokens with the images in, from a jsonl
with image files or a MiniMind-V Parquet file, equals the loss worked out here from the model's own forward."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from helpers import random_vlm, require_module, tiny_tower_folder
from minimind_pl.commands.evaluate import eval_command
from minimind_pl.errors import UserError
from minimind_pl.tokenizer import Tokenizer

PLACEHOLDER, FEATURES = "<|image_pad|>", 16  # random_vlm's: MiniMind's <|image_pad|> (id 12), the tiny tower's patches
ROWS = [  # (conversation, image names): one image, two images, none
    ([{"role": "user", "content": "<image>\n这是什么颜色？"}, {"role": "assistant", "content": "红色。"}], ["red.png"]),
    ([{"role": "system", "content": "简短回答。"}, {"role": "user", "content": "<image>和<image>一样吗？"},
      {"role": "assistant", "content": "不一样，一个红一个蓝。"}], ["red.png", "sub/blue.png"]),
    ([{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}], []),
]
COLOURS = {"red.png": (220, 30, 30), "sub/blue.png": (20, 40, 200)}


@pytest.fixture(scope="module")
def world(tmp_path_factory, shared_dir: Path):
    """A tiny tower, a random VLM on it saved as MiniMind-V's .pth, the images, and MiniMind's tokenizer folder."""
    root = tmp_path_factory.mktemp("vlm_eval")
    tower = tiny_tower_folder(root / "tower")
    model = random_vlm(tower)
    torch.save(model.state_dict(), root / "vlm.pth")
    for name, colour in COLOURS.items():
        (root / name).parent.mkdir(exist_ok=True)
        pixels = torch.tensor(colour, dtype=torch.uint8).expand(40, 48, 3).clone()
        pixels[5:20, 10:30] = 255 - pixels[5:20, 10:30]  # a patch, so the image is not flat
        Image.fromarray(pixels.numpy()).save(root / name)
    return root, tower, model, shared_dir / "minimind"


def hand_loss(model, tokenizer: Tokenizer, root: Path) -> tuple[float, int]:
    """Mean NLL over the assistant answers (through <|im_end|> and its newline, MiniMind's labels), one plain
    forward per row with that row's images; image tokens are never in an answer here."""
    header, end = tokenizer.encode("<|im_start|>assistant\n"), tokenizer.encode("<|im_end|>\n")
    nats, tokens = 0.0, 0
    for conversation, names in ROWS:
        expanded = [{**m, "content": m["content"].replace("<image>", PLACEHOLDER * FEATURES)}
                    if m["role"] != "system" else m for m in conversation]
        ids = tokenizer.encode(tokenizer.apply_chat_template(expanded))
        scored = torch.zeros(len(ids))
        for t in range(len(ids)):  # each answer: after the header, through the end marker
            if ids[t - len(header) + 1:t + 1] == header:
                stop = next(u for u in range(t + 1, len(ids)) if ids[u:u + len(end)] == end) + len(end)
                scored[t + 1:stop] = 1
        pixels = (torch.stack([model.tower.image_spec(Image.open(root / n)) for n in names])[None]
                  if names else None)
        with torch.no_grad():
            logits = model(torch.tensor([ids[:-1]]), pixel_values=pixels).logits[0]
        nll = F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
        nats += float((nll * scored[1:]).sum())
        tokens += int(scored[1:].sum())
    return nats / tokens, tokens


def write_jsonl(root: Path) -> Path:
    path = root / "val.jsonl"
    path.write_text("".join(json.dumps({"conversations": c, "images": names}, ensure_ascii=False) + "\n"
                            for c, names in ROWS), encoding="utf-8")
    return path


def write_parquet(root: Path) -> Path:
    """MiniMind-V's layout: conversations as a JSON string, image_bytes a list of encoded images; a text-only row
    holds its black 8×8 placeholder JPEG."""
    pa, pq = require_module("pyarrow"), require_module("pyarrow.parquet")
    placeholder = io.BytesIO()
    Image.new("RGB", (8, 8)).save(placeholder, format="JPEG")
    images = [[(root / n).read_bytes() for n in names] or [placeholder.getvalue()] for _, names in ROWS]
    table = pa.table({"conversations": [json.dumps(c, ensure_ascii=False) for c, _ in ROWS], "image_bytes": images})
    pq.write_table(table, root / "val.parquet")
    return root / "val.parquet"


@pytest.mark.parametrize("write", [write_jsonl, write_parquet])
def test_eval_loss_with_images_equals_the_forward_by_hand(world, write):
    root, tower, model, tokenizer_dir = world
    expected_loss, expected_tokens = hand_loss(model, Tokenizer.from_file(tokenizer_dir), root)
    metrics = eval_command(str(root / "vlm.pth"), str(write(root)), tokenizer=str(tokenizer_dir), vision_encoder=str(tower),
                           batch_size=2, device="cpu")
    assert metrics["tokens"] == expected_tokens and metrics["documents"] == len(ROWS)
    assert metrics["loss"] == pytest.approx(expected_loss, rel=1e-5)


def test_the_images_change_the_loss_and_a_broken_one_is_named(world, tmp_path):
    root, tower, _, tokenizer_dir = world
    swapped = tmp_path / "val.jsonl"  # the same rows with the two colours swapped: another loss
    for name, colour in COLOURS.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.open(root / ("sub/blue.png" if name == "red.png" else "red.png")).save(tmp_path / name)
    write_jsonl(tmp_path)
    args = dict(tokenizer=str(tokenizer_dir), vision_encoder=str(tower), device="cpu")
    original = eval_command(str(root / "vlm.pth"), str(write_jsonl(root)), **args)["loss"]
    assert abs(eval_command(str(root / "vlm.pth"), str(swapped), **args)["loss"] - original) > 1e-4
    (tmp_path / "sub/blue.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match=r"val.jsonl, line 2: image 2"):
        eval_command(str(root / "vlm.pth"), str(swapped), **args)


def test_image_conversations_need_the_tower(world):
    root, _, _, tokenizer_dir = world
    with pytest.raises(UserError, match="holds image conversations, and no vision tower is loaded"):
        eval_command(str(root / "vlm.pth"), str(write_jsonl(root)), tokenizer=str(tokenizer_dir), device="cpu")
