"""``python main.py tokenizer``: train a byte-level BPE tokenizer on jsonl files."""

from __future__ import annotations

import time
from pathlib import Path

from minimind_pl.data.formats import jsonl_texts
from minimind_pl.errors import check_input_file
from minimind_pl.tokenizer import chars_per_token, train_tokenizer


def tokenizer_command(data: list[str], vocab_size: int = 6400, out: str = "checkpoints/tokenizer") -> None:
    """Train a byte-level BPE tokenizer on jsonl files and save it in Hugging Face layout.

    Args:
        data: jsonl files to train on, in any data format (pretrain ``text``, SFT ``conversations``, DPO pairs,
            RL prompts): the texts a model reads of each line.
        vocab_size: vocabulary size, MiniMind's 36 added tokens included.
        out: output directory (tokenizer.json + tokenizer_config.json).
    """
    for path in data:
        check_input_file(path, "--data")
    start = time.perf_counter()
    tokenizer = train_tokenizer(jsonl_texts(data), vocab_size, out)
    seconds = time.perf_counter() - start
    sample = [t for _, t in zip(range(2000), jsonl_texts(data))]
    print(f"trained {tokenizer.vocab_size}-token byte-level BPE on {len(data)} file(s) in {seconds:.1f}s")
    print(f"saved to {Path(out).resolve()}  (vocabulary fingerprint {tokenizer.vocabulary_fingerprint[:16]})")
    print(f"chars/token on the first {len(sample)} training texts: {chars_per_token(tokenizer, sample):.3f}")
