"""Resumable, deterministic training loader: state_dict / load_state_dict continue with the next batch."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from lightning.pytorch.utilities.combined_loader import _shutdown_workers_and_reset_iterator

from minimind_pl.data import PretrainDataModule, ResumableSampler
from minimind_pl.data.loader import make_train_loader
from minimind_pl.data.packing import collate
from minimind_pl.errors import UserError


class RowDataset(torch.utils.data.Dataset):
    """Row i is a sample whose input_ids all equal i (so batches show which rows they hold)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": np.full(4, i, np.int64), "labels": np.full(4, i, np.int64), "real_tokens": 4}


def _rows(batch) -> list:
    return batch["input_ids"][:, 0].tolist()


def _loader(n=50, batch_size=4, seed=42, workers=0, replicas=1, rank=0):
    return make_train_loader(RowDataset(n), batch_size, seed, workers, collate, num_replicas=replicas, rank=rank)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_with_next_batch(workers):
    full = _loader(workers=workers)
    full.sampler.set_epoch(3)
    order = [_rows(b) for b in full]
    assert len(order) == len(full) == 13
    for k in (0, 5, 12):
        run = _loader(workers=workers)
        run.sampler.set_epoch(3)
        it = iter(run)
        for _ in range(k):
            next(it)
        state = run.state_dict()
        assert state["epoch"] == 3 and state["batches_done"] == k
        resumed = _loader(workers=workers)
        resumed.load_state_dict(state)
        rest = [_rows(b) for b in resumed]
        assert rest == order[k:]
        assert resumed.state_dict()["batches_done"] == 13
        del it


def test_resume_after_a_finished_epoch_starts_the_next():
    run = _loader()
    run.sampler.set_epoch(1)
    list(run)
    state = run.state_dict()
    assert state["batches_done"] == len(run)
    resumed = _loader()
    resumed.load_state_dict(state)
    nxt = _loader()
    nxt.sampler.set_epoch(2)
    assert [_rows(b) for b in resumed] == [_rows(b) for b in nxt]


def test_order_is_deterministic_and_reshuffled_per_epoch():
    def epoch_rows(seed, epoch):
        dl = _loader(seed=seed)
        dl.sampler.set_epoch(epoch)
        return [r for b in dl for r in _rows(b)]

    e0 = epoch_rows(42, 0)
    assert e0 == epoch_rows(42, 0)
    assert e0 != epoch_rows(42, 1) and e0 != epoch_rows(7, 0)
    assert sorted(set(e0)) == list(range(50)) and len(e0) == 52  # padded to whole batches by wrapping


def test_ranks_split_each_global_batch():
    per_rank = []
    for rank in range(3):
        dl = _loader(n=50, batch_size=4, replicas=3, rank=rank)
        dl.sampler.set_epoch(5)
        per_rank.append([_rows(b) for b in dl])
    assert len({len(r) for r in per_rank}) == 1  # same number of batches on every rank
    order = ResumableSampler(50, 4, seed=42, num_replicas=3).global_order(5)
    for step in range(len(per_rank[0])):
        global_batch = [row for rank in range(3) for row in per_rank[rank][step]]
        assert global_batch == order[step * 12:(step + 1) * 12].tolist()
    seen = {row for r in per_rank for b in r for row in b}
    assert seen == set(range(50))


def test_changed_batch_layout_resumes_by_rows_consumed():
    run = _loader(batch_size=4)
    it = iter(run)
    for _ in range(6):
        next(it)
    resumed = _loader(batch_size=8)
    with pytest.warns(UserWarning, match="another batch layout"):
        resumed.load_state_dict(run.state_dict())
    first = _rows(next(iter(resumed)))
    order = ResumableSampler(50, 8, seed=42).global_order(0)
    assert first == order[24:32].tolist()


def test_datamodule_loader_resumes_on_real_data(corpus, tok_dir, tmp_path):
    def dm():
        m = PretrainDataModule(str(corpus / "pretrain_real_val.jsonl"), seq_len=64, batch_size=4, tokenizer=tok_dir,
                               cache_dir=str(tmp_path), num_workers=1)
        m.setup("fit")
        return m

    loaders = [dm().train_dataloader() for _ in range(3)]
    try:
        full = [b["input_ids"] for b in loaders[0]]
        run = loaders[1]
        it = iter(run)
        for _ in range(3):
            next(it)
        state = run.state_dict()
        del it
        resumed = loaders[2]
        resumed.load_state_dict(state)
        assert torch.equal(next(iter(resumed))["input_ids"], full[3])
    finally:
        shut_down_workers(*loaders)


def shut_down_workers(*loaders) -> None:
    """Stop the persistent workers of loaders as Lightning does at the end of fit.

    A data module's loader sits in a reference cycle, so only the garbage collector frees it, later, in
    another test; its worker then misses the stop signal and stalls that test for 5 s per loader.
    """
    for loader in loaders:
        _shutdown_workers_and_reset_iterator(loader)


def test_val_fraction_split(corpus, tok_dir, tmp_path):
    dm = PretrainDataModule(str(corpus / "pretrain_real_val.jsonl"), seq_len=64, batch_size=4, tokenizer=tok_dir,
                            cache_dir=str(tmp_path), num_workers=0, val_fraction=0.1)
    dm.setup("fit")
    tr, va = dm.stats["train"], dm.stats["val"]
    assert tr["documents"] + va["documents"] == 151 and 5 <= va["documents"] <= 30
    assert tr["tokens"] + va["tokens"] == dm.caches[str(corpus / "pretrain_real_val.jsonl")].n_tokens
    vb = next(iter(dm.val_dataloader()))
    assert vb["input_ids"].shape == (4, 64)
    train_docs = {tuple(dm.train_dataset.stream.doc(i)[0]) for i in range(tr["documents"])}
    val_docs = {tuple(dm.val_dataset.stream.doc(i)[0]) for i in range(va["documents"])}
    assert not train_docs & val_docs
    with pytest.raises(UserError, match="either --data.val_path or --data.val_fraction, not both"):
        PretrainDataModule("x.jsonl", seq_len=8, batch_size=1, tokenizer=tok_dir, val_path="y.jsonl", val_fraction=0.1)
