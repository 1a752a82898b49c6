"""The commands that read data (``data`` stats/clean/split/mix, ``eval``, ``tokenizer``) never import Lightning.

Each runs in a fresh interpreter on tiny inputs; Lightning would cost seconds of start-up (``import lightning``).
The command modules are called directly, so the test does not depend on how ``cli.py`` dispatches.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from minimind_pl.config import ModelConfig
from minimind_pl.model import MiniMindForCausalLM

SCRIPT = """
import contextlib, io, sys
from minimind_pl.commands.data import data_command
from minimind_pl.commands.evaluate import eval_command
from minimind_pl.commands.tokenizer import tokenizer_command
from jsonargparse import CLI

root, tokenizer = sys.argv[1], sys.argv[2]
with contextlib.redirect_stdout(io.StringIO()):
    with contextlib.suppress(SystemExit):
        CLI(tokenizer_command, args=["--help"])  # what `main.py tokenizer --help` parses with
    data_command(["stats", f"{root}/text.jsonl", f"{root}/sft.jsonl", "--tokenizer", tokenizer, "--progress", "false"])
    data_command(["clean", f"{root}/sft.jsonl", "--output", f"{root}/clean.jsonl", "--near_threshold", "null",
                  "--progress", "false"])
    data_command(["split", f"{root}/text.jsonl", "--val_docs", "1", "--train_output", f"{root}/train.jsonl",
                  "--val_output", f"{root}/val.jsonl"])
    tokenizer_command([f"{root}/text.jsonl", f"{root}/sft.jsonl"], vocab_size=300, out=f"{root}/tok")
    eval_command(f"{root}/m.ckpt", f"{root}/sft.jsonl", tokenizer=tokenizer, device="cpu")
print(sorted(m for m in sys.modules if m.split(".")[0] in ("lightning", "pytorch_lightning")))
"""


def test_data_eval_and_tokenizer_commands_never_import_lightning(tmp_path: Path, shared_dir: Path):
    texts = [{"text": f"第{i}句话。Sentence {i}."} for i in range(20)]
    chats = [{"conversations": [{"role": "user", "content": f"{i}+1=?"}, {"role": "assistant", "content": str(i + 1)}]}
             for i in range(20)]
    for name, rows in (("text", texts), ("sft", chats)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                                encoding="utf-8")
    model = MiniMindForCausalLM(ModelConfig.from_preset("debug"))
    torch.save({"state_dict": {"model." + k: v for k, v in model.state_dict().items()},
                "model_config": model.config.to_dict()}, tmp_path / "m.ckpt")
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), str(shared_dir / "minimind")],
                            capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout[-2000:]
    assert (tmp_path / "tok" / "tokenizer.json").exists() and (tmp_path / "val.jsonl").exists()
