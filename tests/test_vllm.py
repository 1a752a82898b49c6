"""Our Hugging Face exports in vLLM: ``bench/vllm_check.sh`` in vLLM's CPU build (its own environment, which
``.ci/run`` makes with ``bash bench/vllm_check.sh --install_only``) gives greedy answers equal to ours, token for
token, for MiniMind-3 (Qwen3), dense MiniMind2 (Llama) and MoE (Qwen3-MoE) exports; about two minutes."""

import json
import os
import subprocess
from pathlib import Path

from helpers import require

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
VENV = Path(os.environ.get("MINIMIND_VLLM_VENV") or CACHE / "minimind_pl" / "vllm-venv")


def test_vllm_serves_the_exports_with_our_greedy_answers(tmp_path):
    require((VENV / "bin" / "python").exists(), f"no vLLM environment at {VENV}: bash bench/vllm_check.sh --install_only")
    out = tmp_path / "vllm.json"
    run = subprocess.run(["bash", str(REPO / "bench" / "vllm_check.sh"), "--new_tokens", "16", "--out", str(out)],
                         capture_output=True, text=True, timeout=900, env={**os.environ, "MINIMIND_VLLM_VENV": str(VENV)})
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    results = json.loads(out.read_text(encoding="utf-8"))
    assert [r["architecture"] for r in results] == ["Qwen3ForCausalLM", "LlamaForCausalLM", "Qwen3MoeForCausalLM"]
    assert all(r["template_equal"] for r in results)
    answers = [a for r in results for a in r["answers"]]
    assert len(answers) == 15 and all(a["first_difference"] is None and len(a["ours"]) > 0 for a in answers)
