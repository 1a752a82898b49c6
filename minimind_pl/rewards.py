"""Rewards for the RL stages: small, typed functions of a sampled answer, chosen and weighted in YAML.

A reward scores a batch of :class:`Sample` s (the prompt as the model saw it, the answer it wrote, the record's
ground truth ``gt`` if any) and returns one float per sample. The RL stages sum ``weight × score`` over their
``rewards`` list and log every part as ``train/reward/<name>``. In a config::

    rewards:
      - class_path: minimind_pl.rewards.AnswerMatch
        init_args: {mode: numeric}
      - class_path: minimind_pl.rewards.LengthShaping
        init_args: {weight: 0.5}

MiniMind's reward (``trainer/train_grpo.py``, ``train_ppo.py``) is the sum of ``LengthShaping``,
``ThinkingFormat``, ``RepetitionPenalty`` and a reward model's score clipped to ±3 (``RewardModel``), each
with weight 1. A new reward subclasses :class:`Reward` and implements ``score``.
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from minimind_pl.chat_format import THINK_CLOSE, rendered_turns, split_reasoning

_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
_WORD = re.compile(r"\w+|[^\w\s]")


@dataclass(frozen=True)
class Sample:
    """One sampled answer as a reward sees it.

    Args:
        prompt: the prompt text the model continued (the rendered chat, special tokens included).
        completion: the answer the model wrote (special tokens removed); after an open ``<think>`` it starts with
            the reasoning.
        gt: the record's ground truth (its ``gt`` field as text), if it has one.
    """

    prompt: str
    completion: str
    gt: Optional[str] = None

    @property
    def answer(self) -> str:
        """The final answer: the text after the reasoning's first ``</think>`` (the whole completion without one),
        stripped; ``chat_format.split_reasoning`` says why the first."""
        return split_reasoning(self.completion)[0]


class Reward:
    """A reward function: ``score(samples)`` gives one float per sample; the stage multiplies it by ``weight``.

    Args:
        weight: how much this reward counts in the sum the stage optimises.
    """

    #: The name the parts are logged under (``train/reward/<name>``).
    name = "reward"

    def __init__(self, weight: float = 1.0) -> None:
        self.weight = float(weight)

    def score(self, samples: Sequence[Sample]) -> list[float]:
        """One score per sample (subclasses implement)."""
        raise NotImplementedError

    def to(self, device: Any) -> "Reward":
        """Move any model this reward holds to ``device`` (nothing to move by default)."""
        return self

    def describe(self) -> dict[str, Any]:
        """``{"class_path", "init_args"}`` as a config names this reward (plain values, for a checkpoint's record):
        each argument of ``__init__`` read from the attribute of the same name."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        args = {n: getattr(self, n) for n in names if isinstance(getattr(self, n, None), (str, int, float, bool))}
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": args}


class AnswerMatch(Reward):
    """A verifiable reward: the answer against the record's ground truth ``gt``.

    Args:
        mode: ``"numeric"``: the last number in the answer equals ``gt`` as a number (within ``tolerance``);
            ``"exact"``: the answer equals ``gt`` after trimming whitespace and a final full stop;
            ``"contains"``: ``gt`` appears in the answer.
        correct: the score of a right answer.
        wrong: the score of a wrong answer (or one without a number in ``numeric`` mode).
        tolerance: how far a numeric answer may be from ``gt``.
        weight: see :class:`Reward`.
    """

    name = "answer"
    MODES = ("numeric", "exact", "contains")

    def __init__(self, mode: str = "numeric", correct: float = 1.0, wrong: float = 0.0, tolerance: float = 1e-6,
                 weight: float = 1.0) -> None:
        super().__init__(weight)
        if mode not in self.MODES:
            raise ValueError(f"AnswerMatch mode must be one of {', '.join(self.MODES)}, got {mode!r}")
        self.mode, self.correct, self.wrong, self.tolerance = mode, float(correct), float(wrong), float(tolerance)

    def is_right(self, answer: str, gt: str) -> bool:
        """Whether ``answer`` matches ``gt`` in this reward's mode."""
        if self.mode == "contains":
            return gt.strip() in answer
        if self.mode == "exact":
            return answer.strip().rstrip(".。").strip() == gt.strip().rstrip(".。").strip()
        numbers = _NUMBER.findall(answer)
        try:
            return bool(numbers) and math.isclose(float(numbers[-1]), float(gt), abs_tol=self.tolerance)
        except ValueError as err:
            raise ValueError(f"AnswerMatch(mode='numeric') needs numeric gt values, got {gt!r}") from err

    def score(self, samples: Sequence[Sample]) -> list[float]:
        """``correct`` or ``wrong`` per sample; a sample without ``gt`` is an error (the data has no answers)."""
        if any(s.gt is None for s in samples):
            raise ValueError("AnswerMatch needs a 'gt' field (the ground truth) in every prompt record")
        return [self.correct if self.is_right(s.answer, s.gt) else self.wrong for s in samples]


def _in_range(text: str, low: int, high: int) -> bool:
    """Whether ``text`` (stripped) has between ``low`` and ``high`` characters."""
    return low <= len(text.strip()) <= high


class LengthShaping(Reward):
    """MiniMind's length term: ``inside`` when the whole completion has ``min_chars``..``max_chars`` characters,
    ``outside`` otherwise (MiniMind: +0.5 within 20..800, else -0.5).

    Args:
        min_chars: the shortest accepted completion, in characters.
        max_chars: the longest accepted completion, in characters.
        inside: the score within that range.
        outside: the score outside it.
        weight: see :class:`Reward`.
    """

    name = "length"

    def __init__(self, min_chars: int = 20, max_chars: int = 800, inside: float = 0.5, outside: float = -0.5,
                 weight: float = 1.0) -> None:
        super().__init__(weight)
        self.min_chars, self.max_chars, self.inside, self.outside = min_chars, max_chars, inside, outside

    def score(self, samples: Sequence[Sample]) -> list[float]:
        """``inside`` or ``outside`` per sample."""
        return [self.inside if _in_range(s.completion, self.min_chars, self.max_chars) else self.outside
                for s in samples]


class ThinkingFormat(Reward):
    """MiniMind's reasoning-format terms, for completions that close a ``<think>`` block: reasoning of
    ``min_chars``..``max_chars`` characters scores ``good_length`` (else ``bad_length``), exactly one
    ``</think>`` scores ``single`` (else ``repeated``). MiniMind: +1.0 within 20..300 else -0.5; +0.25 / -0.25.

    Args:
        min_chars, max_chars: the accepted length of the reasoning.
        good_length, bad_length: scores for the reasoning's length.
        single, repeated: scores for one ``</think>`` versus several.
        missing: the score of a completion without ``</think>`` (MiniMind: 0; set it below 0 to require reasoning).
        weight: see :class:`Reward`.
    """

    name = "thinking"

    def __init__(self, min_chars: int = 20, max_chars: int = 300, good_length: float = 1.0, bad_length: float = -0.5,
                 single: float = 0.25, repeated: float = -0.25, missing: float = 0.0, weight: float = 1.0) -> None:
        super().__init__(weight)
        self.min_chars, self.max_chars = min_chars, max_chars
        self.good_length, self.bad_length, self.single, self.repeated = good_length, bad_length, single, repeated
        self.missing = missing

    def score_one(self, completion: str) -> float:
        """The format score of one completion."""
        reasoning, closed, _ = completion.partition(THINK_CLOSE)  # the first tag, as split_reasoning splits
        if not closed:
            return self.missing
        # MiniMind counts the reasoning unstripped of an opening tag written here (split_reasoning drops it)
        length = self.good_length if _in_range(reasoning, self.min_chars, self.max_chars) else self.bad_length
        return length + (self.single if completion.count(THINK_CLOSE) == 1 else self.repeated)

    def score(self, samples: Sequence[Sample]) -> list[float]:
        """The format score per sample."""
        return [self.score_one(s.completion) for s in samples]


def repeated_ngram_share(text: str, n: int = 3) -> float:
    """Share of the word ``n``-grams of ``text`` that repeat an earlier one (words: ``\\w+`` runs and punctuation,
    lower-cased); 0 for texts shorter than ``n`` words."""
    words = _WORD.findall(text.lower())
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


class RepetitionPenalty(Reward):
    """MiniMind's repetition term on the final answer: ``-min(cap, 2 · cap · repeated 3-gram share)``.

    Args:
        n: n-gram size (MiniMind: 3).
        cap: the largest penalty (MiniMind: 0.5).
        weight: see :class:`Reward`.
    """

    name = "repetition"

    def __init__(self, n: int = 3, cap: float = 0.5, weight: float = 1.0) -> None:
        super().__init__(weight)
        self.n, self.cap = n, cap

    def score(self, samples: Sequence[Sample]) -> list[float]:
        """A score <= 0 per sample."""
        return [-min(self.cap, 2 * self.cap * repeated_ngram_share(s.answer, self.n)) for s in samples]


class RewardModel(Reward):
    """A reward model's score of the answer, clipped to ``±clip`` (MiniMind: InternLM2-1.8B-reward, ±3).

    Loaded through transformers (``pip install -e ".[rl]"``) from a Hugging Face folder or hub name on first use:
    a sequence-classification model with one label (``AutoModelForSequenceClassification``; the score is its
    logit), or a model with its own ``get_score(tokenizer, messages)`` (InternLM2's reward models, which need
    ``trust_remote_code``). As in MiniMind, earlier turns are folded into the last user message, so the reward
    model sees one question and one answer.

    Args:
        path: the model's folder (or hub name).
        clip: scores are clipped to ``[-clip, clip]``.
        trust_remote_code: let transformers run the model's own code (InternLM2).
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        max_length: tokens of a scored conversation (longer ones keep their start).
        weight: see :class:`Reward`.
    """

    name = "reward_model"

    def __init__(self, path: str, clip: float = 3.0, trust_remote_code: bool = False, dtype: str = "float32",
                 max_length: int = 2048, weight: float = 1.0) -> None:
        super().__init__(weight)
        self.path, self.clip, self.trust_remote_code, self.dtype = path, float(clip), trust_remote_code, dtype
        self.max_length = max_length
        self._device: Any = "cpu"
        self._model: Any = None
        self._tokenizer: Any = None

    def load(self) -> None:
        """Load the tokenizer and model (once)."""
        if self._model is not None:
            return
        try:
            import torch
            import transformers
        except ImportError as err:
            raise ImportError("RewardModel needs transformers: pip install -e '.[rl]'") from err
        kwargs = {"trust_remote_code": self.trust_remote_code, "torch_dtype": getattr(torch, self.dtype)}
        self._tokenizer = transformers.AutoTokenizer.from_pretrained(self.path, trust_remote_code=self.trust_remote_code)
        config = transformers.AutoConfig.from_pretrained(self.path, trust_remote_code=self.trust_remote_code)
        auto = (transformers.AutoModel if getattr(config, "auto_map", {}).get("AutoModel") and self.trust_remote_code
                else transformers.AutoModelForSequenceClassification)
        self._model = auto.from_pretrained(self.path, **kwargs).to(self._device).eval().requires_grad_(False)

    def to(self, device: Any) -> "RewardModel":
        """Keep the model on ``device`` (moved now if loaded, else when it loads)."""
        self._device = device
        if self._model is not None:
            self._model.to(device)
        return self

    @staticmethod
    def conversation(sample: Sample) -> list[dict[str, str]]:
        """The two turns the reward model scores: the question (with earlier turns folded in) and the answer."""
        turns = rendered_turns(sample.prompt)
        question = turns[-1]["content"] if turns else ""
        history = "\n".join(f"{m['role']}: {m['content']}" for m in turns[:-1])
        if history:  # MiniMind's wording: "the above is the history; my new question is"
            question = f"{history}\n以上是对话历史。我的新问题是：\n{question}"
        return [{"role": "user", "content": question}, {"role": "assistant", "content": sample.answer}]

    def score(self, samples: Sequence[Sample]) -> list[float]:
        """The clipped score per sample."""
        import torch

        self.load()
        scores = []
        with torch.no_grad():
            for sample in samples:
                messages = self.conversation(sample)
                if hasattr(self._model, "get_score"):
                    value = float(self._model.get_score(self._tokenizer, messages))
                else:
                    text = self._tokenizer.apply_chat_template(messages, tokenize=False)
                    ids = self._tokenizer(text, return_tensors="pt", truncation=True, max_length=self.max_length,
                                          add_special_tokens=False)["input_ids"]
                    value = float(self._model(input_ids=ids.to(self._model.device)).logits[0, 0])
                scores.append(max(-self.clip, min(self.clip, value)))
        return scores


def minimind_rewards() -> list[Reward]:
    """MiniMind's rule-based terms, each with weight 1 (its reward model comes on top: ``RewardModel``)."""
    return [LengthShaping(), ThinkingFormat(), RepetitionPenalty()]


def total_rewards(rewards: Sequence[Reward], samples: Sequence[Sample]) -> tuple[list[float], dict[str, list[float]]]:
    """``(Σ weight × score per sample, {name: scores})`` of ``rewards`` (names made unique by a suffix)."""
    totals = [0.0] * len(samples)
    parts: dict[str, list[float]] = {}
    for reward in rewards:
        scores = reward.score(samples)
        if len(scores) != len(samples):
            raise ValueError(f"{type(reward).__name__} returned {len(scores)} scores for {len(samples)} samples")
        name, k = reward.name, 2
        while name in parts:
            name, k = f"{reward.name}_{k}", k + 1
        parts[name] = list(scores)
        totals = [t + reward.weight * s for t, s in zip(totals, scores)]
    return totals, parts
