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

MiniMind's agent reward (``trainer/train_agent.py``) scores a multi-turn tool episode (:class:`ToolEpisode`, on
``Sample.episode``): with calls by ``ToolCallCount``, ``GroundTruthRecall`` and ``UnfinishedPenalty``, without by
its GRPO terms (each wrapped in ``WithoutToolCalls``), both by ``ToolTagBalance`` and ``RepetitionPenalty``
(:func:`agent_rewards`), the total clipped to ±3 (``total_rewards(..., clip=3)``).
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from minimind_pl.chat_format import THINK_CLOSE, TOOL_CLOSE, TOOL_OPEN, parse_reply, rendered_turns, split_reasoning
from minimind_pl.tools import Toolbox

_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
_WORD = re.compile(r"\w+|[^\w\s]")
_STANDALONE_NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?![\w.])")  # not part of a word or a longer number
_WHOLE_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


@dataclass(frozen=True)
class ToolEpisode:
    """A multi-turn tool episode as the agent rewards see it.

    Args:
        replies: The text of each of the model's replies, in order (decoded without special tokens).
        call_validity: Per call the model wrote, in order: whether it named a known tool with arguments its schema
            accepts (a ``<tool_call>`` block that is not a call counts as an invalid call).
        unfinished: The model was still calling tools on its last allowed reply.
        gt: The values the final answer should hold (the record's ``gt`` list, as text).
    """

    replies: tuple[str, ...]
    call_validity: tuple[bool, ...] = ()
    unfinished: bool = False
    gt: tuple[str, ...] = ()

    @classmethod
    def from_replies(cls, replies: Sequence[str], toolbox: Toolbox, gt: Sequence[Any] = (),
                     unfinished: bool = False) -> "ToolEpisode":
        """The record of an episode from its replies: calls read by ``chat_format.parse_reply`` from each reply's
        answer (after the first ``</think>``, as MiniMind reads them: a call inside the reasoning is no call) and
        checked by ``toolbox`` (the calls of an unfinished episode's last reply too, which were never run)."""
        validity: list[bool] = []
        for reply in replies:
            parsed = parse_reply(split_reasoning(reply)[0])
            validity += [toolbox.check(call)[2] is None for call in parsed.tool_calls]
            validity += [False] * len(parsed.invalid_calls)
        return cls(tuple(replies), tuple(validity), unfinished, tuple(str(g) for g in gt))

    @property
    def answers(self) -> list[str]:
        """Each reply after its reasoning (the first ``</think>``), stripped."""
        return [split_reasoning(reply)[0] for reply in self.replies]

    @property
    def final_text(self) -> str:
        """What the episode finally says: the last reply's answer after its last ``</tool_call>``; empty when
        unfinished (MiniMind's ``final_text``)."""
        if self.unfinished or not self.replies:
            return ""
        return self.answers[-1].rpartition(TOOL_CLOSE)[2]

    @property
    def scored_text(self) -> str:
        """The text the repetition penalty reads: ``final_text``, or the last reply's answer when that is empty."""
        return self.final_text or (self.answers[-1] if self.replies else "")


@dataclass(frozen=True)
class Sample:
    """One sampled answer as a reward sees it.

    Args:
        prompt: the prompt text the model continued (the rendered chat, special tokens included).
        completion: the answer the model wrote (special tokens removed); after an open ``<think>`` it starts with
            the reasoning.
        gt: the record's ground truth (its ``gt`` field as text), if it has one.
        episode: the multi-turn tool episode this answer ends (agentic RL), if any.
    """

    prompt: str
    completion: str
    gt: Optional[str] = None
    episode: Optional[ToolEpisode] = None

    @property
    def answer(self) -> str:
        """The final answer: the text after the reasoning's first ``</think>`` (the whole completion without one),
        stripped; ``chat_format.split_reasoning`` says why the first. For an episode that called tools, its
        ``scored_text`` (MiniMind scores repetition there)."""
        if self.episode is not None and self.episode.call_validity:
            return self.episode.scored_text
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


def clipped(value: float, bound: float) -> float:
    """``value`` clipped to ``[-bound, bound]``."""
    return max(-bound, min(bound, value))


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


class EpisodeReward(Reward):
    """A reward of the tool episode (``Sample.episode``) alone: subclasses implement ``score_episode``."""

    def score_episode(self, episode: ToolEpisode) -> float:
        """The score of one episode (subclasses implement)."""
        raise NotImplementedError

    def score(self, samples: Sequence[Sample]) -> list[float]:
        """One score per sample's episode (an error when a sample has none: not an agentic RL stage)."""
        if any(s.episode is None for s in samples):
            raise ValueError(f"{type(self).__name__} scores tool episodes: it needs an agentic RL stage")
        return [self.score_episode(s.episode) for s in samples]


class ToolCallCount(EpisodeReward):
    """MiniMind's call-count term, for episodes that called tools (0 for others): ``match`` when the valid calls
    number ``len(gt)`` and none is invalid, else ``-miss`` per missing, extra or invalid call.

    Args:
        match: the score of the right number of valid calls (MiniMind: 0.5).
        miss: the cost of each call missing, extra or invalid (MiniMind: 0.5).
        weight: see :class:`Reward`.
    """

    name = "tool_calls"

    def __init__(self, match: float = 0.5, miss: float = 0.5, weight: float = 1.0) -> None:
        super().__init__(weight)
        self.match, self.miss = float(match), float(miss)

    def score_episode(self, episode: ToolEpisode) -> float:
        """The term of one episode."""
        if not episode.call_validity:
            return 0.0
        valid = sum(episode.call_validity)
        gap = abs(valid - len(episode.gt)) + (len(episode.call_validity) - valid)
        return self.match if gap == 0 else -self.miss * gap


def gt_found(text: str, gt: Sequence[str]) -> set[str]:
    """The ``gt`` values ``text`` holds: as a substring (ignoring case), or, for a number, as a standalone number
    within 1e-6 (thousands commas ignored on both sides)."""
    numbers = [float(n) for n in _STANDALONE_NUMBER.findall(text.replace(",", ""))]
    found = set()
    for value in gt:
        wanted = value.strip()
        plain = wanted.replace(",", "")
        if (wanted and wanted.lower() in text.lower()) or (
                _WHOLE_NUMBER.fullmatch(plain) and any(abs(float(plain) - n) < 1e-6 for n in numbers)):
            found.add(value)
    return found


class GroundTruthRecall(EpisodeReward):
    """MiniMind's answer term, for episodes that called tools and have ``gt``: ``scale`` × the share of the ``gt``
    values (distinct ones, over all of them) found in the final answer (:func:`gt_found`); an unfinished
    episode has none.

    Args:
        scale: the score of an answer holding every value (MiniMind: 2.5).
        weight: see :class:`Reward`.
    """

    name = "gt_recall"

    def __init__(self, scale: float = 2.5, weight: float = 1.0) -> None:
        super().__init__(weight)
        self.scale = float(scale)

    def score_episode(self, episode: ToolEpisode) -> float:
        """The term of one episode."""
        if not (episode.call_validity and episode.gt):
            return 0.0
        return self.scale * len(gt_found(episode.final_text, episode.gt)) / len(episode.gt)


class UnfinishedPenalty(EpisodeReward):
    """MiniMind's cost of an episode still calling tools on its last allowed reply: ``-penalty``.

    Args:
        penalty: the cost (MiniMind: 0.5).
        weight: see :class:`Reward`.
    """

    name = "unfinished"

    def __init__(self, penalty: float = 0.5, weight: float = 1.0) -> None:
        super().__init__(weight)
        self.penalty = float(penalty)

    def score_episode(self, episode: ToolEpisode) -> float:
        """The term of one episode."""
        return -self.penalty if episode.unfinished and episode.call_validity else 0.0


class ToolTagBalance(EpisodeReward):
    """MiniMind's cost of unbalanced call tags, with or without calls: ``-penalty`` × Σ over replies (after their
    reasoning) of ``|count(<tool_call>) - count(</tool_call>)|``.

    Args:
        penalty: the cost of each unmatched tag (MiniMind: 0.5).
        weight: see :class:`Reward`.
    """

    name = "tool_tags"

    def __init__(self, penalty: float = 0.5, weight: float = 1.0) -> None:
        super().__init__(weight)
        self.penalty = float(penalty)

    def score_episode(self, episode: ToolEpisode) -> float:
        """The term of one episode."""
        return -self.penalty * sum(abs(a.count(TOOL_OPEN) - a.count(TOOL_CLOSE)) for a in episode.answers)


class WithoutToolCalls(Reward):
    """Another reward, scored only on samples whose episode called no tool (0 on the others, which it never sees):
    MiniMind's agent reward scores answers without calls by its GRPO terms (length, thinking, reward model).

    Args:
        reward: the reward to restrict; its ``name`` and ``weight`` are this one's.
    """

    def __init__(self, reward: Reward) -> None:
        super().__init__(reward.weight)
        self.reward, self.name = reward, reward.name

    def score(self, samples: Sequence[Sample]) -> list[float]:
        """The inner reward's score per sample without calls, 0 per sample with calls."""
        plain = [i for i, s in enumerate(samples) if s.episode is None or not s.episode.call_validity]
        scores = [0.0] * len(samples)
        for i, value in zip(plain, self.reward.score([samples[i] for i in plain]) if plain else []):
            scores[i] = value
        return scores

    def to(self, device: Any) -> "WithoutToolCalls":
        """Move the inner reward's model."""
        self.reward.to(device)
        return self

    def describe(self) -> dict[str, Any]:
        """As :meth:`Reward.describe`, with the inner reward described in its place."""
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}",
                "init_args": {"reward": self.reward.describe()}}


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
                scores.append(clipped(value, self.clip))
        return scores


def minimind_rewards() -> list[Reward]:
    """MiniMind's rule-based terms, each with weight 1 (its reward model comes on top: ``RewardModel``)."""
    return [LengthShaping(), ThinkingFormat(), RepetitionPenalty()]


def agent_rewards(reward_model: Optional[RewardModel] = None) -> list[Reward]:
    """MiniMind's agent reward, each term with weight 1 (sum them with ``total_rewards(..., clip=3.0)``): the call
    terms for episodes with calls, its length (5..800 characters), thinking and reward-model terms for those
    without, the tag balance and the repetition penalty for both."""
    plain = [LengthShaping(min_chars=5), ThinkingFormat()] + ([reward_model] if reward_model is not None else [])
    return ([ToolTagBalance()] + [WithoutToolCalls(r) for r in plain]
            + [ToolCallCount(), GroundTruthRecall(), UnfinishedPenalty(), RepetitionPenalty()])


def total_rewards(rewards: Sequence[Reward], samples: Sequence[Sample],
                  clip: Optional[float] = None) -> tuple[list[float], dict[str, list[float]]]:
    """``(Σ weight × score per sample, {name: scores})`` of ``rewards`` (names made unique by a suffix); with
    ``clip``, each total is clipped to ``[-clip, clip]`` (MiniMind's agent reward: 3), the parts are not."""
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
    if clip is not None:
        totals = [clipped(t, clip) for t in totals]
    return totals, parts
