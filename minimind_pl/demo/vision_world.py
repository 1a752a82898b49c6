"""A seeded synthetic image world for the vision part of ``python main.py demo``: shapes drawn with Pillow.

Each 64×64 picture shows 1-4 copies of one shape (circle, square, triangle) in one colour (red, green, blue,
yellow, purple), all inside one quadrant (top left, top right, bottom left, bottom right), on white. Pillow draws
without anti-aliasing, so a picture holds exactly two colours and every answer can be read back off its pixels.

* Captions ("3 red circles in the top left." / "左上角有3个红色的圆形。") and four kinds of question (what shape,
  what colour, how many, where) in English and Chinese, with short scoreable answers (``ANSWER_KEYS``).
* Three colour+shape pairs are *held out*: one per shape, three different colours, drawn by the seed. No training
  picture shows them (every shape and every colour still appears in training, only not together); the held-out
  questions ask about pictures of exactly those pairs.
* The "image swapped" variant asks each held-out question over another held-out picture whose answer differs
  (``original_answer`` keeps the first picture's): a model that answers from the picture changes its answer, one
  that guesses from the question does not.

The files use the VLM jsonl format (``{"conversations": [...], "images": ["images/....png"]}``, paths relative to
the jsonl file, ``<image>`` in the user turn). Pillow and the standard library only; the same seed writes the same
bytes.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

IMAGE_SIZE = 64
CELL = 16  # a quadrant (32 px) holds a 2×2 grid of cells, one object per cell
OBJECT_SIZES = (10, 13)  # smallest and largest object side in pixels (inclusive)
BACKGROUND = (255, 255, 255)
IMAGE_TAG = "<image>"
LANGS = ("en", "zh")
KINDS = ("shape", "colour", "count", "position")
HELDOUT_PAIRS = 3  # one held-out colour per shape

SHAPES = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}
COLOURS = {"red": ("红色", (220, 40, 40)), "green": ("绿色", (40, 160, 60)), "blue": ("蓝色", (40, 80, 220)),
           "yellow": ("黄色", (230, 190, 20)), "purple": ("紫色", (150, 60, 190))}
COUNTS = (1, 2, 3, 4)
POSITIONS = {"top left": ("左上角", (0, 0)), "top right": ("右上角", (1, 0)),
             "bottom left": ("左下角", (0, 1)), "bottom right": ("右下角", (1, 1))}

FILE_NAMES = {
    "caption": "vlm_caption.jsonl",        # pretraining-style: "<image>\ndescribe" -> caption
    "caption_val": "vlm_caption_val.jsonl",
    "sft": "vlm_sft.jsonl",                # one question about the picture -> short answer
    "sft_val": "vlm_sft_val.jsonl",
    "heldout_qa": "vlm_heldout_qa.jsonl",  # questions over held-out colour+shape pairs, with "answer"
    "heldout_swapped": "vlm_heldout_swapped.jsonl",  # the same questions over another held-out picture
}
# how many pictures each split draws (held-out: one per held-out pair, count and position)
DEFAULT_SIZES = {"caption": 1200, "caption_val": 120, "sft": 1200, "sft_val": 120}

DESCRIBE = {"en": ("Describe the picture.", "What is in this image?", "Describe this image briefly."),
            "zh": ("描述这张图片。", "图片里有什么？", "简单描述一下这张图。")}
QUESTIONS = {
    "shape": {"en": ("What shape are the objects?", "Which shape do you see?", "What shape is shown in the picture?"),
              "zh": ("图中是什么形状？", "这些物体是什么形状的？", "你看到的是什么形状？")},
    "colour": {"en": ("What colour are the objects?", "Which colour do you see?", "What colour is the shape?"),
               "zh": ("图中的物体是什么颜色？", "你看到的是什么颜色？", "这个形状是什么颜色的？")},
    "count": {"en": ("How many objects are there?", "How many shapes do you see?", "Count the shapes."),
              "zh": ("图中有几个物体？", "你看到几个形状？", "数一数有几个图形。")},
    "position": {"en": ("Where are the objects?", "Where in the picture are the shapes?", "Which corner are they in?"),
                 "zh": ("物体在哪里？", "这些形状在图片的什么位置？", "它们在哪个角？")},
}
ANSWERS = {
    "shape": {"en": "The shape is a {shape}.", "zh": "图中的形状是{shape}。"},
    "colour": {"en": "The colour is {colour}.", "zh": "颜色是{colour}。"},
    "count": {"en": "There {are} {count} {shapes}.", "zh": "图中有{count}个图形。"},
    "position": {"en": "In the {position} of the picture.", "zh": "在图片的{position}。"},
}


@dataclass(frozen=True)
class Scene:
    """One picture: ``count`` copies of ``shape`` in ``colour`` inside the ``position`` quadrant, each object a
    ``(left, top, side)`` square box in pixels."""

    shape: str
    colour: str
    count: int
    position: str
    boxes: tuple[tuple[int, int, int], ...]

    @property
    def pair(self) -> tuple[str, str]:
        """The (colour, shape) combination the held-out split is made of."""
        return self.colour, self.shape

    def answer_key(self, kind: str, lang: str) -> str:
        """The short answer a scorer looks for (``demo.corpus.score_answer``): "circle" / "圆形", "red" / "红色",
        "3", "top left" / "左上角"."""
        if kind == "count":
            return str(self.count)
        english = {"shape": self.shape, "colour": self.colour, "position": self.position}[kind]
        if lang == "en":
            return english
        return {"shape": SHAPES, "colour": {k: v[0] for k, v in COLOURS.items()},
                "position": {k: v[0] for k, v in POSITIONS.items()}}[kind][english]

    def answer(self, kind: str, lang: str) -> str:
        """The assistant's full answer to a question of ``kind`` (it holds ``answer_key``)."""
        plural = self.count > 1
        return ANSWERS[kind][lang].format(
            shape=self.answer_key("shape", lang), colour=self.answer_key("colour", lang), count=self.count,
            position=self.answer_key("position", lang), are="are" if plural else "is",
            shapes="shapes" if plural else "shape")

    def caption(self, lang: str) -> str:
        """"3 red circles in the top left." / "左上角有3个红色的圆形。\""""
        if lang == "zh":
            return (f"{self.answer_key('position', 'zh')}有{self.count}个{self.answer_key('colour', 'zh')}的"
                    f"{self.answer_key('shape', 'zh')}。")
        return f"{self.count} {self.colour} {self.shape}{'s' if self.count > 1 else ''} in the {self.position}."


@dataclass(frozen=True)
class VisionWorld:
    """The world of one seed: which colour+shape pairs are held out of training."""

    seed: int
    heldout_pairs: frozenset[tuple[str, str]]

    @property
    def training_pairs(self) -> tuple[tuple[str, str], ...]:
        """Every (colour, shape) pair that training pictures may show, in table order."""
        return tuple((c, s) for c in COLOURS for s in SHAPES if (c, s) not in self.heldout_pairs)

    def rng(self, key: str) -> random.Random:
        """The random stream of one split (changing one split leaves the others' pictures as they were)."""
        return random.Random(f"minimind_pl-vision:{self.seed}:{key}")


def build_vision_world(seed: int = 0) -> VisionWorld:
    """The held-out pairs of ``seed``: a different colour for each shape."""
    rng = random.Random(f"minimind_pl-vision:{seed}:heldout")
    colours = rng.sample(list(COLOURS), HELDOUT_PAIRS)
    return VisionWorld(seed, frozenset(zip(colours, SHAPES)))


# ----------------------------------------------------------------------------- pictures

def place_objects(rng: random.Random, count: int, position: str) -> tuple[tuple[int, int, int], ...]:
    """``count`` boxes in distinct cells of the quadrant: each at least 1 px inside its 16 px cell, so two objects
    are at least 2 px apart and never touch."""
    column, row = POSITIONS[position][1]
    cells = rng.sample([(cx, cy) for cy in range(2) for cx in range(2)], count)
    boxes = []
    for cx, cy in sorted(cells, key=lambda c: (c[1], c[0])):
        side = rng.randint(*OBJECT_SIZES)
        left = column * 2 * CELL + cx * CELL + rng.randint(1, CELL - 1 - side)
        top = row * 2 * CELL + cy * CELL + rng.randint(1, CELL - 1 - side)
        boxes.append((left, top, side))
    return tuple(boxes)


def random_scene(rng: random.Random, pair: tuple[str, str]) -> Scene:
    """A scene of the (colour, shape) ``pair`` with a random count, position and placement."""
    count, position = rng.choice(COUNTS), rng.choice(list(POSITIONS))
    return Scene(pair[1], pair[0], count, position, place_objects(rng, count, position))


def draw_scene(scene: Scene) -> Image.Image:
    """The 64×64 RGB picture of ``scene`` (no anti-aliasing: background and the one colour only)."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    fill = COLOURS[scene.colour][1]
    for left, top, side in scene.boxes:
        right, bottom = left + side - 1, top + side - 1
        if scene.shape == "circle":
            draw.ellipse((left, top, right, bottom), fill=fill)
        elif scene.shape == "square":
            draw.rectangle((left, top, right, bottom), fill=fill)
        else:  # an upright triangle: apex at the top middle, base along the bottom edge
            draw.polygon([((left + right) / 2, top), (left, bottom), (right, bottom)], fill=fill)
    return image


def training_scenes(world: VisionWorld, split: str, n: int) -> list[Scene]:
    """``n`` scenes of the training pairs, cycling through them so each pair appears about equally often."""
    rng = world.rng(split)
    pairs = list(world.training_pairs)
    scenes = []
    while len(scenes) < n:
        rng.shuffle(pairs)
        scenes += [random_scene(rng, pair) for pair in pairs[:n - len(scenes)]]
    return scenes


def heldout_scenes(world: VisionWorld) -> list[Scene]:
    """One scene per held-out pair, count and position (3 × 4 × 4 = 48), in table order."""
    rng = world.rng("heldout")
    scenes = []
    for colour, shape in sorted(world.heldout_pairs):
        for count in COUNTS:
            for position in POSITIONS:
                scenes.append(Scene(shape, colour, count, position, place_objects(rng, count, position)))
    return scenes


# ----------------------------------------------------------------------------- rows

def _chat(question: str, answer: str, image: str) -> dict:
    """A VLM row: one image, asked about in the first user turn."""
    return {"conversations": [{"role": "user", "content": f"{IMAGE_TAG}\n{question}"},
                              {"role": "assistant", "content": answer}], "images": [image]}


def caption_row(rng: random.Random, scene: Scene, image: str) -> dict:
    """"<image>\\nDescribe the picture." -> the caption, in a random language."""
    lang = rng.choice(LANGS)
    return _chat(rng.choice(DESCRIBE[lang]), scene.caption(lang), image)


def question_row(rng: random.Random, scene: Scene, image: str, kind: str, lang: str) -> dict:
    """A question of ``kind`` in ``lang`` about the picture -> its short full answer."""
    return _chat(rng.choice(QUESTIONS[kind][lang]), scene.answer(kind, lang), image)


def sft_row(rng: random.Random, scene: Scene, image: str) -> dict:
    """A question of a random kind in a random language."""
    return question_row(rng, scene, image, rng.choice(KINDS), rng.choice(LANGS))


def eval_row(rng: random.Random, scene: Scene, image: str, kind: str, lang: str) -> dict:
    """A held-out question with what the scorecard checks: ``answer`` (the key, see ``Scene.answer_key``), the
    question ``kind``, ``lang`` and the ``pair`` ("red circle")."""
    return {**question_row(rng, scene, image, kind, lang), "answer": scene.answer_key(kind, lang), "kind": kind,
            "lang": lang, "pair": f"{scene.colour} {scene.shape}"}


def swapped_row(row: dict, other: Scene, image: str, kind: str, lang: str) -> dict:
    """``row``'s question over another picture whose answer differs: ``answer`` (and the assistant turn) is right
    for the shown picture, ``original_answer`` is the first picture's (what a model that ignores the picture
    would still say)."""
    question = row["conversations"][0]["content"]
    conversations = [{"role": "user", "content": question}, {"role": "assistant", "content": other.answer(kind, lang)}]
    return {**row, "conversations": conversations, "images": [image], "answer": other.answer_key(kind, lang),
            "original_answer": row["answer"], "pair": f"{other.colour} {other.shape}"}


def heldout_rows(world: VisionWorld, scenes: list[Scene], images: list[str]) -> tuple[list[dict], list[dict]]:
    """Every held-out picture asked all four kinds (its language alternating picture by picture), and the same
    questions over another held-out picture whose answer differs: ``(questions, swapped)``."""
    rng = world.rng("heldout_rows")
    questions, swapped = [], []
    for i, (scene, image) in enumerate(zip(scenes, images)):
        lang = LANGS[i % 2]
        for kind in KINDS:
            row = eval_row(rng, scene, image, kind, lang)
            others = [j for j, s in enumerate(scenes) if s.answer_key(kind, lang) != row["answer"]]
            j = rng.choice(others)
            questions.append(row)
            swapped.append(swapped_row(row, scenes[j], images[j], kind, lang))
    return questions, swapped


# ----------------------------------------------------------------------------- files

def _write_images(out_dir: Path, split: str, scenes: list[Scene]) -> list[str]:
    """Draw each scene to ``images/<split>/<n>.png``; the paths relative to ``out_dir``."""
    folder = out_dir / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, scene in enumerate(scenes):
        name = f"images/{split}/{i:05d}.png"
        draw_scene(scene).save(out_dir / name, format="PNG")
        names.append(name)
    return names


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8", newline="\n")
    return path


def write_vision_world(out_dir: str | Path, seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, Path]:
    """Draw the world of ``seed`` into ``out_dir``: PNG files under ``images/<split>/`` and the jsonl files of
    ``FILE_NAMES`` beside them; returns ``{key: path}``. ``sizes`` overrides ``DEFAULT_SIZES`` (pictures per
    training split). Same seed, same bytes."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    world = build_vision_world(seed)
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    rows = {}
    for split, make_row in (("caption", caption_row), ("caption_val", caption_row), ("sft", sft_row),
                            ("sft_val", sft_row)):
        scenes = training_scenes(world, split, sizes[split])
        rng = world.rng(f"{split}_rows")
        rows[split] = [make_row(rng, s, name) for s, name in zip(scenes, _write_images(out_dir, split, scenes))]
    scenes = heldout_scenes(world)
    rows["heldout_qa"], rows["heldout_swapped"] = heldout_rows(world, scenes, _write_images(out_dir, "heldout", scenes))
    return {key: _write_jsonl(out_dir / FILE_NAMES[key], rows[key]) for key in FILE_NAMES}


def chance_accuracy(rows: list[dict]) -> float:
    """What guessing uniformly among each question kind's possible answers scores on ``rows`` (by their kind)."""
    choices = {"shape": len(SHAPES), "colour": len(COLOURS), "count": len(COUNTS), "position": len(POSITIONS)}
    return sum(1 / choices[r["kind"]] for r in rows) / max(len(rows), 1)
