"""Every command of the README's ```bash blocks runs as written, or is skipped here with its reason.

The commands run in one temporary folder laid out as the README assumes (a checkout's ``configs/``, MiniMind's
tokenizer in ``data/tokenizer`` and ``model/``, tiny jsonl files at the names MiniMind's datasets have, tiny
stand-ins for the downloaded models: ``MiniMind2/`` and ``out/full_sft_512.pth``), in README order, so the
``fit`` commands write the checkpoints the later commands read. A ``fit`` command gets :data:`SHRINK` appended
(a tiny model, one optimizer step); nothing else is added or changed. ``python main.py ...`` runs in this
process (``cli.main``), in the temporary folder.

A README command that is neither run nor listed in :data:`SKIPPED` fails the test: add it to SKIPPED with the
reason it cannot run here, or give it the stand-ins it needs in :func:`readme_layout`.
"""

from __future__ import annotations

import fnmatch
import io
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from helpers import require_module
from minimind_pl.checkpoints.huggingface import save_hf_directory
from minimind_pl.checkpoints.minimind import save_minimind
from minimind_pl.cli import main
from minimind_pl.config import ModelConfig
from minimind_pl.model import MiniMindForCausalLM
from minimind_pl.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]

# command pattern (fnmatch over the command as written, comments dropped) -> why it does not run here
SKIPPED: dict[str, str] = {
    "pip install *": "installs packages: the tests run in the installed environment",
    "python -m pytest": "the test suite itself",
    "huggingface-cli download *": "downloads from the Hugging Face hub (no network here)",
    "modelscope download *": "downloads from ModelScope (no network here)",
    "python main.py demo": "trains every demo stage for minutes; tests/demo/ runs the demo's parts",
    "python main.py fit --config configs/minimind3/grpo.yaml": "its reward model (InternLM2-1.8B-reward) is a "
                                                              "download; tests/stages/ run GRPO",
    "python main.py fit --config configs/minimind3/ppo.yaml": "its reward model (InternLM2-1.8B-reward) is a "
                                                             "download; tests/stages/ run PPO",
    "python main.py fit --config configs/minimind3v/*": "needs the SigLIP2 tower download",
    "python main.py * --vision_encoder *": "needs a vision tower download and a MiniMind-V model",
    "python main.py * --ckpt checkpoints/minimind3v/*": "needs the MiniMind-V stage checkpoints (a tower download)",
    "python main.py export --ckpt MiniMind2-MoE *": "MiniMind2-MoE's published folder (MiniMind's own "
                                                   "config.json) has no writer here to make a stand-in",
    "python main.py fit * --trainer.devices [48] *": "needs 4-8 GPUs",
    "torchrun *": "a multi-machine launch",
    "srun *": "a SLURM launch",
    "python main.py serve *": "serves until stopped; tests/commands/test_serve.py runs the server",
    "python main.py eval --task tools * --endpoint *": "needs a running server; tests/commands/test_tool_eval.py "
                                                       "runs the benchmark against serve",
    "MINIMIND_API_KEY=* python main.py serve *": "serves until stopped; tests/commands/test_serve.py runs the server",
    "python main.py eval * --harness ceval-valid,cmmlu,arc_easy,hellaswag *": "lm-eval downloads these "
                                                                            "benchmarks' data",
    "python main.py eval * --harness my_task --harness_include my_tasks/ *": "my_task / my_tasks/ stand for "
                                                                             "one's own task folder",
    "llama-cli *": "llama.cpp's CLI is not installed; tests/checkpoints/ check the GGUF in llama.cpp itself",
    "llama-server *": "llama.cpp's server is not installed; tests/checkpoints/ check the GGUF in llama.cpp",
    "ollama *": "Ollama is not installed",
    "vllm serve *": "vLLM serves until stopped; bench/vllm_check.py checks the exports in vLLM",
    "bash bench/mutation.sh*": "mutation testing takes minutes per module",
    "mutmut show *": "needs a mutation run first",
}

# appended to every `fit` command: a tiny model, tiny rows, one optimizer step, no validation passes, on the CPU
SHRINK = ["--model.config.hidden_size", "64", "--model.config.num_hidden_layers", "2",
          "--model.config.num_attention_heads", "4", "--model.config.num_key_value_heads", "2",
          "--model.config.intermediate_size", "192",
          "--data.seq_len", "32", "--data.batch_size", "2", "--data.num_workers", "0",
          "--trainer.max_steps", "1", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
          "--trainer.precision", "32-true", "--trainer.limit_val_batches", "0",
          "--trainer.num_sanity_val_steps", "0", "--trainer.enable_model_summary", "false",
          "--trainer.enable_progress_bar", "false"]
CHAT_INPUT = "你好\n"  # what `chat` reads before its input ends
# what the README's commands write (each path named by one of them): the run shows they did their work
WRITTEN = ["lengths.png", "data/pretrain_clean.jsonl", "data/sft_t2t_mini_train.jsonl", "data/sft_t2t_mini_val.jsonl",
           "data/mix.jsonl", "data/teacher.jsonl", "out/MiniMind2-llama/config.json", "out/full_sft_768.pth",
           "out/minimind-3-hf/config.json", "out/identity-hf/config.json", "out/minimind-3.gguf",
           *(f"checkpoints/minimind3/{stage}/last.ckpt" for stage in ("pretrain", "sft", "lora", "dpo", "distill",
                                                                       "reason"))]


def readme_commands(text: str) -> list[list[str]]:
    """The commands of the ```bash blocks, in order: continuation lines joined, comments dropped, as shell
    words (quotes removed)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def skip_reason(words: list[str]) -> str | None:
    """Why the command is skipped, or None when it runs."""
    line = shlex.join(words)
    return next((why for pattern, why in SKIPPED.items() if fnmatch.fnmatchcase(line, pattern)
                 or fnmatch.fnmatchcase(" ".join(words), pattern)), None)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """``rows`` as a jsonl file (folders made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def conversation(i: int) -> dict:
    """An SFT record."""
    return {"conversations": [{"role": "user", "content": f"问题{i}：1+{i}等于几？"},
                              {"role": "assistant", "content": f"1+{i}等于{i + 1}。"}]}


def preference(i: int) -> dict:
    """A DPO record: one question, a right and a wrong answer."""
    question = conversation(i)["conversations"][:1]
    return {"chosen": question + [{"role": "assistant", "content": f"等于{i + 1}。"}],
            "rejected": question + [{"role": "assistant", "content": f"等于{i + 2}。"}]}


def readme_layout(root: Path, tokenizer_dir: Path) -> None:
    """The files the README's commands name, as tiny stand-ins, under ``root``."""
    shutil.copytree(REPO / "configs", root / "configs")
    (root / "bench").mkdir()
    shutil.copy(REPO / "bench" / "tool_tasks.jsonl", root / "bench")
    for folder in ("data/tokenizer", "model"):
        shutil.copytree(tokenizer_dir, root / folder)
    texts = [{"text": f"第{i}段文字。MiniMind is a tiny language model, number {i}."} for i in range(40)]
    write_jsonl(root / "data/pretrain_t2t_mini.jsonl", texts)
    write_jsonl(root / "data/sft_t2t_mini.jsonl", [conversation(i) for i in range(2010)])  # split keeps 2000 out
    write_jsonl(root / "data/lora_identity.jsonl", [conversation(i) for i in range(20)])
    write_jsonl(root / "data/r1_mix_1024.jsonl", [conversation(i) for i in range(20)])
    write_jsonl(root / "data/sft_val.jsonl", [conversation(i) for i in range(4)])
    write_jsonl(root / "data/dpo.jsonl", [preference(i) for i in range(20)])
    write_jsonl(root / "prompts.jsonl", [{"conversations": conversation(i)["conversations"][:1]} for i in range(3)])
    tokenizer = Tokenizer.from_file(tokenizer_dir)
    minimind2 = MiniMindForCausalLM(ModelConfig.from_preset("minimind2-small", hidden_size=64, num_hidden_layers=2,
                                                            num_attention_heads=4, intermediate_size=192))
    save_hf_directory(minimind2.state_dict(), minimind2.config, tokenizer, root / "MiniMind2", dtype="float32")
    small = MiniMindForCausalLM(ModelConfig.from_preset("minimind2-small", hidden_size=64, num_hidden_layers=2))
    save_minimind(small.state_dict(), root / "out/full_sft_512.pth")  # MiniMind2's layout: its tokenizer in model/


def run_command(words: list[str], monkeypatch) -> None:
    """Run one README command as written (``python main.py`` in this process); a fit with SHRINK appended."""
    assert words[:2] == ["python", "main.py"], f"no way to run {shlex.join(words)} here: add it to SKIPPED"
    argv = words[2:] + (SHRINK if words[2] == "fit" else [])
    monkeypatch.setattr("sys.stdin", io.StringIO(CHAT_INPUT))
    main(argv)


def test_every_readme_command_runs_as_written_or_is_skipped_with_a_reason(tmp_path, tokenizer_dir, monkeypatch):
    require_module("lightning")
    commands = readme_commands((REPO / "README.md").read_text(encoding="utf-8"))
    readme_layout(tmp_path, tokenizer_dir)
    monkeypatch.chdir(tmp_path)  # the README's relative paths are relative to the checkout
    monkeypatch.setenv("MINIMIND_DEBUG", "1")  # a failing command shows its traceback
    ran = []
    for words in commands:
        if skip_reason(words) is None:
            run_command(words, monkeypatch)
            ran.append(shlex.join(words))
    assert "python main.py chat --ckpt out/full_sft_512.pth" in ran  # the README's MiniMind2 .pth, no --tokenizer
    missing = [path for path in WRITTEN if not (tmp_path / path).exists()]
    assert not missing, f"README commands ran but did not write {missing}"
    print(f"{len(ran)} README commands ran:", *ran, sep="\n  ")


def test_a_new_readme_command_is_neither_run_nor_skipped_silently():
    commands = readme_commands("```bash\nfoo --bar  # a comment\npython main.py demo\n"
                               "python main.py fit --config x.yaml \\\n  --trainer.devices 8 --x y\n```\n")
    assert commands == [["foo", "--bar"], ["python", "main.py", "demo"],
                        ["python", "main.py", "fit", "--config", "x.yaml", "--trainer.devices", "8", "--x", "y"]]
    assert skip_reason(commands[0]) is None and skip_reason(commands[1]) and skip_reason(commands[2]) == "needs 4-8 GPUs"
    with pytest.raises(AssertionError, match="add it to SKIPPED"):
        run_command(commands[0], pytest.MonkeyPatch())
