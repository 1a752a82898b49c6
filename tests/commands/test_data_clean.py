"""``python main.py data clean``: each rule removes exactly the planted lines, the kept lines come out normalised."""

from __future__ import annotations

import json
import random
import sys

import pytest

from minimind_pl.cli import dispatch
from minimind_pl.commands.data.clean import clean_command
from minimind_pl.errors import UserError


def words(seed: int, n: int = 80) -> str:
    rng = random.Random(seed)
    return " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
                    for _ in range(n))


def write_lines(path, lines) -> None:
    path.write_bytes(b"".join((line if isinstance(line, bytes) else json.dumps(line, ensure_ascii=False).encode())
                              + b"\n" for line in lines))


def one_word_changed(text: str) -> str:
    parts = text.split(" ")
    parts[40] = "changed"
    return " ".join(parts)


def test_clean_pretrain_removes_each_planted_line_by_its_rule(tmp_path, capsys):
    a, b = words(1), words(2)
    source = tmp_path / "pretrain.jsonl"
    lines = [{"text": a}, {"text": a}, {"text": one_word_changed(a)}, b'{"text": ', b'{"text": "\xff"}',
             {"text": "   "}, {"text": "\x00\x01"}, {"text": "short"}, {"text": f"  {b}  \r\nnext\n\n\n\nend \t"},
             b"", {"conversations": [{"role": "user", "content": "hi"}]}, {"text": "Привет мир как дела сегодня"},
             {"text": "中文的句子，足够长了。" + "很好" * 5}]
    write_lines(source, lines)
    before = source.read_bytes()
    report = clean_command(str(source), output=str(tmp_path / "out.jsonl"), min_chars=10, languages=["zh", "en"],
                           progress=False)
    assert report["format"] == "pretrain" and report["lines"] == 12 and report["kept"] == 3
    assert report["removed"] == {"invalid_json": 2, "invalid_record": 2, "empty_after_cleaning": 1, "too_short": 1,
                                 "too_long": 0, "language": 1, "exact_duplicate": 1, "near_duplicate": 1}
    assert report["examples"]["invalid_json"][0].startswith(f"{source}:4: not valid JSON")
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert out == [{"text": a}, {"text": f"{b}\nnext\n\nend"}, {"text": "中文的句子，足够长了。" + "很好" * 5}]
    assert source.read_bytes() == before  # the input is never modified
    assert "near_duplicate" in capsys.readouterr().out


def test_clean_is_deterministic_and_thresholds_and_switches_work(tmp_path):
    a = words(3)
    source = tmp_path / "p.jsonl"
    write_lines(source, [{"text": a}, {"text": one_word_changed(a)}, {"text": a + " tail"}, {"text": words(4)}])
    first, second = tmp_path / "1.jsonl", tmp_path / "2.jsonl"
    clean_command(str(source), output=str(first), progress=False)
    clean_command(str(source), output=str(second), progress=False, num_proc=2)
    assert first.read_bytes() == second.read_bytes() and len(first.read_text().splitlines()) == 2
    strict = clean_command(str(source), output=str(second), near_threshold=0.99, progress=False)
    assert strict["removed"]["near_duplicate"] == 0 and strict["kept"] == 4  # none is 99 % alike
    exact_only = clean_command(str(source), output=str(second), near_threshold=None, progress=False)
    assert exact_only["kept"] == 4
    none = clean_command(str(source), output=str(second), dedup=False, max_chars=len(a), progress=False)
    assert none["removed"]["too_long"] == 2 and none["kept"] == 2  # the tail and the random text are longer


def conversation(question: str, answer: str) -> dict:
    return {"conversations": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def test_clean_sft_dpo_and_rl_formats(tmp_path):
    a = words(5)
    sft = tmp_path / "sft.jsonl"
    write_lines(sft, [conversation("q1", a), conversation("q1", a), conversation("q1", one_word_changed(a)),
                      conversation("q2", " "), {"conversations": [{"role": "robot", "content": "x"},
                                                                  {"role": "assistant", "content": "y"}]},
                      conversation("q3", "an answer\u00a0\u200b")])
    report = clean_command(str(sft), output=str(tmp_path / "o.jsonl"), progress=False)
    assert report["format"] == "sft" and report["kept"] == 2
    assert report["removed"]["invalid_record"] == 2 and report["removed"]["exact_duplicate"] == 1
    assert report["removed"]["near_duplicate"] == 1
    assert json.loads((tmp_path / "o.jsonl").read_text().splitlines()[1]) == conversation("q3", "an answer")

    dpo = tmp_path / "dpo.jsonl"
    prompt = [{"role": "user", "content": "which?"}]
    pair = {"chosen": prompt + [{"role": "assistant", "content": "good"}],
            "rejected": prompt + [{"role": "assistant", "content": "bad"}]}
    other = {"chosen": prompt + [{"role": "assistant", "content": "x"}],
             "rejected": [{"role": "user", "content": "else"}, {"role": "assistant", "content": "y"}]}
    write_lines(dpo, [pair, other, pair])
    report = clean_command(str(dpo), output=str(tmp_path / "d.jsonl"), progress=False)
    assert (report["format"], report["kept"], report["removed"]["invalid_record"],
            report["removed"]["exact_duplicate"]) == ("dpo", 1, 1, 1)

    rl = tmp_path / "rl.jsonl"
    write_lines(rl, [{"conversations": [{"role": "user", "content": "tell me"}, {"role": "assistant", "content": ""}]},
                     {"conversations": [{"role": "user", "content": " "}, {"role": "assistant", "content": ""}]}])
    report = clean_command(str(rl), output=str(tmp_path / "r.jsonl"), progress=False)
    assert (report["format"], report["kept"], report["removed"]["invalid_record"]) == ("rl", 1, 1)


def test_clean_refuses_its_input_as_output_and_names_the_missing_extra(tmp_path, monkeypatch):
    source = tmp_path / "p.jsonl"
    write_lines(source, [{"text": "hello there"}])
    with pytest.raises(UserError, match="never modify their input"):
        dispatch(["data", "clean", str(source), "--output", str(source)])
    monkeypatch.setitem(sys.modules, "datasketch", None)
    with pytest.raises(UserError, match=r'pip install -e "\.\[data\]"'):
        clean_command(str(source), output=str(tmp_path / "o.jsonl"), progress=False)
    with pytest.raises(UserError, match="--languages takes"):
        clean_command(str(source), output=str(tmp_path / "o.jsonl"), languages=["fr"], near_threshold=None)


def test_key_set_finds_every_key_added_and_no_other_across_merged_runs():
    import numpy as np

    from minimind_pl.commands.data.dedup import KeySet

    rng = np.random.default_rng(0)
    keys = np.unique(rng.integers(1, 1 << 62, 6000, dtype=np.uint64))[:5000]
    rng.shuffle(keys)
    added, absent = keys[:4000], keys[4000:]
    seen = KeySet(flush_at=64, max_run=1000)
    for chunk in np.array_split(added, 400):
        seen.add(chunk)
    assert len(seen) == 4000 and all(run.size <= 1000 for run in seen.runs) and len(seen.runs) > 1
    assert all(np.all(run[:-1] < run[1:]) for run in seen.runs)  # each run sorted, no key twice
    assert seen.lookup(added).all() and not seen.lookup(absent).any()
    again = np.concatenate([absent[:3], added[:2], absent[:1]])
    assert seen.mark(again).tolist() == [False, False, False, True, True, True] and len(seen) == 4003


def word_list(seed: int, n: int = 80) -> list[str]:
    return words(seed, n).split(" ")


def test_near_duplicates_are_removed_only_when_their_signatures_agree(tmp_path):
    """Planted near copies (one word of 80 changed: Jaccard ~0.93) go; planted related documents (the first 64 words
    of a document, 16 others: Jaccard ~0.66) stay, also those whose LSH band matches the document's."""
    bases = [word_list(seed) for seed in range(100, 120)]
    related = [base[:64] + word_list(seed + 1000, 16) for seed, base in zip(range(100, 120), bases)]
    near = [one_word_changed(" ".join(base)) for base in bases[:10]]
    source = tmp_path / "p.jsonl"
    write_lines(source, [{"text": " ".join(b)} for b in bases] + [{"text": t} for t in near]
                + [{"text": " ".join(r)} for r in related])
    report = clean_command(str(source), output=str(tmp_path / "o.jsonl"), progress=False)
    assert report["removed"]["near_duplicate"] == 10 and report["kept"] == 40
    assert [line.split(":")[-1] for line in report["examples"]["near_duplicate"]] == ["21", "22", "23", "24", "25"]

    from minimind_pl.commands.data.dedup import MinHasher

    hasher = MinHasher(0.8)
    keys = [hasher.band_keys(hasher.signatures([" ".join(b), " ".join(r)])) for b, r in zip(bases, related)]
    assert sum(bool(set(k[0].tolist()) & set(k[1].tolist())) for k in keys) >= 2  # LSH alone would remove these


def test_near_duplicates_are_found_whatever_the_case_of_their_letters(tmp_path):
    """A copy in capitals, or with its first letters capitalised, is the same text to a reader: it goes as a near
    duplicate; a document of other words stays."""
    base, other = words(200), words(201)
    source = tmp_path / "p.jsonl"
    write_lines(source, [{"text": t} for t in (base, base.upper(), one_word_changed(base).title(), other)])
    report = clean_command(str(source), output=str(tmp_path / "o.jsonl"), progress=False)
    assert report["removed"]["near_duplicate"] == 2 and report["kept"] == 2
    assert [line.split(":")[-1] for line in report["examples"]["near_duplicate"]] == ["2", "3"]


def test_band_collisions_are_checked_against_kept_signatures_of_the_block_and_on_disk(tmp_path):
    import numpy as np

    from minimind_pl.commands.data.dedup import MinHasher, NearDuplicateIndex

    hasher = MinHasher(0.8, num_perm=128)
    index = NearDuplicateIndex(hasher, tmp_path)
    index.signatures.buffer_rows = 5  # rows go to the temporary file once 5 wait in memory
    rng = np.random.default_rng(0)

    def decide(signatures):
        index.begin_block(signatures, hasher.band_keys(signatures))
        near = [index.is_near(i) or index.keep(i) for i in range(len(signatures))]
        index.end_block()
        return [bool(n) for n in near]

    def variant(signature, changed):  # ``changed`` of the 128 values differ, the first band stays
        out = signature.copy()
        out[128 - changed:] += 1
        return out

    kept = rng.integers(0, 1 << 32, (4, 128), dtype=np.uint32)
    assert decide(kept) == [False] * 4 and index.signatures.on_disk == 0
    assert np.array_equal(index.signatures.take([1]), kept[1:2])
    one_band = rng.integers(0, 1 << 32, 128, dtype=np.uint32)
    one_band[: hasher.rows] = kept[1][: hasher.rows]  # the same first band, nothing else: Jaccard ~0.1
    close, far = variant(kept[2], 19), variant(kept[2], 30)  # 85 % and 77 % of the values agree
    new = rng.integers(0, 1 << 32, 128, dtype=np.uint32)
    block = np.stack([one_band, close, far, new, variant(new, 40), variant(new, 10), variant(new, 12)])
    # a line of this block is compared with the earlier kept lines of the block too (new: kept, the first variant
    # is too far from it and kept; the next two are near it, the second also after its near-duplicate sibling)
    assert decide(block) == [False, True, False, False, False, True, True]
    assert index.signatures.on_disk == 8 and np.array_equal(index.signatures.take([1, 5, 6]),
                                                            np.stack([kept[1], block[2], block[3]]))
    index.close()
    assert list(tmp_path.iterdir()) == []  # the temporary file is gone


def test_block_signatures_are_datasketchs_minhash(monkeypatch):
    import numpy as np
    from datasketch import MinHash

    import minimind_pl.commands.data.dedup as dedup

    monkeypatch.setattr(dedup, "SHINGLES_PER_STEP", 7)  # texts spanning steps
    monkeypatch.setattr(dedup, "CHARS_PER_GROUP", 50)  # and groups
    hasher = dedup.MinHasher(0.8, num_perm=64, ngram=3)
    texts = [words(1, 30), "", "一二三四五六七八九十 ok", "two words", words(2, 5), "!!"]
    signatures = hasher.signatures(texts)
    for text, signature in zip(texts, signatures):
        expected = MinHash(num_perm=64, seed=1, scheme="affine32", hashfunc=int)
        hashes, _ = hasher.shingles([text])
        expected.update_batch(hashes.tolist())
        assert np.array_equal(signature, expected.hashvalues)
    assert hasher.shingles(["a b c d"])[0].size == 2 and hasher.shingles(["a b"])[0].size == 1


def test_words_found_in_arrays_are_the_regular_expressions_words():
    from minimind_pl.commands.data.dedup import WORD, word_spans

    texts = ["Hello, World_2 naïve café!", "", "中文的句子abc中", "emoji 😀 and 𠀀𠀁 (CJK ext. B) x", "a\ud800b", "__ 12,5"]
    joined, starts, ends, text_of_word = word_spans(texts)
    found = [[] for _ in texts]
    for start, end, text in zip(starts, ends, text_of_word):
        found[text].append("".join(map(chr, joined[start:end].tolist())))
    assert found == [WORD.findall(text) for text in texts]


def test_many_blocks_in_worker_processes_give_the_same_output_and_counts(tmp_path, monkeypatch):
    import functools

    import minimind_pl.commands.data.clean as clean_module

    monkeypatch.setattr(clean_module, "map_blocks", functools.partial(clean_module.map_blocks, block_bytes=2048))
    bases = [words(seed) for seed in range(260, 320)]  # ~500 bytes each: ~4 lines a block, 30 blocks
    # (seeds whose near copies all share an LSH band with their document: LSH misses ~1% of such pairs)
    lines = [{"text": t} for t in bases] + [{"text": one_word_changed(t)} for t in bases[::3]] \
        + [{"text": t} for t in bases[1::5]] + [{"text": one_word_changed(bases[3])}]
    source = tmp_path / "p.jsonl"
    write_lines(source, lines)
    outputs = []
    for num_proc in (1, 2):
        outputs.append(tmp_path / f"out{num_proc}.jsonl")
        report = clean_command(str(source), output=str(outputs[-1]), num_proc=num_proc, progress=False)
        assert (report["kept"], report["removed"]["near_duplicate"], report["removed"]["exact_duplicate"]) == (60, 21, 12)
    assert outputs[0].read_bytes() == outputs[1].read_bytes()
