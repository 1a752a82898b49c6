"""Packing: full rows, correct doc_ids / position_ids / labels, long documents continued, padded mode."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from minimind_pl.data import PretrainDataModule
from minimind_pl.data.packing import IGNORE_INDEX, DocumentStream, PackedDataset, PaddedDataset, collate


@pytest.fixture(scope="module")
def pretrain_cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("pretrain_cache"))


def _dm(corpus, tok_dir, cache_dir, **kw):
    args = dict(seq_len=256, batch_size=8, tokenizer=tok_dir, cache_dir=cache_dir, num_workers=0)
    args.update(kw)
    dm = PretrainDataModule(str(corpus / "pretrain_real.jsonl"), **args)
    dm.setup("fit")
    return dm


def _check_rows(dataset, cache, seq_len):
    """Every row: doc_ids/positions consistent; stream reconstructs; each non-BOS token is a label once."""
    stream, n_labels = [], 0
    for r in range(len(dataset)):
        s = dataset[r]
        ids, labels, doc, pos = s["input_ids"], s["labels"], s["doc_ids"], s["position_ids"]
        assert ids.shape == labels.shape == doc.shape == pos.shape == (seq_len,)
        assert doc[0] == 0 and np.all(np.diff(doc) >= 0) and np.all(np.diff(doc) <= 1)
        starts = np.flatnonzero(np.r_[True, np.diff(doc) != 0])
        for a, b in zip(starts, list(starts[1:]) + [seq_len]):
            assert np.array_equal(pos[a:b], np.arange(b - a)), "positions restart at 0 in every document"
        # a label is -100 exactly where the next token starts another document (or is padding)
        boundary = np.r_[np.diff(doc) != 0, False]
        assert np.all(labels[boundary] == IGNORE_INDEX)
        # next-token labels inside a row
        inside = ~boundary[:-1] & (labels[:-1] != IGNORE_INDEX)
        assert np.array_equal(labels[:-1][inside], ids[1:][inside])
        real = s["real_tokens"]
        stream.append(ids[:real])
        n_labels += int((labels != IGNORE_INDEX).sum())
    stream = np.concatenate(stream)
    assert np.array_equal(stream, np.asarray(cache.tokens, dtype=np.int64)), "rows tile the token stream"
    return n_labels


def test_packing_fills_rows(corpus, tok_dir, pretrain_cache_dir):
    dm = _dm(corpus, tok_dir, pretrain_cache_dir)
    stats = dm.stats["train"]
    assert stats["real_token_fraction"] >= 0.99
    loader = dm.train_dataloader()
    real = total = 0
    for batch in loader:
        real += int(batch["real_tokens"])
        total += batch["input_ids"].numel()
    assert real / total >= 0.99
    # every token is an input exactly once per pass over the rows
    assert sum(dm.train_dataset[i]["real_tokens"] for i in range(len(dm.train_dataset))) == stats["tokens"]


def test_packed_rows_are_consistent(corpus, tok_dir, pretrain_cache_dir):
    dm = _dm(corpus, tok_dir, pretrain_cache_dir, seq_len=64)
    cache = dm.caches[str(corpus / "pretrain_real.jsonl")]
    n_labels = _check_rows(dm.train_dataset, cache, 64)
    # every token except each document's first (its BOS) is predicted exactly once
    assert n_labels == cache.n_tokens - cache.n_docs
    bos = dm.tokenizer.bos_id
    s = dm.train_dataset[3]
    first_of_doc = np.flatnonzero(np.r_[False, np.diff(s["doc_ids"]) != 0])
    assert np.all(s["input_ids"][first_of_doc] == bos)


def test_long_document_continues_in_next_row(corpus, tok_dir, pretrain_cache_dir):
    dm = _dm(corpus, tok_dir, pretrain_cache_dir, seq_len=16)
    cache = dm.caches[str(corpus / "pretrain_real.jsonl")]
    doc0, _ = cache.doc(0)
    assert doc0.size > 40
    rows = [dm.train_dataset[i] for i in range(3)]
    # the first document fills rows 0..2 entirely, positions restart at each row
    joined = np.concatenate([r["input_ids"] for r in rows])
    assert np.array_equal(joined, doc0[:48])
    for r in rows:
        assert np.all(r["doc_ids"] == 0)
        assert np.array_equal(r["position_ids"], np.arange(16))
        # the last token of a row predicts the first token of the next row (same document)
        assert np.all(r["labels"] != IGNORE_INDEX)
    assert rows[0]["labels"][-1] == rows[1]["input_ids"][0]


def test_cross_document_attention_and_collate(corpus, tok_dir, pretrain_cache_dir):
    dm = _dm(corpus, tok_dir, pretrain_cache_dir, seq_len=32, cross_document_attention=True)
    s = dm.train_dataset[0]
    assert set(s) == {"input_ids", "labels", "real_tokens"}
    dm2 = _dm(corpus, tok_dir, pretrain_cache_dir, seq_len=32)
    s2 = dm2.train_dataset[0]
    assert np.array_equal(s["labels"], s2["labels"]) and np.array_equal(s["input_ids"], s2["input_ids"])
    batch = collate([dm2.train_dataset[i] for i in range(4)])
    assert set(batch) == {"input_ids", "labels", "doc_ids", "position_ids", "real_tokens"}
    for k in ("input_ids", "labels", "doc_ids", "position_ids"):
        assert batch[k].dtype == torch.long and batch[k].shape == (4, 32)
    assert batch["real_tokens"].dim() == 0 and batch["real_tokens"].dtype == torch.long
    assert int(batch["real_tokens"]) == 4 * 32


def test_last_row_is_padded(tmp_path, tok_dir, write_jsonl):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "hello world"}, {"text": "a second document here"}])
    dm = PretrainDataModule(str(path), seq_len=8, batch_size=2, tokenizer=tok_dir, cache_dir=str(tmp_path),
                            num_workers=0)
    dm.setup("fit")
    n = dm.stats["train"]["tokens"]
    last = dm.train_dataset[len(dm.train_dataset) - 1]
    real = last["real_tokens"]
    assert real == n - 8 * (len(dm.train_dataset) - 1)
    assert np.all(last["input_ids"][real:] == dm.tokenizer.pad_id)
    assert np.all(last["labels"][real - 1:] == IGNORE_INDEX)
    assert np.all(last["doc_ids"][real:] == last["doc_ids"][real - 1] + 1)


def test_padded_mode_matches_minimind(tmp_path, tok_dir, write_jsonl):
    long_text = "春眠不觉晓，处处闻啼鸟。" * 20
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "short one"}, {"text": long_text}])
    dm = PretrainDataModule(str(path), seq_len=16, batch_size=2, tokenizer=tok_dir, cache_dir=str(tmp_path),
                            num_workers=0, packing=False)
    dm.setup("fit")
    tok = dm.tokenizer
    assert len(dm.train_dataset) == 2
    short = dm.train_dataset[0]
    ids = [tok.bos_id] + tok.encode("short one") + [tok.eos_id]
    assert set(short) == {"input_ids", "labels", "real_tokens"}
    assert short["real_tokens"] == len(ids)
    assert list(short["input_ids"][: len(ids)]) == ids
    assert np.all(short["input_ids"][len(ids):] == tok.pad_id)
    assert list(short["labels"][: len(ids) - 1]) == ids[1:]
    assert np.all(short["labels"][len(ids) - 1:] == IGNORE_INDEX)
    long = dm.train_dataset[1]
    full = [tok.bos_id] + tok.encode(long_text)
    # truncated: bos + text[:seq_len - 1] + eos (as MiniMind keeps eos after truncating)
    assert list(long["input_ids"]) == full[:16]
    assert list(long["labels"]) == full[1:16] + [tok.eos_id]
    assert long["real_tokens"] == 16


def _cache(docs, masked=None):
    """A stand-in for a TokenCache (what DocumentStream reads: tokens, mask, offsets, counts) of ``docs``; the
    tokens in ``masked`` are the targets (no mask at all when None, as for pretraining)."""
    tokens = np.array([t for d in docs for t in d], np.uint16)
    mask = None if masked is None else np.array([1 if t in masked else 0 for t in tokens.tolist()], np.uint8)
    offsets = np.cumsum([0] + [len(d) for d in docs]).astype(np.int64)
    return SimpleNamespace(tokens=tokens, mask=mask, offsets=offsets, n_tokens=tokens.size, n_docs=len(docs))


def test_a_selection_of_documents_reads_as_one_stream_in_the_selected_order():
    masked = {5, 9, 12, 2}
    a = _cache([[1, 2, 3], [4], [], [5, 6, 7, 8]], masked)
    b = _cache([[9, 10], [11, 12, 13]], masked)
    stream = DocumentStream([a, b], [np.array([3, 0, 2]), None])  # a's documents 3, 0 and the empty 2; all of b
    docs = [[5, 6, 7, 8], [1, 2, 3], [], [9, 10], [11, 12, 13]]
    flat = [t for d in docs for t in d]
    assert (stream.n_tokens, stream.n_docs) == (12, 5)
    for i, expected in enumerate(docs):
        tokens, mask = stream.doc(i)
        assert tokens.tolist() == expected and mask.tolist() == [int(t in masked) for t in expected]
    assert stream.first_token_masks().tolist() == [1, 0, 0, 1, 0]  # 5, 1, (empty), 9, 11
    spans = [(sum(map(len, docs[:i])), sum(map(len, docs[:i + 1]))) for i in range(len(docs))]
    for start in range(13):
        for end in range(start, 13):  # start == end: an empty window
            tokens, mask, segments = stream.window(start, end)
            assert tokens.tolist() == flat[start:end] and mask.tolist() == [int(t in masked) for t in flat[start:end]]
            pieces = [min(e, end) - max(s, start) for s, e in spans if min(e, end) > max(s, start)]
            assert segments.tolist() == pieces, (start, end)
    with pytest.raises(ValueError, match="^one selection per cache$"):
        DocumentStream([a, b], [None])


def test_packed_rows_of_a_selection_by_hand():
    masked = {5, 9, 12, 2}
    stream = DocumentStream([_cache([[1, 2, 3], [4], [], [5, 6, 7, 8]], masked),
                             _cache([[9, 10], [11, 12, 13]], masked)], [np.array([3, 0, 2]), None])
    rows = PackedDataset(stream, seq_len=4, pad_id=0)
    assert len(rows) == 3  # 12 tokens, 11 predictions, 4 a row
    # row 1 reads stream tokens 4..8: 1 2 3 | 9 10; a label needs the same document and the target's mask bit
    row = rows[1]
    assert row["input_ids"].tolist() == [1, 2, 3, 9] and row["real_tokens"] == 4
    assert row["doc_ids"].tolist() == [0, 0, 0, 1] and row["position_ids"].tolist() == [0, 1, 2, 0]
    assert row["labels"].tolist() == [2, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]  # 3 unmasked; 9 another doc
    last = rows[2]  # tokens 8..11: 10 | 11 12 13, then padding
    assert last["input_ids"].tolist() == [10, 11, 12, 13] and last["real_tokens"] == 4
    assert last["labels"].tolist() == [IGNORE_INDEX, 12, IGNORE_INDEX, IGNORE_INDEX]
    assert last["doc_ids"].tolist() == [0, 1, 1, 1] and last["position_ids"].tolist() == [0, 0, 1, 2]
    with pytest.raises(IndexError, match="^3$"):
        rows[3]
    (whole,) = PackedDataset(stream, seq_len=13, pad_id=0)  # 12 tokens and one padding position in the row
    assert whole["real_tokens"] == 12 and whole["input_ids"].tolist() == [5, 6, 7, 8, 1, 2, 3, 9, 10, 11, 12, 13, 0]
    assert whole["doc_ids"].tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 4]  # the padding: a document of its own
    assert whole["position_ids"].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 0, 1, 2, 0]


def test_stream_sizes_and_first_token_flags():
    masked = {5, 2}
    a = _cache([[1, 2, 3], [4], [], [5, 6, 7, 8]], masked)
    picked = DocumentStream([a], [np.array([0, 3])])
    assert (picked.n_tokens, picked.n_docs) == (7, 2)
    flags = DocumentStream([_cache([[5], [2, 1], [], [4, 5]], masked)]).first_token_masks()
    assert flags.tolist() == [1, 1, 0, 0] and flags.dtype == np.uint8  # DPO reads flag bits from it
    with pytest.raises(ValueError, match="^these caches carry no mask$"):
        DocumentStream([_cache([[1, 2]])]).first_token_masks()
    three = DocumentStream([_cache([[1, 2]]), _cache([[3], [4]]), _cache([[5, 6, 7]])])
    tokens, mask, segments = three.window(1, 6)
    assert tokens.tolist() == [2, 3, 4, 5, 6] and mask is None and segments.tolist() == [1, 1, 1, 2]


@pytest.mark.parametrize("n_tokens, seq_len, rows", [(0, 1, 0), (1, 4, 0), (2, 4, 1), (5, 1, 4), (6, 2, 3)])
def test_packed_row_count(n_tokens, seq_len, rows):
    """A row reads seq_len + 1 tokens and the next row starts seq_len later: ceil((n - 1) / seq_len) rows."""
    stream = DocumentStream([_cache([list(range(1, n_tokens + 1))])])
    assert len(PackedDataset(stream, seq_len=seq_len, pad_id=0)) == rows


@pytest.mark.parametrize("dataset", [PackedDataset, PaddedDataset])
def test_rows_need_a_token(dataset):
    with pytest.raises(ValueError, match="^seq_len must be >= 1, got 0$"):
        dataset(DocumentStream([_cache([[1, 2]])]), seq_len=0, pad_id=0)


def test_padded_rows_by_hand():
    masked = {2, 4, 5, 10}
    stream = DocumentStream([_cache([[1, 2, 3], [1, 2, 3, 4], [1, 2, 3, 4, 5], [9, 10]], masked)])
    rows = PaddedDataset(stream, seq_len=3, pad_id=0)
    assert len(rows) == 4
    expected = [  # (input_ids, labels, real_tokens): a label is the next token where that token is a target
        ([1, 2, 3], [2, IGNORE_INDEX, IGNORE_INDEX], 3),
        ([1, 2, 3], [2, IGNORE_INDEX, 4], 3),  # L + 1 tokens: no cut
        ([1, 2, 3], [2, IGNORE_INDEX, 4], 3),  # L + 2 tokens: cut to L + 1
        ([9, 10, 0], [10, IGNORE_INDEX, IGNORE_INDEX], 2),
    ]
    for row, (ids, labels, real) in zip(rows, expected):
        assert (row["input_ids"].tolist(), row["labels"].tolist(), row["real_tokens"]) == (ids, labels, real)
    with pytest.raises(IndexError, match="^4$"):
        rows[4]
    plain = PaddedDataset(DocumentStream([_cache([[1, 2, 3, 4, 5, 6]])]), seq_len=3, pad_id=0, keep_eos_id=99)
    assert plain[0]["input_ids"].tolist() == [1, 2, 3] and plain[0]["labels"].tolist() == [2, 3, 99]
    assert PaddedDataset(DocumentStream([_cache([[1, 2]])]), seq_len=1, pad_id=0)[0]["labels"].tolist() == [2]


def test_a_batch_of_one_row():
    """The last batch of an epoch may hold a single row."""
    (row,) = PackedDataset(DocumentStream([_cache([[1, 2, 3]])]), seq_len=2, pad_id=0)
    batch = collate([row])
    assert batch["input_ids"].tolist() == [[1, 2]] and batch["labels"].tolist() == [[2, 3]]
    assert batch["position_ids"].tolist() == [[0, 1]] and int(batch["real_tokens"]) == 2
