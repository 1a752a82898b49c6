"""``data stats``, ``data split`` and ``data mix``: exact counts on tiny files, seeded and never touching the input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from minimind_pl.cli import dispatch
from minimind_pl.commands.data import gather_lists
from minimind_pl.commands.data.stats import padding_shares
from minimind_pl.data.formats import resolve_format
from minimind_pl.errors import UserError


def write_texts(path, texts) -> None:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")


def test_stats_counts_documents_bad_lines_duplicates_languages_and_tokens(tmp_path, tokenizer_dir, monkeypatch):
    source = tmp_path / "p.jsonl"
    write_texts(source, ["你好世界", "hello", "hello", "ab 12"])
    with open(source, "ab") as handle:
        handle.write(b'\n{"text": \n{"text": ""}\n')
    import dataclasses

    import minimind_pl.commands.data.stats as stats_module

    def without_check(path, name):  # with a tokenizer, the encoder alone validates
        return dataclasses.replace(resolve_format(path, name), check=None)

    monkeypatch.setattr(stats_module, "resolve_format", without_check)
    stats = dispatch(["data", "stats", str(source), "--tokenizer", str(tokenizer_dir), "--seq_len", "4",
                      "--plot", str(tmp_path / "lengths.png"), "--progress", "false"])[0]
    assert (stats["lines"], stats["documents"], stats["blank_lines"], stats["invalid_lines"],
            stats["exact_duplicates"]) == (7, 4, 1, 2, 1)
    assert stats["refused_by_encoder"] == 1 and stats["first_invalid"].startswith("line 6: not valid JSON")
    assert stats["characters"] == 4 + 5 + 5 + 5 and stats["chars_max"] == 5
    assert (stats["share_zh"], stats["share_en"], stats["share_other"]) == (round(4 / 16, 4), round(12 / 16, 4), 0.0)
    from minimind_pl.tokenizer import Tokenizer
    tokenizer = Tokenizer.from_file(tokenizer_dir)
    lengths = [len(tokenizer.encode(t)) + 2 for t in ["你好世界", "hello", "hello", "ab 12"]]  # bos + text + eos
    assert stats["tokens"] == sum(lengths)
    assert stats["real_share_padded"] == padding_shares(np.array(lengths), 4)["real_share_padded"]
    assert (tmp_path / "lengths.png").stat().st_size > 0


def test_stats_counts_records_the_encoder_refuses_as_invalid(tmp_path, tokenizer_dir):
    source = tmp_path / "rl.jsonl"
    prompts = [{"prompt": "tell me"}, {"prompt": "  "}, {"conversations": [{"role": "user", "content": "hi"},
                                                                          {"role": "assistant", "content": ""}]}]
    source.write_text("".join(json.dumps(p) + "\n" for p in prompts), encoding="utf-8")
    with_tokens = dispatch(["data", "stats", str(source), "--tokenizer", str(tokenizer_dir), "--progress", "false"])[0]
    without = dispatch(["data", "stats", str(source), "--progress", "false"])[0]
    for stats in (with_tokens, without):
        assert (stats["format"], stats["documents"], stats["invalid_lines"]) == ("rl", 2, 1)
        assert stats["first_invalid"].startswith("line 2: ")
    assert with_tokens["refused_by_encoder"] == 1 and "refused_by_encoder" not in without
    assert with_tokens["tokens"] > 0 and "tokens" not in without


def test_padding_shares_of_known_lengths():
    shares = padding_shares(np.array([2, 4, 6]), 4)  # padded: (2 + 4 + 4) / 12; packed: 12 tokens in 3 full rows
    assert shares == {"seq_len": 4, "real_share_padded": round(10 / 12, 4), "real_share_packed": 1.0,
                      "docs_cut_at_seq_len": 1}


def test_split_by_documents_is_seeded_and_complete(tmp_path):
    source = tmp_path / "d.jsonl"
    write_texts(source, [f"doc {i}" for i in range(20)])
    before = source.read_bytes()
    counts = dispatch(["data", "split", str(source), "--val_docs", "5", "--seed", "3"])
    train, val = (tmp_path / "d_train.jsonl").read_text().splitlines(), (tmp_path / "d_val.jsonl").read_text().splitlines()
    assert counts == {"train": 15, "val": 5} and len(val) == 5
    assert sorted(train + val) == sorted(before.decode().splitlines()) and source.read_bytes() == before
    assert train == [line for line in before.decode().splitlines() if line not in val]  # input order kept
    dispatch(["data", "split", str(source), "--val_docs", "5", "--seed", "3", "--val_output", str(tmp_path / "v.jsonl"),
              "--train_output", str(tmp_path / "t.jsonl")])
    assert (tmp_path / "v.jsonl").read_text().splitlines() == val
    with pytest.raises(UserError, match="cannot hold out 20"):
        dispatch(["data", "split", str(source), "--val_docs", "20"])


def test_mix_by_weights_is_seeded(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_texts(a, [f"a{i}" for i in range(10)])
    write_texts(b, [f"b{i}" for i in range(3)])
    out = tmp_path / "m.jsonl"
    counts = dispatch(["data", "mix", "--inputs", str(a), str(b), "--weights", "0.5", "2", "--output", str(out)])
    assert counts == {str(a): 5, str(b): 6}
    lines = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert sorted(t for t in lines if t.startswith("b")) == ["b0", "b0", "b1", "b1", "b2", "b2"]
    a_lines = [t for t in lines if t.startswith("a")]
    assert len(set(a_lines)) == 5 and a_lines == sorted(a_lines, key=lambda t: int(t[1:]))
    first = out.read_bytes()
    dispatch(["data", "mix", "--inputs", str(a), str(b), "--weights", "0.5", "2", "--output", str(out)])
    assert out.read_bytes() == first
    with pytest.raises(UserError, match="never modify their input"):
        dispatch(["data", "mix", "--inputs", str(a), "--output", str(a)])


def test_list_arguments_are_gathered_for_jsonargparse():
    assert gather_lists(["x.jsonl", "y.jsonl", "--seq_len", "4"], ("",)) == ['["x.jsonl", "y.jsonl"]', "--seq_len", "4"]
    assert gather_lists(["--inputs", "a", "b", "--weights", "[1, 2]"], ("--inputs", "--weights")) == [
        "--inputs", '["a", "b"]', "--weights", "[1, 2]"]
