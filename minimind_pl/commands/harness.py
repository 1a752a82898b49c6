"""``python main.py eval --harness TASKS``: EleutherAI's lm-evaluation-harness on our model (the ``eval`` extra).

Our model is an lm-eval ``TemplateLM``: lm-eval itself splits (context, continuation) pairs into tokens, exactly as
for its Hugging Face backend (trailing spaces move to the continuation, an empty context becomes the prefix token);
we score them in batches with the model's forward, make rolling windows with lm-eval's own window function, and
generate greedily with our KV-cache decoder, cutting at the task's stop strings. With ``--chat`` the prompts go
through the tokenizer's chat template (lm-eval's ``apply_chat_template``). The printed table is lm-eval's own.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from minimind_pl.commands.scoring import scored_logprobs
from minimind_pl.errors import UserError
from minimind_pl.generation import generate
from minimind_pl.model import MiniMindForCausalLM
from minimind_pl.tokenizer import Tokenizer

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's own default for generate_until


def import_lm_eval():
    """The ``lm_eval`` package, or a UserError that says how to install it."""
    try:
        import lm_eval
        import lm_eval.api.model  # noqa: F401  (the submodules this module uses)
        import lm_eval.utils  # noqa: F401
    except ImportError as exc:
        raise UserError("eval --harness needs EleutherAI's lm-evaluation-harness: pip install 'minimind_pl[eval]' "
                        "(or pip install lm-eval)") from exc
    return lm_eval


def harness_model(model: MiniMindForCausalLM, tokenizer: Tokenizer, batch_size: int, max_length: int):
    """An lm-eval ``TemplateLM`` that scores and generates with ``model`` (built here: lm-eval is optional)."""
    lm_eval = import_lm_eval()

    class MiniMindLM(lm_eval.api.model.TemplateLM):
        """lm-eval's view of a MiniMind model: log-likelihoods, rolling log-likelihoods, greedy generation."""

        def __init__(self) -> None:
            super().__init__()
            self.model, self.tok, self.batch_size, self.max_length = model, tokenizer, batch_size, max_length

        @property
        def eot_token_id(self) -> int:
            return self.tok.eos_id

        @property
        def prefix_token_id(self) -> int:
            return self.tok.bos_id  # what lm-eval's HF backend takes: the tokenizer's bos token

        @property
        def tokenizer_name(self) -> str:
            return f"minimind-{self.tok.fingerprint[:16]}"

        def chat_template(self, chat_template: Any = False) -> str:
            return self.tok.chat_template()

        def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
            return self.tok.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

        def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs: Any) -> list[int]:
            return self.tok.encode(string)  # MiniMind's tokenizer adds no special tokens

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
            return [(-nll, greedy) for nll, greedy in
                    scored_logprobs(self.model, [self._scored(context, continuation)
                                                 for _, context, continuation in requests], self.batch_size)]

        def _scored(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
            """The last max_length + 1 tokens of context + continuation, the continuation's marked for scoring."""
            ids = (context + continuation)[-(self.max_length + 1):]
            scored = len(continuation)
            return ids, [0] * (len(ids) - scored) + [1] * scored

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            utils = lm_eval.utils
            totals = []
            for (text,) in (request.args for request in requests):
                windows = [utils.make_disjoint_window(window) for window in utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)]
                totals.append(sum(logprob for logprob, _ in self._loglikelihood_tokens(
                    [(None, context, continuation) for context, continuation in windows])))
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            """Greedy answers, ``batch_size`` prompts with the same settings decoded together."""
            answers: list[str] = [""] * len(requests)
            groups: dict[str, list[int]] = {}
            for index, request in enumerate(requests):
                groups.setdefault(repr(sorted(request.args[1].items())), []).append(index)
            for indices in groups.values():
                for start in range(0, len(indices), self.batch_size):
                    chunk = indices[start:start + self.batch_size]
                    texts = self._generate([requests[i].args[0] for i in chunk], requests[chunk[0]].args[1])
                    for i, text in zip(chunk, texts):
                        answers[i] = text
            return answers

        def _generate(self, contexts: list[str], settings: dict[str, Any]) -> list[str]:
            if settings.get("do_sample") or settings.get("temperature", 0.0):
                raise UserError("eval --harness generates greedily; this task asks for sampling "
                                f"({settings}): set the task's generation_kwargs to do_sample: false")
            until = settings.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            new_tokens = int(settings.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            prompts = [self.tok_encode(context)[-max(self.max_length - new_tokens, 1):] for context in contexts]
            outputs = generate(self.model, prompts, max_new_tokens=new_tokens, do_sample=False,
                               eos_token_id=self.eot_token_id)
            return [cut_at_stop_strings(self.tok.decode(ids, skip_special_tokens=True), until) for ids in outputs]

    return MiniMindLM()


def cut_at_stop_strings(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the earliest occurrence of any stop string (all of it when none occurs)."""
    end = min((text.find(stop) for stop in stops if stop and stop in text), default=len(text))
    return text[:end]


def task_manager(include: Optional[str] = None, builtin: bool = True):
    """lm-eval's TaskManager: its built-in tasks (indexing them takes seconds) and the YAML files in ``include``."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include, include_defaults=builtin)


def run_harness(model: MiniMindForCausalLM, tokenizer: Tokenizer, tasks: str, manager, batch_size: int,
                max_length: int, limit: Optional[int], num_fewshot: Optional[int], chat: bool) -> dict[str, Any]:
    """Run lm-eval's ``simple_evaluate`` on comma-separated ``tasks`` known to ``manager`` (``task_manager``);
    prints lm-eval's table, returns its results."""
    lm_eval = import_lm_eval()
    names = [name.strip() for name in tasks.split(",") if name.strip()]
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        where = f" or in {manager.include_path}" if manager.include_path else ""
        raise UserError(f"unknown lm-eval task(s) {', '.join(unknown)}: not in lm-eval's task list{where} "
                        f"(python -m lm_eval ls tasks lists them; --harness_include DIR adds your own YAML)")
    results = lm_eval.simple_evaluate(model=harness_model(model, tokenizer, batch_size, max_length), tasks=names,
                                      num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                                      apply_chat_template=chat, log_samples=False)
    print(lm_eval.utils.make_table(results))
    return results
