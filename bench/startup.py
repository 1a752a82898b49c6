"""Start-up wall time of ``python main.py``: ``--help`` and chat's first answer (median of N runs).

Each run is a fresh interpreter, as a user starts it. ``chat`` reads a tiny random debug checkpoint (written
once to a temporary folder, with the tokenizer of ../shared/minimind) and gets one prompt on stdin, answering
one token, so the time is start-up: imports, reading the checkpoint, building the model.

    python bench/startup.py [--repo PATH] [--runs 5]

``--repo`` times another checkout (its ``main.py``, run from its root so its own package is imported).
"""
import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"


def write_tiny_checkpoint(path: Path) -> Path:
    """A random debug-preset model in the layout a Stage checkpoint has (SFT, linked to the shared tokenizer)."""
    from minimind_pl import MiniMindForCausalLM, ModelConfig

    torch.manual_seed(0)
    model = MiniMindForCausalLM(ModelConfig.from_preset("debug"))
    torch.save({"state_dict": {"model." + k: v for k, v in model.state_dict().items()},
                "model_config": model.config.to_dict(), "stage": "SFT",
                "hyper_parameters": {"tokenizer": str(SHARED / "minimind")}}, path)
    return path


def median_seconds(args: list[str], repo: Path, runs: int, stdin: str = "") -> float:
    """Median wall time of ``python main.py <args>`` run ``runs`` times from ``repo``."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "main.py", *args], cwd=repo, input=stdin, text=True,
                       capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_tiny_checkpoint(Path(tmp) / "tiny.ckpt")
        help_s = median_seconds(["--help"], args.repo, args.runs)
        chat_s = median_seconds(["chat", "--ckpt", str(ckpt), "--max_new_tokens", "1", "--device", "cpu"],
                                args.repo, args.runs, stdin="你好\n")
    print(f"{args.repo}: --help {help_s:.2f} s, chat to its first answer {chat_s:.2f} s "
          f"(median of {args.runs} fresh interpreters)")


if __name__ == "__main__":
    main()
