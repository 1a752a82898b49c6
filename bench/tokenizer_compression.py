"""Characters per token: our trained tokenizer vs MiniMind's, on held-out Chinese and English text.

Trains a 6400-token byte-level BPE on ../shared/corpus/pretrain_real.jsonl (as `main.py tokenizer`
does), then encodes pretrain_real_val.jsonl with it and with MiniMind's original tokenizer. Lines
are split into Chinese and English by their share of CJK characters.

    python bench/tokenizer_compression.py [--vocab_size 6400] [--cjk_threshold 0.3]
"""
import argparse
import json
import re
import tempfile
import time
from pathlib import Path

from minimind_pl.data.formats import jsonl_texts
from minimind_pl.tokenizer import Tokenizer, chars_per_token, train_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared"
CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff]")


def cjk_ratio(text: str) -> float:
    """Share of CJK ideographs among the non-whitespace characters of ``text``."""
    visible = [c for c in text if not c.isspace()]
    return sum(1 for c in visible if CJK.match(c)) / max(len(visible), 1)


def split_by_language(path: Path, threshold: float) -> dict[str, list[str]]:
    """Texts of a pretrain jsonl grouped into 'zh' (CJK ratio >= threshold) and 'en'."""
    groups: dict[str, list[str]] = {"zh": [], "en": []}
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                text = json.loads(line)["text"]
                groups["zh" if cjk_ratio(text) >= threshold else "en"].append(text)
    return groups


def main() -> None:
    """Train, measure and print a small table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab_size", type=int, default=6400)
    parser.add_argument("--cjk_threshold", type=float, default=0.3)
    args = parser.parse_args()
    corpus = SHARED / "corpus"
    groups = split_by_language(corpus / "pretrain_real_val.jsonl", args.cjk_threshold)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        ours = train_tokenizer(jsonl_texts([corpus / "pretrain_real.jsonl"]), args.vocab_size, out, show_progress=False)
        seconds = time.perf_counter() - start
    tokenizers = {"ours (pretrain_real)": ours, "MiniMind": Tokenizer.from_file(SHARED / "minimind")}
    print(f"trained ours ({ours.vocab_size} tokens) in {seconds:.1f}s; val lines: "
          f"zh={len(groups['zh'])} en={len(groups['en'])} (CJK ratio >= {args.cjk_threshold} -> zh)")
    print(f"{'tokenizer':<22}{'zh chars/token':>16}{'en chars/token':>16}{'all':>10}")
    for name, tok in tokenizers.items():
        row = [chars_per_token(tok, groups[g]) for g in ("zh", "en")]
        row.append(chars_per_token(tok, groups["zh"] + groups["en"]))
        print(f"{name:<22}" + "".join(f"{v:>16.3f}" for v in row[:2]) + f"{row[2]:>10.3f}")


if __name__ == "__main__":
    main()
