"""Mutation testing, one module at a time: mutmut plants one-line bugs in a module and runs the tests that
cover it; a mutant no test notices ("survived") is a bug the suite would let through.

    python bench/mutation.py              # list the modules and their tests
    python bench/mutation.py losses       # run losses.py's mutants against its tests; print the kill rate
    python bench/mutation.py losses 'minimind_pl.losses.x_whiten*'   # re-run only these (after new tests)

(``bash bench/mutation.sh`` is the same.) mutmut reads one static config (setup.cfg ``[mutmut]``: what to copy,
pytest options); which files to mutate and which tests to run come from ``MODULES`` below, set in process before
mutmut starts, so a module's mutants run only against its own tests (minutes on 2 cores, not the whole suite).
Each run starts from a fresh ``mutants/`` (git-ignored): a kept one would keep old verdicts after tests change;
naming mutants (globs) re-runs just those in the kept one, and the kill rate counts the earlier verdicts of the rest
(new tests only kill more, so after new tests re-running the survivors is enough).
Mutants judged equivalent (no behaviour a user could notice changes) are listed, with reasons, in
``bench/mutation_equivalent.md``.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Target:
    """What one module's mutation run covers.

    Args:
        files: Source files to mutate (paths from the repository root; globs allowed).
        tests: Test files (or folders) run against the mutants.
        functions: Mutant-name globs when only part of a file is the target (None: every function of ``files``).
    """

    files: tuple[str, ...]
    tests: tuple[str, ...]
    functions: tuple[str, ...] | None = None


SERVE_APP = "minimind_pl.commands.serve.app."
ROLLOUTS = "minimind_pl.stages.rollouts."
DPO = "minimind_pl.stages.dpo."
CHECKPOINT_TESTS = ("tests/checkpoints", "tests/commands/test_export.py")
MODULES: dict[str, Target] = {
    "losses": Target(("minimind_pl/losses.py",), ("tests/test_losses.py",)),
    "rewards": Target(("minimind_pl/rewards.py",), ("tests/test_rewards.py", "tests/test_agent_rewards.py")),
    "generation": Target(("minimind_pl/generation.py",), ("tests/test_generation.py",)),
    # the serve tests (~50 s) are left out: tests/test_chat_format.py checks the output parser directly
    "chat_format": Target(("minimind_pl/chat_format.py",),
                          ("tests/test_chat_format.py", "tests/test_tokenizer.py", "tests/test_rewards.py",
                           "tests/data/test_prompts.py", "tests/commands/test_generate.py")),
    # the stages as a whole (slow: every stage test runs real Lightning fits); the per-file targets below split it
    "stages": Target(("minimind_pl/stages/*.py",), ("tests/stages",)),
    "stages/ppo": Target(("minimind_pl/stages/ppo.py",), ("tests/stages/test_grpo.py",)),  # the RL stages' tests
    # rollouts.py: the functions that make the numbers (rows, labels, rewards, log-probs, updates), not its logging,
    # checks at fit start and checkpoint hooks (the whole file would take over 25 min on 2 cores)
    "stages/grpo": Target(("minimind_pl/stages/grpo.py", "minimind_pl/stages/rollouts.py"),
                          ("tests/stages/test_grpo.py",),
                          functions=("minimind_pl.stages.grpo.*", *(ROLLOUTS + name + "__mutmut_*" for name in (
                              "x_with_stop", "x_answer_rows", "xǁRolloutStageǁmake_rollouts",
                              "xǁRolloutStageǁpolicy_log_probs", "xǁRolloutStageǁreference_log_probs",
                              "xǁRolloutStageǁoptimize", "xǁRolloutStageǁskip_updates")))),
    # dpo.py: the functions that make the numbers (pairs' log-probs, the reference's, the loss and its logs)
    "stages/dpo": Target(("minimind_pl/stages/dpo.py",), ("tests/stages/test_dpo.py",),
                         functions=tuple(DPO + name + "__mutmut_*" for name in (
                             "x_stack_pair", "x_pair_log_probs", "x_preference_accuracy", "x_reward_logs",
                             "xǁDPOǁreference_logps", "xǁDPOǁprecompute_reference_logps", "xǁDPOǁcompute_loss",
                             "xǁDPOǁ_split", "xǁDPOǁvalidation_values", "xǁDPOǁvalidation_weight"))),
    "stages/distill": Target(("minimind_pl/stages/distill.py",), ("tests/stages/test_distill.py",)),
    "stages/base": Target(("minimind_pl/stages/base.py",),
                          ("tests/stages/test_base.py", "tests/stages/test_schedule.py", "tests/stages/test_pretrain.py",
                           "tests/stages/test_resume.py", "tests/stages/test_nonfinite.py")),
    "stages/pretrain": Target(("minimind_pl/stages/pretrain.py",),
                              ("tests/stages/test_pretrain.py", "tests/stages/test_distill.py")),
    "stages/lora": Target(("minimind_pl/stages/lora.py",), ("tests/test_lora.py",)),
    "stages/resume": Target(("minimind_pl/stages/resume.py",), ("tests/stages/test_resume.py",)),
    "stages/nonfinite": Target(("minimind_pl/stages/nonfinite.py",), ("tests/stages/test_nonfinite.py",)),
    "stages/compiled": Target(("minimind_pl/stages/compiled.py",), ("tests/stages/test_compiled.py",)),
    "stages/strategies": Target(("minimind_pl/stages/strategies.py", "minimind_pl/stages/side_models.py"),
                                ("tests/stages/test_strategies.py", "tests/stages/test_ddp.py",
                                 "tests/stages/test_dpo.py")),
    "data/packing": Target(("minimind_pl/data/packing.py",),
                           ("tests/data/test_data_packing.py", "tests/data/test_data_sft.py")),
    # each DataModule with its format (data/formats/): the rendering, loss mask and cache key live there
    "data/sft": Target(("minimind_pl/data/sft.py", "minimind_pl/data/formats/sft.py"),
                       ("tests/data/test_data_sft.py", "tests/data/test_formats.py", "tests/data/test_data_cache.py")),
    "data/prompts": Target(("minimind_pl/data/prompts.py", "minimind_pl/data/formats/prompts.py"),
                           ("tests/data/test_prompts.py", "tests/data/test_formats.py")),
    "lora": Target(("minimind_pl/lora.py",), ("tests/test_lora.py",)),
    # the export command's tests write the Hugging Face folders (huggingface.py's writing half)
    "checkpoints": Target(("minimind_pl/checkpoints/*.py",), CHECKPOINT_TESTS),
    # the same, a few files at a time (its tests take ~20 s; mutmut runs each mutant's own tests only)
    **{f"checkpoints/{name}": Target(tuple(f"minimind_pl/checkpoints/{f}.py" for f in files), CHECKPOINT_TESTS)
       for name, files in (("minimind", ("minimind", "files")), ("huggingface", ("huggingface",)),
                           ("adapters", ("adapters",)), ("loading", ("loading", "sharded")))},
    # llama.cpp's file: the tests run it in llama.cpp itself (llama-cpp-python)
    "checkpoints/gguf": Target(("minimind_pl/checkpoints/gguf.py",), ("tests/checkpoints/test_gguf.py",)),
    # lm-evaluation-harness's model and the scoring it shares with eval (against lm-eval's HF backend)
    "commands/harness": Target(("minimind_pl/commands/harness.py", "minimind_pl/commands/scoring.py"),
                               ("tests/commands/test_harness.py",)),
    # tool use: the tools, the tool-call benchmark and its intervals, multi-turn episodes
    "tools": Target(("minimind_pl/tools.py",), ("tests/test_tools.py",)),
    "tool_eval": Target(("minimind_pl/commands/tool_eval.py", "minimind_pl/stats.py"),
                        ("tests/commands/test_tool_eval.py",)),
    "stages/agent_rollout": Target(("minimind_pl/stages/agent_rollout.py",), ("tests/test_agent_rollout.py",)),
    # the server's request checks and its protection (host/origin guard, API key, body size limit)
    "serve": Target(("minimind_pl/commands/serve/requests.py", "minimind_pl/commands/serve/app.py"),
                    ("tests/commands/test_serve.py",),
                    functions=("minimind_pl.commands.serve.requests.*",
                               *(SERVE_APP + name + "__mutmut_*" for name in (
                                   "x_is_loopback", "x_host_name", "xǁOriginGuardǁ*", "x_authorize", "x_read_body")))),
}


def list_modules() -> None:
    """Print each module, the files it mutates and the tests run against them."""
    for name, target in MODULES.items():
        print(f"{name:17s} {' '.join(target.files)}")
        print(f"{'':17s}   tests: {' '.join(target.tests)}")


def configure(target: Target) -> None:
    """Point mutmut at ``target``: its files to mutate and its tests, over setup.cfg's ``[mutmut]``."""
    import mutmut.configuration as configuration

    static = configuration._config_reader()
    chosen = {"only_mutate": list(target.files), "pytest_add_cli_args_test_selection": list(target.tests)}
    configuration._config_reader = lambda: (lambda key, default: chosen.get(key, static(key, default)))
    configuration.reset_config()


def keep_stage_arguments() -> None:
    """Let Lightning's ``save_hyperparameters`` find a stage's own ``__init__`` arguments under mutmut.

    It reads them off the frames of the ``__init__`` chain, and only from frames of functions named ``__init__``;
    mutmut runs a mutated class's ``__init__`` as a copy named ``xǁClassǁ__init____mutmut_orig`` (or ``_N``), so a
    stage built in Python (as the DPO and distillation tests build theirs) would have no ``hparams.beta`` and every
    test would fail before any mutant runs. Stages built by LightningCLI are not affected (it passes the arguments).
    """
    import inspect
    import re

    from lightning.pytorch.utilities import parsing

    lightning_reader = parsing._get_init_args
    mutmut_init = re.compile(r"__init____mutmut_(orig|\d+)$")

    def init_arguments(frame):
        local_vars = inspect.getargvalues(frame)[3]
        if "__class__" not in local_vars or not mutmut_init.search(frame.f_code.co_name):
            return lightning_reader(frame)
        signature = inspect.signature(getattr(local_vars["__class__"], frame.f_code.co_name))
        names = [n for n, p in signature.parameters.items() if n != "self"]
        arguments = {n: local_vars[n] for n in names if n in local_vars}
        for n, p in signature.parameters.items():
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                arguments.update(arguments.pop(n, {}))
        return local_vars.get("self"), arguments

    parsing._get_init_args = init_arguments


def run(target: Target, names: list[str]) -> int:
    """Run mutmut on ``target`` in a fresh ``mutants/``, or only the mutants ``names`` in the kept one."""
    import mutmut.__main__ as mutmut_cli

    if not names:
        shutil.rmtree(ROOT / "mutants", ignore_errors=True)
    configure(target)
    keep_stage_arguments()
    try:
        mutmut_cli.cli(["run", "--max-children", str(os.cpu_count() or 2), *(names or target.functions or ())],
                       standalone_mode=False)
    except SystemExit as done:
        return int(done.code or 0)
    return 0


def results(target: Target) -> dict[str, str]:
    """Each of ``target``'s mutants and its verdict (killed, survived, timeout, no tests, ...)."""
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.stats import status_by_exit_code

    verdicts = {}
    for pattern in target.files:
        for path in sorted(ROOT.glob(pattern)):
            data = SourceFileMutationData(path=path.relative_to(ROOT))
            data.load()
            for name, code in data.exit_code_by_key.items():
                if target.functions is None or any(fnmatch.fnmatch(name, f) for f in target.functions):
                    verdicts[name] = status_by_exit_code[code]
    return verdicts


def report(module: str, verdicts: dict[str, str]) -> None:
    """Print the kill rate (timeouts count as killed: the mutant hung a test) and every survivor's name."""
    survivors = sorted(n for n, v in verdicts.items() if v not in ("killed", "timeout"))
    killed = len(verdicts) - len(survivors)
    print(f"\n{module}: killed {killed} / {len(verdicts)} mutants"
          f" ({100 * killed / max(len(verdicts), 1):.1f}%)")
    for name in survivors:
        print(f"  {verdicts[name]:10s} {name}")
    if survivors:
        print("Read one with: mutmut show <name>   (from the repository root)")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in MODULES:  # argv: MODULE [MUTANT_NAME_GLOB ...]
        if argv:
            print(f"unknown module {argv[0]!r}; the modules are:\n")
        list_modules()
        return 0 if not argv else 2
    os.chdir(ROOT)
    # one torch thread per worker: mutmut runs one worker per core
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # the tests find the shared data beside the checkout; from mutants/ they are one folder deeper
    os.environ.setdefault("MINIMIND_SHARED", str(ROOT.parent / "shared"))
    target = MODULES[argv[0]]
    code = run(target, argv[1:])
    report(argv[0], results(target))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
