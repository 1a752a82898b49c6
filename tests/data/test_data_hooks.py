"""Extending the data package: a new format through the JsonlDataModule hooks, and what jsonargparse sees.

``WordsDataModule`` below is a format written the way the base module's doc says: an encoder plus a
subclass that overrides ``make_encoder``, ``make_dataset``, ``collate_fn`` and ``describe``, with its own
argument and ``*args, **kwargs`` for the base's.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
import pytest
import torch
from docstring_parser import parse
from jsonargparse import ArgumentParser

from minimind_pl.cli import main
from minimind_pl.data import DocumentStream, DPODataModule, JsonlDataModule, RecordEncoder, SFTDataModule
from minimind_pl.data.cache import ensure_cache
from minimind_pl.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[2]

LOUD = 2  # mask bit the test encoder sets on the first token of a text ending with "!"
TEXTS = [f"text number {i}" + ("!" if i % 3 == 0 else ".") for i in range(20)]


class WordsEncoder(RecordEncoder):
    """``{"text": str}`` -> the text's tokens (no bos/eos); every token a target, flag bits on the first."""

    kind = "test-words"
    has_mask = True

    def __init__(self, tokenizer: Any, lowercase: bool = False) -> None:
        super().__init__(tokenizer)
        self.lowercase = lowercase

    def settings(self) -> dict:
        """Cache key: the base settings plus the case folding."""
        return {**super().settings(), "lowercase": self.lowercase}

    def encode_records(self, records: Sequence[tuple[int, Any]]) -> list:
        """One document per record."""
        out = []
        for _, obj in records:
            text = obj["text"].lower() if self.lowercase else obj["text"]
            ids = np.asarray(self.tokenizer.encode(text), np.int64)
            mask = np.ones(ids.size, np.uint8)
            mask[0] |= LOUD if text.endswith("!") else 0
            out.append([(ids, mask)])
        return out


class WordRows(torch.utils.data.Dataset):
    """One text per row, unpadded."""

    def __init__(self, stream: DocumentStream) -> None:
        self.stream = stream

    def __len__(self) -> int:
        return self.stream.n_docs

    def __getitem__(self, index: int) -> dict:
        return {"ids": self.stream.doc(index)[0].astype(np.int64), "index": index}


def pad_words(samples: Sequence[dict]) -> dict:
    """Right-pad the rows of a batch with -1; keep their lengths and indices."""
    lengths = [s["ids"].size for s in samples]
    ids = np.full((len(samples), max(lengths)), -1, np.int64)
    for row, s in enumerate(samples):
        ids[row, :s["ids"].size] = s["ids"]
    index = torch.tensor([s["index"] for s in samples])
    return {"ids": torch.from_numpy(ids), "lengths": torch.tensor(lengths), "index": index,
            "real_tokens": torch.tensor(sum(lengths))}


class WordsDataModule(JsonlDataModule):
    """Texts as variable-length rows (a test format).

    Args:
        lowercase: fold the texts to lower case before tokenizing.
    """

    def __init__(self, *args: Any, lowercase: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lowercase = lowercase

    def make_encoder(self) -> WordsEncoder:
        """The test encoder."""
        return WordsEncoder(self.tokenizer, self.lowercase)

    def make_dataset(self, stream: DocumentStream) -> WordRows:
        """One text per row."""
        return WordRows(stream)

    @property
    def collate_fn(self):
        """Right padding."""
        return pad_words

    def describe(self, stream: DocumentStream, dataset: WordRows) -> dict:
        """Texts and how many of them are loud."""
        return {"texts": len(dataset), "loud": int(np.count_nonzero(stream.first_token_masks() & LOUD))}


class WordsRecorder(L.LightningModule):
    """Records the batches it trains and validates on."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.train_batches: list = []
        self.val_batches: list = []

    def training_step(self, batch, batch_idx):
        self.train_batches.append({k: v.clone() for k, v in batch.items()})
        return (self.weight - batch["lengths"].float().mean()) ** 2

    def validation_step(self, batch, batch_idx):
        self.val_batches.append({k: v.clone() for k, v in batch.items()})

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.fixture
def words_file(tmp_path, write_jsonl):
    return write_jsonl(tmp_path / "words.jsonl", [{"text": t} for t in TEXTS])


def _rows_of(batches: list) -> dict[int, list[int]]:
    """index -> unpadded ids, over all batches."""
    return {int(i): ids[:n].tolist() for b in batches for i, ids, n in zip(b["index"], b["ids"], b["lengths"])}


def test_a_new_format_trains_through_the_hooks(words_file, tok_dir, tmp_path):
    dm = WordsDataModule(str(words_file), seq_len=8, batch_size=3, tokenizer=tok_dir, num_workers=0,
                         cache_dir=str(tmp_path / "cache"), val_fraction=0.25, lowercase=True)
    model = WordsRecorder()
    trainer = L.Trainer(default_root_dir=str(tmp_path), accelerator="cpu", max_epochs=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    n_train, n_val = dm.stats["train"]["texts"], dm.stats["val"]["texts"]
    assert n_train + n_val == len(TEXTS) and n_val > 0
    assert dm.stats["train"]["loud"] + dm.stats["val"]["loud"] == sum(t.endswith("!") for t in TEXTS)
    train_rows, val_rows = _rows_of(model.train_batches), _rows_of(model.val_batches)
    assert sorted(train_rows) == list(range(n_train)) and sorted(val_rows) == list(range(n_val))
    for split, rows in (("train", train_rows), ("val", val_rows)):
        dataset = dm.train_dataset if split == "train" else dm.val_dataset
        for index, ids in rows.items():  # the collate_fn's batches hold make_dataset's rows
            assert ids == dataset[index]["ids"].tolist()
            assert dm.tokenizer.decode(ids) in {t.lower() for t in TEXTS}
    assert dm.hparams["lowercase"] is True and dm.hparams["val_fraction"] == 0.25  # both recorded


def test_first_token_masks_follow_the_selection(words_file, tok_dir, tmp_path, write_jsonl):
    encoder = WordsEncoder(Tokenizer.from_file(tok_dir))
    other = write_jsonl(tmp_path / "other.jsonl", [{"text": "quiet."}, {"text": "loud!"}, {"text": "LOUD!"}])
    caches = [ensure_cache(p, encoder, cache_dir=str(tmp_path), progress=False, verbose=False)
              for p in (words_file, other)]
    stream = DocumentStream(caches, [np.array([0, 3, 4, 6]), None])
    expected = [stream.doc(i)[1][0] for i in range(stream.n_docs)]
    assert stream.first_token_masks().tolist() == expected == [1 | LOUD, 1 | LOUD, 1, 1 | LOUD, 1, 1 | LOUD, 1 | LOUD]


# ---------------------------------------------------------------------------------------------- jsonargparse
BASE_DOCS = {p.arg_name: p.description for p in parse(JsonlDataModule.__doc__).params}
BASE_ARGUMENTS = [name for name in inspect.signature(JsonlDataModule.__init__).parameters if name != "self"]


def _help(capsys, class_path: str) -> str:
    with pytest.raises(SystemExit):
        main(["fit", "--data.help", class_path])
    return " ".join(capsys.readouterr().out.split())  # undo the line wrapping


def _first_words(doc: str) -> str:
    return " ".join(doc.split()[:6])


@pytest.mark.parametrize("module, extra, hidden", [
    ("minimind_pl.data.SFTDataModule", ["system_prompt_ratio", "empty_think_drop_ratio"], []),
    ("minimind_pl.data.DPODataModule", ["overlong"], ["packing", "cross_document_attention"]),
])
def test_help_lists_the_base_arguments_with_their_docs(capsys, module, extra, hidden):
    text = _help(capsys, module)
    for name in BASE_ARGUMENTS:
        if name in hidden:
            assert f"--data.{name} " not in text
            continue
        assert f"--data.{name} " in text
        if module.endswith("SFTDataModule") or name not in ("train_path", "seq_len", "batch_size"):
            assert _first_words(BASE_DOCS[name]) in text, name
    for name in extra:
        assert f"--data.{name} " in text


def test_dpo_keeps_its_defaults_in_help(capsys):
    text = _help(capsys, "minimind_pl.data.DPODataModule")
    assert "pairs per batch on each device (each pair is two sequences). (type: int, default: 4)" in text
    assert "(type: int, default: 1024)" in text


def test_a_subclass_with_args_and_kwargs_gets_every_base_argument():
    parser = ArgumentParser()
    parser.add_class_arguments(WordsDataModule, "data")
    actions = {a.dest: a for a in parser._actions}
    for name in BASE_ARGUMENTS + ["lowercase"]:
        assert f"data.{name}" in actions, name
    assert actions["data.lowercase"].help.startswith("fold the texts")
    cfg = parser.parse_args(["--data.train_path", "a.jsonl", "--data.seq_len", "8", "--data.batch_size", "2",
                             "--data.lowercase", "true", "--data.packing", "false"])
    assert cfg.data.lowercase is True and cfg.data.packing is False and cfg.data.num_workers == 1


# ---------------------------------------------------------------------------------------------- DPO and packing
def test_dpo_refuses_packing(tok_dir, capsys):
    for name in ("packing", "cross_document_attention"):
        with pytest.raises(ValueError, match=f"DPODataModule takes no {name}: a pair is padded"):
            DPODataModule("dpo.jsonl", tokenizer=tok_dir, **{name: True})
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(REPO / "configs/demo/dpo.yaml"), "--data.packing", "true", "--print_config"])
    assert done.value.code != 0 and "Option 'packing' is not accepted" in capsys.readouterr().err


def test_checkpoints_keep_the_same_hyper_parameters(tok_dir):
    sft = SFTDataModule("sft.jsonl", seq_len=8, batch_size=2, tokenizer=tok_dir, system_prompt_ratio=0.5)
    assert list(sft.hparams) == BASE_ARGUMENTS + ["system_prompt_ratio", "empty_think_drop_ratio"]
    assert sft.hparams["system_prompt_ratio"] == 0.5 and sft.hparams["empty_think_drop_ratio"] == 0.8
    dpo = DPODataModule("dpo.jsonl", tokenizer=tok_dir)
    assert list(dpo.hparams) == BASE_ARGUMENTS + ["overlong"]
    assert (dpo.hparams["seq_len"], dpo.hparams["batch_size"], dpo.hparams["packing"]) == (1024, 4, False)
