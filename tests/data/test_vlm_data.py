"""Image conversations (MiniMind-V): image-token runs, loss mask, each row's images in order, bad images and rows,
Parquet files, decoding in the loader workers.

References are worked out here: token positions from the tokenizer on the pieces of the rendered text (a special
token never merges with its neighbours), answers from the conversation, pixels from V1's ImageSpec on the file.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from minimind_pl.data import DataFormatError, VLMDataModule
from minimind_pl.data.formats import detect_format, resolve_format
from minimind_pl.data.formats.vlm import DEFAULT_IMAGE_TOKEN_LEN
from minimind_pl.data.packing import IGNORE_INDEX
from minimind_pl.errors import UserError
from minimind_pl.vision.preprocess import ImageSpec
from minimind_pl.vision.vlm import image_slots

IMAGE_ID = 12  # <|image_pad|> in MiniMind's tokenizer
RUN = 3  # image tokens per image in these tests (small rows)
END = "<|im_end|>\n"
SIZE = 8
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (20, 40, 230), "grey": (120, 120, 120)}


def draw(path: Path, colour: str) -> Path:
    """A tiny image: a coloured square on a white field, different for each colour."""
    image = Image.new("RGB", (13, 9), "white")
    ImageDraw.Draw(image).rectangle((2, 1, 9, 7), fill=COLOURS[colour])
    image.save(path)
    return path


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def answer(text: str) -> dict:
    return {"role": "assistant", "content": text}


CONVERSATIONS = [  # doc A: one image; doc B: text only; doc C: two images, one of them in the answer
    ({"conversations": [user("<image>What colour?"), answer("Red.")], "images": ["img/red.png"]}),
    ({"conversations": [user("Say hi"), answer("Hi!")]}),
    ({"conversations": [user("Compare <image> with"), answer("<image> is blue, the first green.")],
      "images": ["img/green.png", "img/blue.png"]}),
]


@pytest.fixture
def tower(tmp_path) -> Path:
    """A vision folder whose preprocessor_config.json resizes to 8×8 (SigLIP style)."""
    folder = tmp_path / "tower"
    folder.mkdir()
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "SiglipImageProcessor", "do_resize": True, "size": {"height": SIZE, "width": SIZE},
        "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    return folder


@pytest.fixture
def data(tmp_path, write_jsonl) -> Path:
    (tmp_path / "img").mkdir()
    for colour in COLOURS:
        draw(tmp_path / "img" / f"{colour}.png", colour)
    return write_jsonl(tmp_path / "vlm.jsonl", CONVERSATIONS)


def module(path: Path, tower: Path, tok_dir: str, tmp_path: Path, seq_len: int = 512, **kwargs) -> VLMDataModule:
    dm = VLMDataModule(str(path), seq_len=seq_len, batch_size=2, tokenizer=tok_dir, vision_encoder=str(tower),
                       image_token_len=RUN, cache_dir=str(tmp_path / "cache"), num_workers=kwargs.pop("num_workers", 0),
                       system_prompt_ratio=0.0, empty_think_drop_ratio=1.0, **kwargs)
    dm.setup("fit")
    return dm


def expected_document(tok, conversation: list) -> tuple[list[int], list[int], list[str]]:
    """(token ids, image-run starts, answers + end) of one conversation, worked out piece by piece: the rendered
    text split at each ``<image>``, each piece tokenized alone, RUN image ids in between."""
    text = tok.apply_chat_template(conversation).replace("<think>\n\n</think>\n\n", "")
    ids, starts = [], []
    for k, piece in enumerate(text.split("<image>")):
        if k:
            starts.append(len(ids))
            ids += [IMAGE_ID] * RUN
        ids += tok.encode(piece)
    answers = [m["content"] for m in conversation if m["role"] == "assistant"]
    return ids, starts, answers


def label_spans(labels: np.ndarray) -> list[tuple[int, int]]:
    edges = np.flatnonzero(np.diff(np.r_[0, (labels != IGNORE_INDEX).astype(np.int8), 0]))
    return list(zip(edges[::2], edges[1::2]))


def pixels(tower: Path, *files: Path) -> torch.Tensor:
    spec = ImageSpec.from_folder(tower)
    return torch.stack([spec(Image.open(f)) for f in files])


def test_one_packed_row_holds_every_document_its_image_runs_answers_and_images_in_order(data, tower, tok_dir,
                                                                                         tmp_path):
    dm = module(data, tower, tok_dir, tmp_path)
    tok = dm.tokenizer
    assert len(dm.train_dataset) == 1
    row = dm.train_dataset[0]
    ids, runs, answers, start = [], [], [], 0
    for record in CONVERSATIONS:
        doc_ids, doc_runs, doc_answers = expected_document(tok, record["conversations"])
        runs += [start + s for s in doc_runs]
        answers += doc_answers
        ids += doc_ids
        start += len(doc_ids)
    assert row["input_ids"][:len(ids) - 1].tolist() == ids[:-1]
    is_image = np.r_[False, row["input_ids"] == IMAGE_ID, False]
    assert np.flatnonzero(np.diff(is_image.astype(np.int8)) == 1).tolist() == runs
    assert (row["input_ids"] == IMAGE_ID).sum() == 3 * RUN
    # loss: the answers and their end marker only; the image run inside doc C's answer splits its span
    spans = [tok.decode(ids[a + 1:b + 1]) for a, b in label_spans(row["labels"])]
    assert spans == ["Red." + END, "Hi!" + END, " is blue, the first green." + END]
    assert IMAGE_ID not in row["labels"]
    expected = pixels(tower, *(data.parent / "img" / f"{c}.png" for c in ("red", "green", "blue")))
    assert torch.equal(row["pixel_values"], expected)
    assert row["doc_ids"][runs].tolist() == [0, 2, 2]


def test_a_document_cut_inside_an_image_run_gives_its_image_to_both_rows(data, tower, tok_dir, tmp_path):
    probe = module(data, tower, tok_dir, tmp_path)
    lengths = [len(expected_document(probe.tokenizer, r["conversations"])[0]) for r in CONVERSATIONS]
    first_run_c = lengths[0] + lengths[1] + expected_document(probe.tokenizer, CONVERSATIONS[2]["conversations"])[1][0]
    seq_len = first_run_c + 1  # row 0 ends after the first image token of doc C's first run
    dm = module(data, tower, tok_dir, tmp_path, seq_len=seq_len)
    rows = [dm.train_dataset[i] for i in range(2)]
    img = data.parent / "img"
    assert torch.equal(rows[0]["pixel_values"], pixels(tower, img / "red.png", img / "green.png"))
    assert rows[0]["input_ids"][-1] == IMAGE_ID and rows[0]["input_ids"][-2] != IMAGE_ID
    # the rest of green's run opens row 1 (positions restart), then blue's run
    assert rows[1]["input_ids"][:RUN - 1].tolist() == [IMAGE_ID] * (RUN - 1)
    assert rows[1]["position_ids"][0] == 0
    assert torch.equal(rows[1]["pixel_values"], pixels(tower, img / "green.png", img / "blue.png"))
    batch = dm.collate_fn(rows)
    assert batch["pixel_values"].shape == (2, 2, 3, SIZE, SIZE)
    # the model reads row 0's cut run as green's first feature, row 1's rest of it as green's last two
    _, image, feature = image_slots(batch["input_ids"], IMAGE_ID, RUN)
    assert (image[0, -1].item(), feature[0, -1].item()) == (1, 0)
    assert image[1, :RUN - 1].tolist() == [0] * (RUN - 1) and feature[1, :RUN - 1].tolist() == list(range(1, RUN))


def test_rows_with_fewer_images_are_zero_padded_and_a_batch_without_images_has_no_pixel_values(
        data, tower, tok_dir, tmp_path):
    dm = module(data, tower, tok_dir, tmp_path, packing=False)  # one document per row, as MiniMind-V
    rows = [dm.train_dataset[i] for i in range(3)]
    assert [len(r.get("pixel_values", ())) for r in rows] == [1, 0, 2]
    batch = dm.collate_fn(rows)
    assert batch["pixel_values"].shape == (3, 2, 3, SIZE, SIZE)
    assert torch.equal(batch["pixel_values"][0, 1], torch.zeros(3, SIZE, SIZE))
    assert torch.equal(batch["pixel_values"][1], torch.zeros(2, 3, SIZE, SIZE))
    assert "pixel_values" not in dm.collate_fn([rows[1]])
    assert "skipped_documents" not in batch


@pytest.mark.parametrize("images, tags, message", [
    (["img/red.png"], "<image> and <image>", "2 <image> tags in the non-system turns but 1 image:"),
    (["img/red.png", "img/blue.png"], "<image> only one", "1 <image> tag in the non-system turns but 2 images:")])
def test_more_or_fewer_tags_than_images_is_an_error_naming_the_line(tmp_path, write_jsonl, tower, tok_dir, data,
                                                                    images, tags, message):
    bad = {"conversations": [user(tags), answer("ok")], "images": images}
    path = write_jsonl(tmp_path / "bad.jsonl", [CONVERSATIONS[0], bad])
    with pytest.raises(DataFormatError, match=f"bad.jsonl, line 2: {message}"):
        module(path, tower, tok_dir, tmp_path)
    dm = module(path, tower, tok_dir, tmp_path, skip_invalid=True)
    assert dm.stats["skipped_lines"] == 1 and dm.stats["train"]["images"] == 1


def test_a_tag_in_a_system_turn_is_text(tmp_path, write_jsonl, tower, tok_dir, data):
    system = {"conversations": [{"role": "system", "content": "Images look like <image>."}, user("hi"),
                                answer("hello")], "images": []}
    path = write_jsonl(tmp_path / "sys.jsonl", [system])
    dm = module(path, tower, tok_dir, tmp_path)
    assert IMAGE_ID not in dm.train_dataset[0]["input_ids"]
    assert "<image>" in dm.tokenizer.decode(dm.train_dataset[0]["input_ids"].tolist())


def test_adjacent_tags_are_consecutive_images_and_the_image_token_in_the_text_is_refused(tmp_path, write_jsonl,
                                                                                        tower, tok_dir, data):
    adjacent = {"conversations": [user("<image><image>?"), answer("two")], "images": ["img/red.png", "img/blue.png"]}
    dm = module(write_jsonl(tmp_path / "adjacent.jsonl", [adjacent]), tower, tok_dir, tmp_path, seq_len=64)
    ids, starts, _ = expected_document(dm.tokenizer, adjacent["conversations"])
    assert starts[1] == starts[0] + RUN  # one run of two images' tokens
    row = dm.train_dataset[0]
    assert row["input_ids"][:len(ids)].tolist() == ids
    assert torch.equal(row["pixel_values"], pixels(tower, data.parent / "img/red.png", data.parent / "img/blue.png"))
    literal = {"conversations": [user("<image> and <|image_pad|>"), answer("?")], "images": ["img/red.png"]}
    path = write_jsonl(tmp_path / "literal.jsonl", [adjacent, literal])
    with pytest.raises(DataFormatError, match=r"literal.jsonl, line 2: 1 image\(s\) but runs of <\|image_pad\|> of "
                                              rf"lengths \[{RUN}, 1\]"):
        module(path, tower, tok_dir, tmp_path)


@pytest.mark.parametrize("problem", ["missing", "corrupt"])
def test_a_missing_or_corrupt_image_names_file_and_line_or_is_skipped_and_counted(data, tower, tok_dir, tmp_path,
                                                                                  problem):
    green = data.parent / "img" / "green.png"
    if problem == "missing":
        green.unlink()
    else:
        green.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    dm = module(data, tower, tok_dir, tmp_path)
    with pytest.raises(DataFormatError, match=rf"vlm.jsonl, line 3: image 1 \({green}\): "
                                              rf"({'no such file' if problem == 'missing' else 'undecodable'})"):
        dm.train_dataset[0]
    dm = module(data, tower, tok_dir, tmp_path, skip_invalid=True)
    with pytest.warns(UserWarning, match="skipped: .*vlm.jsonl, line 3: image 1"):
        row = dm.train_dataset[0]
    c_start = int(np.flatnonzero(row["doc_ids"] == 2)[0])
    c_tokens = int((row["doc_ids"] == 2).sum())
    assert (row["input_ids"][c_start:] == dm.tokenizer.pad_id).all()  # doc C: padding without loss
    assert (row["labels"][c_start - 1:] == IGNORE_INDEX).all()
    assert row["real_tokens"] == c_start  # its tokens no longer count
    assert c_tokens > 2 * RUN
    assert torch.equal(row["pixel_values"], pixels(tower, data.parent / "img" / "red.png"))
    batch = dm.collate_fn([row])
    assert int(batch["skipped_documents"]) == 1
    moved = dm.transfer_batch_to_device(batch, torch.device("cpu"), 0)
    assert "skipped_documents" not in moved and dm.skipped_documents == 1


def test_decoding_runs_in_the_loader_workers(data, tower, tok_dir, tmp_path):
    dm = module(data, tower, tok_dir, tmp_path, num_workers=1)
    log = tmp_path / "pids"
    dm.train_dataset.image_spec = RecordingSpec(ImageSpec.from_folder(tower), log)
    # an ordered loader without persistent workers, read to its end: its worker exits (workers ignore SIGTERM, so
    # a persistent one left alive would keep the interpreter waiting for it at exit)
    batch, = list(dm.ordered_dataloader("train"))
    img = data.parent / "img"
    assert torch.equal(batch["pixel_values"][0], pixels(tower, *(img / f"{c}.png" for c in ("red", "green", "blue"))))
    pids = set(log.read_text().split())
    assert pids and str(os.getpid()) not in pids


class RecordingSpec:
    """An ImageSpec that writes the id of the process it runs in to a file (picklable, for the workers), whether it
    preprocesses a decoded image or normalises one the token cache stores resized."""

    def __init__(self, spec: ImageSpec, log: Path) -> None:
        self.spec, self.log = spec, log

    def record(self) -> None:
        with open(self.log, "a") as handle:
            handle.write(f"{os.getpid()}\n")

    def __call__(self, image: Image.Image) -> torch.Tensor:
        self.record()
        return self.spec(image)

    def normalised(self, resized: np.ndarray) -> torch.Tensor:  # an image stored resized in the token cache
        self.record()
        return self.spec.normalised(resized)


def png_bytes(colour: str) -> bytes:
    buffer = io.BytesIO()
    path_free = Image.new("RGB", (13, 9), "white")
    ImageDraw.Draw(path_free).rectangle((2, 1, 9, 7), fill=COLOURS[colour])
    path_free.save(buffer, format="PNG")
    return buffer.getvalue()


def write_parquet(path: Path, rows: list[tuple[list, object]]) -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"conversations": [json.dumps(c, ensure_ascii=False) for c, _ in rows],
                      "image_bytes": [images for _, images in rows]})
    pq.write_table(table, path, row_group_size=2)
    return path


def test_a_minimind_v_parquet_file_round_trips_with_its_images_and_placeholders(tmp_path, tower, tok_dir):
    black = io.BytesIO()
    Image.new("RGB", (8, 8)).save(black, format="JPEG")
    rows = [([user("<image>What colour?"), answer("Red.")], [png_bytes("red")]),
            ([user("Say hi"), answer("Hi!")], [black.getvalue()]),  # MiniMind-V's placeholder: dropped
            ([user("Compare <image> with"), answer("<image> is blue, the first green.")],
             [png_bytes("green"), png_bytes("blue")])]
    path = write_parquet(tmp_path / "sft_i2t.parquet", rows)
    assert resolve_format(path, "auto").name == "vlm"
    dm = module(path, tower, tok_dir, tmp_path)
    cache = dm.caches[str(path)]
    assert cache.meta["images"] == "bytes" and cache.meta["n_images"] == 3
    assert cache.doc_images(2) == [png_bytes("green"), png_bytes("blue")]
    row = dm.train_dataset[0]
    spec = ImageSpec.from_folder(tower)
    expected = torch.stack([spec(Image.open(io.BytesIO(png_bytes(c)))) for c in ("red", "green", "blue")])
    assert torch.equal(row["pixel_values"], expected)
    ids = sum((expected_document(dm.tokenizer, c)[0] for c, _ in rows), [])
    assert row["input_ids"][:len(ids) - 1].tolist() == ids[:-1]


def test_parquet_rows_are_named_in_errors(tmp_path, tower, tok_dir):
    rows = [([user("Say hi"), answer("Hi!")], []), ([user("<image> <image>"), answer("two")], [png_bytes("red")])]
    path = write_parquet(tmp_path / "bad.parquet", rows)
    with pytest.raises(DataFormatError, match=r"bad.parquet, row 2: 2 <image> tags .* but 1 image"):
        module(path, tower, tok_dir, tmp_path)
    rows = [([user("<image>?"), answer("a")], [b"not an image"])]
    dm = module(write_parquet(tmp_path / "broken.parquet", rows), tower, tok_dir, tmp_path)
    with pytest.raises(DataFormatError, match=r"broken.parquet, row 1: image 1 \(12 bytes in the file\): undecodable"):
        dm.train_dataset[0]
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(__import__("pyarrow").table({"text": ["hello"]}), tmp_path / "other.parquet")
    with pytest.raises(UserError, match=r"other.parquet: no column conversations, image_bytes \(it has: text\)"):
        module(tmp_path / "other.parquet", tower, tok_dir, tmp_path)
    from minimind_pl.commands.data.paths import input_files

    with pytest.raises(UserError, match="is a Parquet file; this command reads and writes jsonl"):
        input_files([str(path)], "INPUT")  # data clean / split / mix


def test_data_stats_counts_images_and_image_tokens_in_both_files(data, tmp_path, tok_dir):
    from minimind_pl.commands.data.stats import stats_command

    rows = [(r["conversations"], [png_bytes("red")] * len(r.get("images", []))) for r in CONVERSATIONS]
    parquet = write_parquet(tmp_path / "v.parquet", rows)
    jsonl_stats, parquet_stats = stats_command([str(data), str(parquet)], tokenizer=tok_dir, progress=False)
    for stats in (jsonl_stats, parquet_stats):
        assert stats["format"] == "vlm" and stats["lines"] == 3 and stats["documents"] == 3
        assert (stats["images"], stats["images_per_row_max"], stats["rows_with_images"]) == (3, 2, 2)
        assert stats["images_per_row_mean"] == 1.0
        # the stats count with the DataModule's default 64 tokens per image
        assert stats["image_token_share"] == round(3 * DEFAULT_IMAGE_TOKEN_LEN / stats["tokens"], 4)


def test_detection_never_takes_a_plain_sft_line():
    assert detect_format({"conversations": [user("<image>?"), answer("a")]}).name == "sft"
    assert detect_format({"conversations": [user("<image>?"), answer("a")], "images": ["a.png"]}).name == "vlm"
    assert detect_format({"conversations": [user("q"), answer("")], "images": []}).name == "vlm"


def test_parquet_without_pyarrow_says_how_to_install_it(monkeypatch, tmp_path):
    from minimind_pl.data.parquet import require_pyarrow

    monkeypatch.setitem(__import__("sys").modules, "pyarrow.parquet", None)
    with pytest.raises(UserError, match=r'pip install -e "\.\[vlm\]"'):
        require_pyarrow()


# ----------------------------------------------------------------------------- images stored resized in the cache

def test_images_stored_resized_are_only_normalised_and_equal_decoding(data, tower, tok_dir, tmp_path, monkeypatch):
    """The cache keeps each image resized for the tower's ImageSpec (one sidecar per spec): a worker decodes nothing
    and gets the very tensors decoding would give; a file changed since is decoded again."""
    import minimind_pl.data.image_rows as image_rows

    dm = module(data, tower, tok_dir, tmp_path)
    spec = ImageSpec.from_folder(tower)
    assert len(list((tmp_path / "cache").glob(f"*/resized-{spec.key()}/pixels.bin"))) == 1
    other = ImageSpec(height=SIZE, width=SIZE, mean=(0.5,) * 3, std=(0.5,) * 3)  # another tower's preprocessing
    assert other.key() != spec.key()

    def no_decoding(data):
        raise AssertionError(f"decoded {data}")

    monkeypatch.setattr(image_rows, "decode_image", no_decoding)
    img = data.parent / "img"
    expected = pixels(tower, *(img / f"{c}.png" for c in ("red", "green", "blue")))
    assert torch.equal(dm.train_dataset[0]["pixel_values"], expected)  # bit for bit
    monkeypatch.undo()
    draw(img / "green.png", "grey")  # changed after the cache was written: decoded again
    os.utime(img / "green.png", ns=(1, 1))
    expected = pixels(tower, *(img / f"{c}.png" for c in ("red", "grey", "blue")))
    assert torch.equal(module(data, tower, tok_dir, tmp_path).train_dataset[0]["pixel_values"], expected)
    assert module(data, tower, tok_dir, tmp_path, store_resized_images=False).train_dataset.resized == {}
