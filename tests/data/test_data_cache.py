"""Token cache: built once, reused, invalidated by file / tokenizer / settings; atomic; bad input."""
from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest

import minimind_pl.data.cache as cache_mod
from minimind_pl.data import DataFormatError, PretrainDataModule, SFTDataModule
from minimind_pl.data.cache import cache_path, ensure_cache
from minimind_pl.data.pretrain import PretrainEncoder
from minimind_pl.tokenizer import Tokenizer

TEXTS = [{"text": f"document number {i}: " + "床前明月光，疑是地上霜。" * (i % 5 + 1)} for i in range(40)]
CONV = {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.fixture
def builds(monkeypatch):
    """Counts calls of build_cache (real builds), by cache directory name."""
    calls: list = []
    real = cache_mod.build_cache

    def counting(source, encoder, final, **kw):
        calls.append(Path(final).name)
        return real(source, encoder, final, **kw)

    monkeypatch.setattr(cache_mod, "build_cache", counting)
    return calls


def _dm(path, tok_dir, cache_dir, cls=PretrainDataModule, **kw):
    dm = cls(str(path), seq_len=32, batch_size=2, tokenizer=tok_dir, cache_dir=str(cache_dir), num_workers=0, **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_cache_is_reused_and_invalidated(tmp_path, tok_dir, write_jsonl, builds):
    data = write_jsonl(tmp_path / "p.jsonl", TEXTS)
    cdir = tmp_path / "cache"
    dm = _dm(data, tok_dir, cdir)
    assert len(builds) == 1
    first = dm.caches[str(data)]
    tokens_file = first.path / "tokens.bin"
    inode = tokens_file.stat().st_ino
    assert first.meta["dtype"] == "uint16" and first.n_docs == len(TEXTS)

    dm2 = _dm(data, tok_dir, cdir)  # second run: reused, nothing re-tokenized
    assert len(builds) == 1 and tokens_file.stat().st_ino == inode
    assert np.array_equal(dm2.caches[str(data)].tokens, first.tokens)

    os.utime(data, ns=(1, 10**18))  # touched, same bytes: the content hash says reuse
    _dm(data, tok_dir, cdir)
    assert len(builds) == 1

    stat = data.stat()  # changed bytes, same size and mtime: the sampled hash catches it
    raw = bytearray(data.read_bytes())
    raw[raw.index(b"number 3")] = ord(b"N")
    data.write_bytes(bytes(raw))
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    _dm(data, tok_dir, cdir)
    assert len(builds) == 2

    write_jsonl(data, TEXTS + [{"text": "one more line"}])  # changed file
    dm3 = _dm(data, tok_dir, cdir)
    assert len(builds) == 3 and dm3.caches[str(data)].n_docs == len(TEXTS) + 1
    assert len(list(cdir.glob("*.cache"))) == 1  # replaced in place
    assert not list(cdir.glob("*.tmp-*")) and not list(cdir.glob("*.old-*"))

    other_tok = tmp_path / "tok"  # another tokenizer (same vocab, other config): new cache
    shutil.copytree(tok_dir, other_tok)
    cfg = json.loads((other_tok / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = 4096
    (other_tok / "tokenizer_config.json").write_text(json.dumps(cfg))
    _dm(data, str(other_tok), cdir)
    assert len(builds) == 4

    _dm(data, tok_dir, cdir)  # back to the first tokenizer: its cache is still there
    assert len(builds) == 4


def test_settings_key_the_cache_but_seq_len_does_not(tmp_path, tok_dir, write_jsonl, builds):
    data = write_jsonl(tmp_path / "s.jsonl", [CONV] * 10)
    cdir = tmp_path / "cache"
    _dm(data, tok_dir, cdir, cls=SFTDataModule)
    SFTDataModule(str(data), seq_len=128, batch_size=3, tokenizer=tok_dir, cache_dir=str(cdir),
                  num_workers=0).setup("fit")
    assert len(builds) == 1  # seq_len / batch size / packing do not change tokens
    _dm(data, tok_dir, cdir, cls=SFTDataModule, system_prompt_ratio=0.5)
    assert len(builds) == 2
    _dm(data, tok_dir, cdir, cls=SFTDataModule, empty_think_drop_ratio=0.0)
    assert len(builds) == 3
    _dm(data, tok_dir, cdir, cls=SFTDataModule, seed=7)  # the seed drives the augmentations
    assert len(builds) == 4
    _dm(data, tok_dir, cdir, cls=SFTDataModule, seed=7, system_prompt_ratio=0.0, empty_think_drop_ratio=1.0)
    _dm(data, tok_dir, cdir, cls=SFTDataModule, seed=8, system_prompt_ratio=0.0, empty_think_drop_ratio=1.0)
    assert len(builds) == 5  # ... but not when no augmentation is random


def test_killed_build_leaves_no_cache(tmp_path, tok_dir, write_jsonl, monkeypatch):
    data = write_jsonl(tmp_path / "p.jsonl", TEXTS)
    tok = Tokenizer.from_file(tok_dir)
    enc = PretrainEncoder(tok)
    calls = {"n": 0}
    real = cache_mod.encode_block

    def dying(*args, **kw):
        calls["n"] += 1
        raise KeyboardInterrupt  # as if the run were killed mid-build

    monkeypatch.setattr(cache_mod, "encode_block", dying)
    with pytest.raises(KeyboardInterrupt):
        ensure_cache(data, enc, cache_dir=tmp_path / "c", progress=False)
    final = cache_path(data, enc.settings(), tmp_path / "c")
    assert calls["n"] == 1 and not final.exists()
    assert not [p for p in (tmp_path / "c").iterdir() if ".tmp-" in p.name]
    monkeypatch.setattr(cache_mod, "encode_block", real)
    # a stale temp folder of a dead process is cleaned up by the next build
    stale = final.parent / f"{final.name}.tmp-{socket.gethostname()}-999999999-abcdef12"  # as temporary_path names it
    stale.mkdir()
    (stale / "tokens.bin").write_bytes(b"junk")
    c = ensure_cache(data, enc, cache_dir=tmp_path / "c", progress=False)
    assert c.n_docs == len(TEXTS) and not stale.exists()


def test_parallel_build_equals_serial(tmp_path, tok_dir, write_jsonl, monkeypatch):
    data = write_jsonl(tmp_path / "p.jsonl", TEXTS * 5)
    tok = Tokenizer.from_file(tok_dir)
    serial = ensure_cache(data, PretrainEncoder(tok), cache_dir=tmp_path / "a", num_proc=1, progress=False)
    monkeypatch.setattr(cache_mod, "BLOCK_BYTES", 1000)  # many small blocks through a pool of 2
    parallel = ensure_cache(data, PretrainEncoder(tok), cache_dir=tmp_path / "b", num_proc=2, progress=False)
    assert np.array_equal(serial.tokens, parallel.tokens)
    assert np.array_equal(serial.offsets, parallel.offsets)
    assert serial.meta["source_sha256"] == parallel.meta["source_sha256"]


BAD_PRETRAIN = [
    (b'{"text": "ok"', "not valid JSON"),
    (b'{"txt": "wrong field"}', "missing 'text' field"),
    (b'{"text": "   "}', "empty document"),
    (b'{"text": 42}', "must be a string"),
    (b'{"text": "caf\xe9"}', "invalid UTF-8"),
    (b'["a", "list"]', "expected a JSON object"),
]


@pytest.mark.parametrize("bad,message", BAD_PRETRAIN)
def test_bad_pretrain_line_names_file_and_line(tmp_path, tok_dir, write_jsonl, bad, message):
    data = write_jsonl(tmp_path / "bad.jsonl", TEXTS[:3] + [b""] + [bad] + TEXTS[:2])
    dm = PretrainDataModule(str(data), seq_len=16, batch_size=2, tokenizer=tok_dir, cache_dir=str(tmp_path),
                            num_workers=0)
    with pytest.raises(DataFormatError) as err:
        dm.prepare_data()
    assert str(data) in str(err.value) and "line 5" in str(err.value) and message in str(err.value)
    assert not list(tmp_path.glob("*.cache"))


BAD_SFT = [
    ({"conversations": [{"role": "user", "content": "hi"}]}, "conversation has no assistant turn (nothing to learn)"),
    ({"conversations": []}, "empty document"),
    ({"messages": []}, "missing 'conversations' field (keys: messages)"),
    ({}, "missing 'conversations' field (keys: none)"),
    ({f"k{i}": i for i in range(9)}, "missing 'conversations' field (keys: k0, k1, k2, k3, k4, k5, k6, k7) (fix"),
    (["a", "list"], "expected a JSON object with a 'conversations' field, got list"),
    ({"conversations": "hi"}, "'conversations' must be a list of messages, got str"),
    ({"conversations": [{"role": "user", "content": "hi"}, "hello"]}, "message 1 must be an object, got str"),
    ({"conversations": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"},
                        {"role": "assistant", "content": "y"}]}, "unknown role"),
    ({"conversations": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}, "must be a string"),
]


@pytest.mark.parametrize("bad,message", BAD_SFT)
def test_bad_sft_line_names_file_and_line(tmp_path, tok_dir, write_jsonl, bad, message):
    data = write_jsonl(tmp_path / "bad.jsonl", [CONV, CONV, bad, CONV])
    dm = SFTDataModule(str(data), seq_len=16, batch_size=2, tokenizer=tok_dir, cache_dir=str(tmp_path),
                       num_workers=0)
    with pytest.raises(DataFormatError) as err:
        dm.setup("fit")
    assert str(data) in str(err.value) and "line 3" in str(err.value) and message in str(err.value)


def test_skip_invalid_counts_and_strict_refuses_the_cache(tmp_path, tok_dir, write_jsonl, capsys):
    lines = TEXTS[:5] + [b"not json", {"text": ""}, b'{"text": "\xff"}'] + TEXTS[5:8]
    data = write_jsonl(tmp_path / "mixed.jsonl", lines)
    dm = PretrainDataModule(str(data), seq_len=16, batch_size=2, tokenizer=tok_dir, cache_dir=str(tmp_path),
                            num_workers=0, skip_invalid=True)
    dm.prepare_data()
    dm.setup("fit")
    c = dm.caches[str(data)]
    assert c.n_docs == 8 and c.meta["n_skipped"] == 3 and dm.stats["skipped_lines"] == 3
    assert [e["line"] for e in c.meta["skipped_examples"]] == [6, 7, 8]
    assert "skipped 3 invalid lines" in capsys.readouterr().out
    strict = PretrainDataModule(str(data), seq_len=16, batch_size=2, tokenizer=tok_dir, cache_dir=str(tmp_path),
                                num_workers=0)
    with pytest.raises(DataFormatError, match="line 6"):
        strict.setup("fit")  # the cached skips are not silently accepted


def test_parallel_build_reports_the_right_line(tmp_path, tok_dir, write_jsonl, monkeypatch):
    lines = TEXTS * 3
    lines[77] = b'{"text": broken'
    data = write_jsonl(tmp_path / "p.jsonl", lines)
    monkeypatch.setattr(cache_mod, "BLOCK_BYTES", 700)  # line numbers must survive block boundaries
    tok = Tokenizer.from_file(tok_dir)
    with pytest.raises(DataFormatError, match=r"line 78: not valid JSON"):
        ensure_cache(data, PretrainEncoder(tok), cache_dir=tmp_path / "c", num_proc=2, progress=False)
    c = ensure_cache(data, PretrainEncoder(tok), cache_dir=tmp_path / "c", num_proc=2, progress=False,
                     skip_invalid=True)
    assert c.n_docs == len(lines) - 1 and c.meta["skipped_examples"] == [{"line": 78, "error": c.meta["skipped_examples"][0]["error"]}]
