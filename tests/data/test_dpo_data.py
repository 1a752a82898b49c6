"""DPODataModule: chat rendering, answer-only labels, per-batch padding, the cache and bad input."""
import json

import pytest
import torch

from minimind_pl.data import DataFormatError, DPODataModule
from minimind_pl.data.dpo import pair_loader
from minimind_pl.losses import IGNORE_INDEX


def _msg(role, content):
    return {"role": role, "content": content}


def _pair(prompt, chosen, rejected, history=()):
    """A pair with an optional earlier exchange before the final user prompt."""
    head = [*history, _msg("user", prompt)]
    return {"chosen": head + [_msg("assistant", chosen)], "rejected": head + [_msg("assistant", rejected)]}


PAIRS = [
    _pair("Who wrote 《静夜思》?", "It was written by 李白.", "It was written by 杜甫."),
    _pair("What is 2 + 3?", "2 + 3 = 5.", "2 + 3 = 7, I think, but maybe not.",
          history=[_msg("system", "You are terse."), _msg("user", "Hi"), _msg("assistant", "Hello!")]),
    _pair("Say yes.", "Yes.", "No."),
]


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records),
                    encoding="utf-8")
    return path


@pytest.fixture
def tokenizer_dir(shared_dir):
    return str(shared_dir / "minimind")


def _module(tmp_path, tokenizer_dir, records, **kwargs):
    path = _write(tmp_path / "dpo.jsonl", records)
    args = dict(seq_len=64, batch_size=3, tokenizer=tokenizer_dir, num_workers=0, cache_dir=str(tmp_path / "cache"))
    dm = DPODataModule(str(path), **{**args, **kwargs})
    dm.setup("fit")
    return dm


def _labelled(tokenizer, labels):
    return tokenizer.decode([t for t in labels.tolist() if t != IGNORE_INDEX])


def test_labels_cover_exactly_the_final_answers(tmp_path, tokenizer_dir):
    dm = _module(tmp_path, tokenizer_dir, PAIRS, seq_len=128)
    assert dm.stats["train"]["truncated_pairs"] == 0
    batch = next(iter(dm.reference_dataloader("train")))
    tok = dm.tokenizer
    for row, record in enumerate(PAIRS):
        for side in ("chosen", "rejected"):
            assert _labelled(tok, batch[f"{side}_labels"][row]) == record[side][-1]["content"] + "<|im_end|>"
            text = tok.decode(batch[f"{side}_input_ids"][row].tolist())
            assert text.startswith(tok.apply_chat_template(record[side][:-1], add_generation_prompt=True))
    # labels are shifted: the target at t is the input at t + 1 (the last target, eos, is never an input)
    ids, labels = batch["chosen_input_ids"][0], batch["chosen_labels"][0]
    positions = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    assert torch.equal(labels[positions[:-1]], ids[positions[:-1] + 1])
    assert labels[positions[-1]].item() == tok.eos_id and ids[positions[-1] + 1].item() == tok.pad_id


def test_batches_are_padded_to_their_longest_sequence_only(tmp_path, tokenizer_dir):
    dm = _module(tmp_path, tokenizer_dir, PAIRS, seq_len=256, batch_size=2)
    batches = list(dm.reference_dataloader("train"))
    tok = dm.tokenizer
    for batch in batches:
        width = batch["chosen_input_ids"].shape[1]
        assert batch["rejected_input_ids"].shape[1] == width < 256
        lengths = [(ids != tok.pad_id).sum().item() for side in ("chosen", "rejected")
                   for ids in batch[f"{side}_input_ids"]]
        assert max(lengths) == width and batch["real_tokens"].item() == sum(lengths)
    assert batches[0]["index"].tolist() == [0, 1] and batches[1]["index"].tolist() == [2]


def test_cache_is_built_once_and_val_fraction_keeps_pairs_whole(tmp_path, tokenizer_dir, capsys):
    records = PAIRS * 4
    dm = _module(tmp_path, tokenizer_dir, records, val_fraction=0.3)
    assert len(dm.train_dataset) + len(dm.val_dataset) == len(records) and len(dm.val_dataset) > 0
    for dataset in (dm.train_dataset, dm.val_dataset):
        for i in range(len(dataset)):
            chosen, rejected = dataset[i]["chosen"][0], dataset[i]["rejected"][0]
            assert chosen[:10].tolist() == rejected[:10].tolist()  # same prompt: one line's two sides
    capsys.readouterr()
    DPODataModule(str(tmp_path / "dpo.jsonl"), seq_len=64, batch_size=3, tokenizer=tokenizer_dir,
                  cache_dir=str(tmp_path / "cache")).setup("fit")
    assert "tokenized" not in capsys.readouterr().out  # reused, not re-tokenized


@pytest.mark.parametrize("record, message", [
    ({"chosen": [_msg("user", "a"), _msg("assistant", "b")],
      "rejected": [_msg("user", "other"), _msg("assistant", "c")]}, "different prompts"),
    (_pair("Q?", "fine", "   "), "empty rejected answer"),
    (_pair("Q?", "<think>Let me see.</think>\n", "fine"), "empty chosen answer"),  # reasoning alone (as SFT)
    ({"chosen": [_msg("user", "Q?")], "rejected": [_msg("user", "Q?")]}, "must be the assistant"),
    ({"prompt": "Q?"}, "'chosen' and 'rejected'"),
    ("{not json", "not valid JSON"),
])
def test_bad_pairs_name_file_and_line(tmp_path, tokenizer_dir, record, message):
    with pytest.raises(DataFormatError, match=rf"dpo\.jsonl, line 3: .*{message}"):
        _module(tmp_path, tokenizer_dir, [PAIRS[0], PAIRS[2], record])
    dm = _module(tmp_path, tokenizer_dir, [PAIRS[0], PAIRS[2], record], skip_invalid=True)
    assert len(dm.train_dataset) == 2 and dm.stats["skipped_lines"] == 1


def test_a_tool_call_is_an_answer(tmp_path, tokenizer_dir):
    call = {"role": "assistant", "content": None, "tool_calls": [{"name": "lookup", "arguments": {"q": "Q"}}]}
    pair = {"chosen": [_msg("user", "Q?"), call], "rejected": [_msg("user", "Q?"), _msg("assistant", "No idea.")]}
    dm = _module(tmp_path, tokenizer_dir, [PAIRS[0], pair])
    batch = next(iter(dm.reference_dataloader("train")))
    assert '<tool_call>\n{"name": "lookup"' in _labelled(dm.tokenizer, batch["chosen_labels"][1])


def test_overlong_pairs_truncate_the_prompt_first_or_stop(tmp_path, tokenizer_dir):
    long_pair = _pair("word " * 80 + "Answer briefly.", "Short yes.", "Short no.")
    with pytest.raises(DataFormatError, match=r"dpo\.jsonl, line 2: pair of \d+ tokens is longer than"):
        _module(tmp_path, tokenizer_dir, [PAIRS[0], long_pair], seq_len=48, overlong="error")
    dm = _module(tmp_path, tokenizer_dir, [PAIRS[0], long_pair], seq_len=48, overlong="truncate")
    assert dm.stats["train"]["truncated_pairs"] == 1
    batch = next(iter(dm.reference_dataloader("train")))
    tok = dm.tokenizer
    assert batch["chosen_input_ids"].shape[1] == 48
    assert _labelled(tok, batch["chosen_labels"][1]) == "Short yes.<|im_end|>"
    assert _labelled(tok, batch["rejected_labels"][1]) == "Short no.<|im_end|>"
    chosen_text = tok.decode(batch["chosen_input_ids"][1].tolist())
    assert "Answer briefly.<|im_end|>\n<|im_start|>assistant" in chosen_text
    assert not chosen_text.startswith("<|im_start|>")  # the prompt lost its oldest tokens


def test_pair_loader_reads_a_file_in_order(tmp_path, tokenizer_dir):
    path = _write(tmp_path / "val.jsonl", PAIRS)
    batches = list(pair_loader(path, tokenizer_dir, seq_len=64, batch_size=2, cache_dir=str(tmp_path / "c")))
    assert [b["index"].tolist() for b in batches] == [[0, 1], [2]]
