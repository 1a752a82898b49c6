"""The synthetic image world (minimind_pl/demo/vision_world.py): every answer is checked against the pixels of the
picture it is about, read back here with a flood fill and hue ranges of our own (not the module's tables)."""

from __future__ import annotations

import colorsys
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minimind_pl.demo.corpus import score_answer
from minimind_pl.demo.vision_world import (
    FILE_NAMES, build_vision_world, chance_accuracy, write_vision_world,
)
from minimind_pl.vision.preprocess import ImageSpec, decode_image

SIZES = {"caption": 90, "caption_val": 30, "sft": 90, "sft_val": 30}
TRAINING = ("caption", "caption_val", "sft", "sft_val")
ZH = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "red": "红色", "green": "绿色", "blue": "蓝色",
      "yellow": "黄色", "purple": "紫色", "top left": "左上角", "top right": "右上角", "bottom left": "左下角",
      "bottom right": "右下角"}


@pytest.fixture(scope="module")
def world_files(tmp_path_factory) -> dict[str, Path]:
    return write_vision_world(tmp_path_factory.mktemp("vision"), seed=0, sizes=SIZES)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def components(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """4-connected groups of True pixels, as (y, x) lists."""
    seen, groups = np.zeros_like(mask), []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start], stack, group = True, [start], []
        while stack:
            y, x = stack.pop()
            group.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        groups.append(group)
    return groups


def hue_name(rgb: tuple[int, int, int]) -> str:
    hue = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] * 360
    for name, upper in (("red", 20), ("yellow", 70), ("green", 170), ("blue", 250), ("purple", 320)):
        if hue < upper:
            return name
    return "red"


def shape_name(group: list[tuple[int, int]]) -> str:
    """By how much of its bounding box an object fills: a square all, a disc π/4, a triangle a half."""
    ys, xs = zip(*group)
    fill = len(group) / ((max(ys) - min(ys) + 1) * (max(xs) - min(xs) + 1))
    return "square" if fill > 0.95 else "circle" if fill > 0.68 else "triangle"


def read_picture(path: Path) -> dict[str, str]:
    """What the picture shows, from its pixels: shape, colour, count and position (English keys)."""
    pixels = np.array(Image.open(path).convert("RGB"))
    assert pixels.shape == (64, 64, 3)
    mask = (pixels != 255).any(axis=-1)
    colours = {tuple(int(c) for c in p) for p in pixels[mask]}
    assert len(colours) == 1, f"{path}: no anti-aliasing, one colour expected, got {len(colours)}"
    groups = components(mask)
    shapes = {shape_name(g) for g in groups}
    assert len(shapes) == 1, f"{path}: one shape expected, got {shapes}"
    ys, xs = np.nonzero(mask)
    rows, columns = {("top", "bottom")[y // 32] for y in ys}, {("left", "right")[x // 32] for x in xs}
    assert len(rows) == len(columns) == 1, f"{path}: objects in more than one quadrant"
    return {"shape": shapes.pop(), "colour": hue_name(colours.pop()), "count": str(len(groups)),
            "position": f"{rows.pop()} {columns.pop()}"}


def expected_key(picture: dict[str, str], kind: str, lang: str) -> str:
    value = picture[kind]
    return ZH.get(value, value) if lang == "zh" else value


def test_the_same_seed_writes_the_same_bytes(world_files, tmp_path):
    again = write_vision_world(tmp_path / "again", seed=0, sizes=SIZES)
    first_dir, again_dir = world_files["sft"].parent, again["sft"].parent
    files = sorted(p.relative_to(first_dir) for p in first_dir.rglob("*") if p.is_file())
    assert len(files) == sum(SIZES.values()) + 48 + len(FILE_NAMES)
    assert all((first_dir / f).read_bytes() == (again_dir / f).read_bytes() for f in files)
    other = write_vision_world(tmp_path / "other", seed=1, sizes=SIZES)
    assert other["sft"].read_bytes() != world_files["sft"].read_bytes()


def test_rows_are_vlm_rows_whose_images_decode(world_files):
    spec = ImageSpec(height=32, width=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    for key, path in world_files.items():
        for row in read_rows(path):
            turns = row["conversations"]
            assert [t["role"] for t in turns] == ["user", "assistant"] and turns[1]["content"]
            assert turns[0]["content"].count("<image>") == len(row["images"]) == 1
            assert spec(decode_image(path.parent / row["images"][0])).shape == (3, 32, 32)


def test_held_out_pairs_are_never_shown_in_training(world_files):
    world = build_vision_world(0)
    pairs = world.heldout_pairs
    assert len(pairs) == 3 and len({c for c, _ in pairs}) == len({s for _, s in pairs}) == 3
    assert build_vision_world(1).heldout_pairs != pairs or build_vision_world(2).heldout_pairs != pairs
    seen = Counter()
    for key in TRAINING:
        for row in read_rows(world_files[key]):
            picture = read_picture(world_files[key].parent / row["images"][0])
            seen[(picture["colour"], picture["shape"])] += 1
    assert not pairs & set(seen)
    assert len(seen) == 12  # every other pair is shown, so every colour and every shape is
    assert max(seen.values()) - min(seen.values()) <= len(TRAINING)  # each split cycles through the pairs
    for row in read_rows(world_files["heldout_qa"]):
        picture = read_picture(world_files["heldout_qa"].parent / row["images"][0])
        assert (picture["colour"], picture["shape"]) in pairs


@pytest.mark.parametrize("key", ["sft", "heldout_qa", "heldout_swapped"])
def test_answers_are_right_for_the_drawn_picture(world_files, key):
    rows = read_rows(world_files[key])
    for row in rows:
        picture = read_picture(world_files[key].parent / row["images"][0])
        lang = "zh" if re.search(r"[\u4e00-\u9fff]", row["conversations"][0]["content"]) else "en"
        answer = row["conversations"][1]["content"]
        kinds = [k for k in picture if score_answer(answer, expected_key(picture, k, lang))]
        assert kinds, f"{row}: the answer names nothing the picture shows ({picture})"
        if key != "sft":
            assert row["lang"] == lang and row["answer"] == expected_key(picture, row["kind"], lang)
            assert score_answer(answer, row["answer"])
    if key != "sft":
        assert Counter(r["kind"] for r in rows) == {k: 48 for k in ("shape", "colour", "count", "position")}


def test_captions_describe_the_picture(world_files):
    english = re.compile(r"(\d) (\w+) (circle|square|triangle)s? in the (\w+ \w+)\.")
    chinese = re.compile(r"(\S+角)有(\d)个(\S+)的(\S+)。")
    for row in read_rows(world_files["caption"]):
        picture = read_picture(world_files["caption"].parent / row["images"][0])
        caption = row["conversations"][1]["content"]
        if match := english.fullmatch(caption):
            assert match.groups() == (picture["count"], picture["colour"], picture["shape"], picture["position"])
        else:
            match = chinese.fullmatch(caption)
            assert match, caption
            assert match.groups() == (ZH[picture["position"]], picture["count"], ZH[picture["colour"]],
                                      ZH[picture["shape"]])


def test_swapped_rows_ask_the_same_question_over_a_picture_with_another_answer(world_files):
    questions, swapped = read_rows(world_files["heldout_qa"]), read_rows(world_files["heldout_swapped"])
    assert len(questions) == len(swapped) == 192
    for row, other in zip(questions, swapped):
        assert other["conversations"][0] == row["conversations"][0] and other["kind"] == row["kind"]
        assert other["images"] != row["images"] and other["original_answer"] == row["answer"] != other["answer"]


def test_chance_is_one_over_the_choices_of_each_kind():
    rows = [{"kind": "shape"}, {"kind": "colour"}, {"kind": "count"}, {"kind": "position"}]
    assert chance_accuracy(rows) == pytest.approx((1 / 3 + 1 / 5 + 1 / 4 + 1 / 4) / 4)
    assert chance_accuracy(rows[:1] * 3) == pytest.approx(1 / 3)
