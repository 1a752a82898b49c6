"""(image, caption) pairs for the SigLIP stage: what is not a pair, and a missing image, are named (the stage's own
test, tests/stages/test_siglip.py, trains on them)."""

from __future__ import annotations

import pytest

from minimind_pl.data.image_captions import ImageCaptionPairs
from minimind_pl.errors import UserError
from minimind_pl.tokenizer import Tokenizer
from minimind_pl.vision.tower import tower_image_spec


def test_rows_that_are_no_pairs_and_missing_images_are_named(tmp_path, tokenizer_dir):
    tokenizer, spec = Tokenizer.from_file(tokenizer_dir), tower_image_spec(64)
    path = tmp_path / "rows.jsonl"
    good = '{"conversations": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "a"}], ' \
           '"images": ["gone.png"]}\n'
    text_only = '{"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}]}\n'
    path.write_text(good + text_only, encoding="utf-8")
    with pytest.raises(UserError, match=r"rows.jsonl:2: an image-caption pair needs an image"):
        ImageCaptionPairs(path, tokenizer, spec, 32)
    path.write_text(good.replace("<image>", "no tag"), encoding="utf-8")  # the vlm format's own check
    with pytest.raises(UserError, match=r"rows.jsonl:1: 0 <image> tags in the non-system turns but 1 image"):
        ImageCaptionPairs(path, tokenizer, spec, 32)
    path.write_text(good, encoding="utf-8")
    with pytest.raises(UserError, match=r"gone.png \(row 1\)"):
        ImageCaptionPairs(path, tokenizer, spec, 32)[0]
