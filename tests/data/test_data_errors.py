"""What a user gets for bad data files and folders: one clear message (file, argument, fix), never a traceback;
and a read-only data folder, whose token caches go to the user's cache folder."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from helpers import read_only_mount, run_python, without_root_override
from minimind_pl.data import DataFormatError, PretrainDataModule
from minimind_pl.errors import UserError

TEXTS = [{"text": f"document {i}: 床前明月光，疑是地上霜。"} for i in range(6)]


def _setup(path, tok_dir, tmp_path, **kwargs) -> PretrainDataModule:
    args = dict(seq_len=16, batch_size=2, tokenizer=tok_dir, num_workers=0, num_proc=1)
    if "cache_dir" not in kwargs:
        args["cache_dir"] = str(tmp_path / "cache")
    dm = PretrainDataModule(str(path), **{**args, **kwargs})
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_missing_file_names_the_argument(tmp_path, tok_dir, write_jsonl):
    train = write_jsonl(tmp_path / "train.jsonl", TEXTS)
    with pytest.raises(UserError, match=rf"not found: {tmp_path}/nope.jsonl \(from --data.train_path\); check"):
        _setup(tmp_path / "nope.jsonl", tok_dir, tmp_path)
    with pytest.raises(UserError, match=r"not found: .*val.jsonl \(from --data.val_path\)"):
        _setup(train, tok_dir, tmp_path, val_path=str(tmp_path / "val.jsonl"))


def test_a_directory_is_not_a_data_file(tmp_path, tok_dir, write_jsonl):
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", TEXTS)
    with pytest.raises(UserError) as err:
        _setup(folder, tok_dir, tmp_path)
    assert str(err.value) == (f"{folder} (from --data.train_path) is a directory, but a .jsonl file is expected; "
                              f"name a file inside it such as {folder / 'train.jsonl'}")


def test_an_unreadable_file_for_real(tmp_path, tok_dir, write_jsonl):
    data = write_jsonl(tmp_path / "p.jsonl", TEXTS)
    data.chmod(0)
    code = ("import sys; from minimind_pl.data import PretrainDataModule\n"
            "PretrainDataModule(sys.argv[1], seq_len=16, batch_size=2, tokenizer=sys.argv[2]).prepare_data()")
    try:
        result = run_python(["-c", code, str(data), tok_dir], prefix=without_root_override())
    finally:
        data.chmod(0o644)
    assert (f"UserError: cannot read {data} (from --data.train_path): permission denied; make it readable "
            f"(chmod a+r {data})") in result.stderr


@pytest.mark.parametrize("content, why", [(b"", "the file is empty"), (b"\n  \n\n", "it has only blank lines")])
def test_a_file_without_documents(tmp_path, tok_dir, write_jsonl, content, why):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(content)
    with pytest.raises(UserError, match=rf"empty.jsonl \(from --data.train_path\) holds no documents \({why}\)"):
        _setup(empty, tok_dir, tmp_path)
    train = write_jsonl(tmp_path / "train.jsonl", TEXTS)
    with pytest.raises(UserError, match=rf"empty.jsonl \(from --data.val_path\) holds no documents \({why}\)"):
        _setup(train, tok_dir, tmp_path, val_path=str(empty))


def test_a_file_of_only_bad_lines_is_no_data_even_when_skipping(tmp_path, tok_dir, write_jsonl):
    bad = write_jsonl(tmp_path / "bad.jsonl", [b"{oops", {"text": " "}])
    with pytest.raises(UserError, match=r"holds no valid documents: none of its 2 non-blank lines is valid \(first: "
                                        r"line 1: not valid JSON"):
        _setup(bad, tok_dir, tmp_path, skip_invalid=True)


def test_bad_line_says_how_to_skip_on_the_command_line(tmp_path, tok_dir, write_jsonl):
    data = write_jsonl(tmp_path / "p.jsonl", [*TEXTS[:2], b"{oops", *TEXTS[2:]])
    with pytest.raises(DataFormatError) as err:
        _setup(data, tok_dir, tmp_path)
    assert f"{data}, line 3: not valid JSON" in str(err.value)
    assert "--data.skip_invalid true" in str(err.value) and "skip_invalid=True" in str(err.value)
    _setup(data, tok_dir, tmp_path, skip_invalid=True)
    with pytest.raises(DataFormatError) as err:  # the cache that skipped the line is refused without the flag
        _setup(data, tok_dir, tmp_path)
    assert "line 3" in str(err.value) and "--data.skip_invalid true" in str(err.value)


def test_fit_reports_a_bad_line_without_a_traceback(tmp_path, shared_dir, write_jsonl):
    data = write_jsonl(tmp_path / "p.jsonl", [*TEXTS[:2], b'{"text": "cut', *TEXTS[2:]])
    result = run_python([
        "main.py", "fit", "--config", "configs/demo/pretrain.yaml", "--model.config.vocab_size", "6400",
        "--data.train_path", str(data), "--data.val_path", "null", "--data.tokenizer", str(shared_dir / "minimind"),
        "--data.cache_dir", str(tmp_path / "cache"), "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
        "--trainer.callbacks", json.dumps([{"init_args": {"dirpath": str(tmp_path / "ckpt")}}])])
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"error: {data}, line 3: not valid JSON" in result.stderr
    assert "--data.skip_invalid true" in result.stderr


# ---------------------------------------------------------------------- read-only folders
def _fail_writes_under(monkeypatch, folder: Path) -> None:
    """Creating a file under ``folder`` fails as on a read-only mount (EROFS); everything else works."""
    real_open = os.open

    def read_only_open(path, flags, *args, **kwargs):
        if Path(path).resolve().is_relative_to(folder.resolve()) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_open)


def test_read_only_data_folder_caches_in_the_user_cache(tmp_path, tok_dir, write_jsonl, monkeypatch, capsys):
    for name in ("ro", "other"):
        (tmp_path / name).mkdir()
    data = write_jsonl(tmp_path / "ro" / "p.jsonl", TEXTS)
    twin = write_jsonl(tmp_path / "other" / "p.jsonl", TEXTS[:3])  # the same name in another folder
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    _fail_writes_under(monkeypatch, tmp_path / "ro")
    dm = _setup(data, tok_dir, tmp_path, cache_dir=None)
    user_caches = tmp_path / "xdg" / "minimind_pl" / "tokens"
    cache = dm.caches[str(data)].path
    assert cache.parent == user_caches and cache.name.startswith("p.jsonl.")
    assert f"{tmp_path / 'ro'} is not writable; the token cache of p.jsonl goes to {cache}" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "ro").iterdir()) == ["p.jsonl"]
    again = _setup(data, tok_dir, tmp_path, cache_dir=None)  # found again, not rebuilt
    assert again.caches[str(data)].path == cache and "using the token cache" in capsys.readouterr().out
    _fail_writes_under(monkeypatch, tmp_path / "other")
    twin_cache = _setup(twin, tok_dir, tmp_path, cache_dir=None).caches[str(twin)]
    assert twin_cache.path.parent == user_caches and twin_cache.path != cache and twin_cache.n_docs == 3


def test_unwritable_cache_dir_is_a_user_error(tmp_path, tok_dir, write_jsonl, monkeypatch):
    data = write_jsonl(tmp_path / "p.jsonl", TEXTS)
    _fail_writes_under(monkeypatch, tmp_path / "locked")
    with pytest.raises(UserError, match=rf"cache_dir {tmp_path / 'locked'} is not writable.*--data.cache_dir PATH"):
        _setup(data, tok_dir, tmp_path, cache_dir=str(tmp_path / "locked"))


# Run in a restricted process: a ready cache is read in place, a missing one goes to the user cache, and an
# explicit cache_dir in the restricted folder is refused.
RESTRICTED_RUN = """
import json, sys
from minimind_pl.data import PretrainDataModule
from minimind_pl.errors import UserError
tokenizer, ready, fresh, cache_dir = sys.argv[1:]
def cache_of(path, **kwargs):
    dm = PretrainDataModule(path, seq_len=16, batch_size=2, tokenizer=tokenizer, num_workers=0, num_proc=1, **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return str(dm.caches[path].path)
result = {"ready": cache_of(ready), "fresh": cache_of(fresh)}
try:
    cache_of(fresh, cache_dir=cache_dir)
except UserError as err:
    result["cache_dir_error"] = str(err)
print(json.dumps(result))
"""


@pytest.mark.parametrize("restriction", ["read-only mount", "no write permission"])
def test_restricted_data_folder_for_real(restriction, tmp_path, tok_dir, write_jsonl):
    folder = tmp_path / "data"
    (folder / "caches").mkdir(parents=True)
    ready = write_jsonl(folder / "ready.jsonl", TEXTS)
    fresh = write_jsonl(folder / "fresh.jsonl", TEXTS[:4])
    built = _setup(ready, tok_dir, tmp_path, cache_dir=None).caches[str(ready)].path  # beside the data
    before = sorted(p.name for p in folder.iterdir())
    if restriction == "read-only mount":
        prefix = read_only_mount(folder)
    else:
        prefix = without_root_override()
        for path in (folder, folder / "caches"):
            path.chmod(0o555)
    try:
        result = run_python(["-c", RESTRICTED_RUN, tok_dir, str(ready), str(fresh), str(folder / "caches")],
                            prefix=prefix, env={"XDG_CACHE_HOME": str(tmp_path / "xdg")})
    finally:
        for path in (folder, folder / "caches"):
            path.chmod(0o755)
    assert result.returncode == 0, result.stderr
    paths = json.loads(result.stdout.splitlines()[-1])
    assert paths["ready"] == str(built)
    assert Path(paths["fresh"]).parent == tmp_path / "xdg" / "minimind_pl" / "tokens"
    assert f"{folder} is not writable; the token cache of fresh.jsonl goes to {paths['fresh']}" in result.stdout
    assert paths["cache_dir_error"].startswith(f"cache_dir {folder / 'caches'} is not writable")
    assert sorted(p.name for p in folder.iterdir()) == before
