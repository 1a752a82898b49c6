"""``python main.py eval --task tools``: the tool-call benchmark, and the writer of its task file.

Each task is a MiniMind agent-RL row, ``{"conversations": [system with "tools", user], "gt": [...]}``: the system
turn's ``tools`` (schemas, a list or JSON text) name the tools the task offers, and ``gt`` holds one value per call
the task needs (MiniMind's reward counts ``len(gt)`` as the expected calls). The model answers each task in the loop
of ``tools.run_episode`` (up to ``max_turns`` replies; calls run against the tools the task offers, by name, from the
built-in ones and ``--tools``), greedily, from a checkpoint in this process or from an OpenAI-compatible server
(``--endpoint``: vLLM, SGLang or our ``serve``, which parse the calls themselves).

Four figures, each with its 95% interval (``stats``): **task success** (share of tasks whose final answer holds every
``gt`` value, by MiniMind's substring-or-number rule, ``tools.values_found``; an unfinished task fails), **valid
calls** (share of all calls, invalid ``<tool_call>`` blocks included, that name an offered tool with arguments its
schema accepts; calls of one task are not independent, so this interval is narrower than it should be), **calls per
task** (mean) and **unfinished** (share of tasks still calling a tool on the last turn).

The shipped task file ``bench/tool_tasks.jsonl`` is written by :func:`write_tool_tasks`
(``python -m minimind_pl.commands.tool_eval bench/tool_tasks.jsonl``) from the built-in tools' tables with a
fixed seed; its arithmetic uses numbers from ``BENCHMARK_NUMBERS``, a range training prompts are to leave out.
"""

from __future__ import annotations

import json
import random
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from minimind_pl.chat_format import Reply, parse_reply
from minimind_pl.data.jsonl import read_jsonl
from minimind_pl.errors import UserError
from minimind_pl.files import atomic_file
from minimind_pl.generation import GREEDY, generate
from minimind_pl.model import MiniMindForCausalLM
from minimind_pl.stats import mean_interval, wilson_interval
from minimind_pl.tokenizer import Tokenizer
from minimind_pl.tools import (BUILTIN_TOOLS, EXCHANGE_RATES, TIMES, TRANSLATIONS, UNIT_FACTORS, WEATHER, Episode,
                               Tool, Toolbox, builtin_tools, calculate_math, run_episode, values_found,
                               with_builtin_tools)

Responder = Callable[[list[dict[str, Any]]], tuple[Reply, dict[str, Any]]]
SYSTEM_PROMPT = "You are a helpful assistant that can call tools."
BENCHMARK_NUMBERS = range(1000, 10000)  # operands of the benchmark's arithmetic (four digits)


# ====================================================================== tasks
@dataclass
class ToolTask:
    """One benchmark task: the conversation to answer, the names of the tools it offers, the expected values."""

    line: int
    messages: list[dict[str, Any]]
    tool_names: list[str]
    gt: list[Any]


def read_tool_tasks(path: str, limit: Optional[int] = None) -> list[ToolTask]:
    """The tasks of a jsonl file (UserError naming the line of a row that is not a task)."""
    tasks = []
    for line, record in read_jsonl(path, "--data", limit):
        record = record if isinstance(record, dict) else {}
        messages, gt = record.get("conversations"), record.get("gt")
        if not isinstance(messages, list) or not messages or not isinstance(gt, list) or not gt:
            raise UserError(f"{path}:{line}: a tool task needs `conversations` and a non-empty `gt` list")
        tools = messages[0].get("tools") if messages[0].get("role") == "system" else None
        tools = json.loads(tools) if isinstance(tools, str) else tools
        if not tools:
            raise UserError(f"{path}:{line}: the first turn must be a system turn listing the task's `tools`")
        names = [(t.get("function") or t).get("name") for t in tools]
        tasks.append(ToolTask(line, messages, names, gt))
    if not tasks:
        raise UserError(f"{path} holds no tasks")
    return tasks


def task_toolboxes(tasks: Sequence[ToolTask], tools: Sequence[Tool]) -> list[Toolbox]:
    """Per task, the tools it offers (by name, from ``tools``); UserError for a task offering a tool there is not."""
    by_name = {tool.name: tool for tool in tools}
    boxes = []
    for task in tasks:
        missing = [name for name in task.tool_names if name not in by_name]
        if missing:
            raise UserError(f"task of line {task.line} offers {', '.join(map(str, missing))}, which no tool "
                            f"implements (built in: {', '.join(BUILTIN_TOOLS)}; add your own with --tools)")
        boxes.append(Toolbox(by_name[name] for name in task.tool_names))
    return boxes


# ====================================================================== the model
def model_responder(model: MiniMindForCausalLM, tokenizer: Tokenizer, max_new_tokens: int) -> Responder:
    """A checkpoint's greedy replies, in this process (the raw reply text is kept as the assistant turn)."""

    def reply(messages: list[dict[str, Any]]) -> tuple[Reply, dict[str, Any]]:
        ids = tokenizer.encode_chat(messages)
        text = tokenizer.decode(generate(model, [ids], max_new_tokens, GREEDY, tokenizer.eos_id)[0],
                                skip_special_tokens=True)
        return parse_reply(text), {"role": "assistant", "content": text}

    return reply


def endpoint_responder(url: str, model: str, max_new_tokens: int, api_key: Optional[str] = None,
                       timeout: float = 600.0) -> Responder:
    """Greedy replies of an OpenAI-compatible server (``url`` up to ``/v1``, or its root): the system turn's tools go
    as the request's ``tools``, the calls come back parsed; ``<tool_call>`` blocks left in the content are invalid."""
    base = url.rstrip("/")
    endpoint = base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}

    def reply(messages: list[dict[str, Any]]) -> tuple[Reply, dict[str, Any]]:
        system = messages[0]
        sent = [{k: v for k, v in system.items() if k != "tools"}, *messages[1:]]
        tools = json.loads(system["tools"]) if isinstance(system.get("tools"), str) else system.get("tools")
        body = {"model": model, "messages": sent, "tools": tools, "temperature": 0.0, "max_tokens": max_new_tokens}
        request = urllib.request.Request(endpoint, json.dumps(body, ensure_ascii=False).encode(), headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                message = json.load(response)["choices"][0]["message"]
        except urllib.error.HTTPError as exc:
            raise UserError(f"{endpoint}: HTTP {exc.code}: {exc.read().decode('utf-8', 'replace')[:500]}") from exc
        except (urllib.error.URLError, OSError, KeyError, IndexError, ValueError) as exc:
            raise UserError(f"{endpoint}: no chat completion ({exc})") from exc
        content = message.get("content") or ""
        parsed = Reply(content, message.get("reasoning_content"), list(message.get("tool_calls") or []),
                       parse_reply(content).invalid_calls)
        return parsed, parsed.message()

    return reply


# ====================================================================== scores
def task_solved(task: ToolTask, episode: Episode) -> bool:
    """The task's final answer holds every ``gt`` value (an unfinished episode has no final answer)."""
    return not episode.unfinished and len(values_found(episode.answer, task.gt)) == len(task.gt)


def tool_scores(tasks: Sequence[ToolTask], episodes: Sequence[Episode]) -> dict[str, float]:
    """The benchmark's four figures and their 95% intervals (``<name>_low`` / ``<name>_high``)."""
    n, calls = len(tasks), sum(e.calls for e in episodes)
    shares = {"task_success": (sum(map(task_solved, tasks, episodes)) / n, n),
              "valid_calls": (sum(e.valid_calls for e in episodes) / calls if calls else 0.0, calls),
              "unfinished": (sum(e.unfinished for e in episodes) / n, n)}
    scores: dict[str, float] = {"tasks": n, "calls": calls}
    for name, (share, count) in shares.items():
        scores[name] = share
        scores[f"{name}_low"], scores[f"{name}_high"] = wilson_interval(share, count)
    scores["calls_per_task"], scores["calls_per_task_low"], scores["calls_per_task_high"] = mean_interval(
        [float(e.calls) for e in episodes])
    return scores


def run_tool_benchmark(tasks: Sequence[ToolTask], respond: Responder, tools: Sequence[Tool],
                       max_turns: int = 3) -> tuple[dict[str, float], list[Episode]]:
    """Answer every task (in file order) and score the episodes."""
    episodes = [run_episode(respond, task.messages, box, max_turns)
                for task, box in zip(tasks, task_toolboxes(tasks, tools))]
    return tool_scores(tasks, episodes), episodes


def score_lines(scores: dict[str, float]) -> list[str]:
    """The figures as the command prints them."""
    def share(name: str) -> str:
        return f"{scores[name]:.1%} [{scores[name + '_low']:.1%}, {scores[name + '_high']:.1%}]"

    return [f"task success    {share('task_success')} of {int(scores['tasks'])} tasks",
            f"valid calls     {share('valid_calls')} of {int(scores['calls'])} calls",
            f"calls per task  {scores['calls_per_task']:.2f} [{scores['calls_per_task_low']:.2f}, "
            f"{scores['calls_per_task_high']:.2f}]",
            f"unfinished      {share('unfinished')} of {int(scores['tasks'])} tasks"]


def tool_eval_command(data: str, ckpt: Optional[str], endpoint: Optional[str], checkpoint_model: Callable[[], Any],
                      tools: Sequence[Tool] = (), max_turns: int = 3, max_new_tokens: int = 256,
                      endpoint_model: str = "minimind", api_key: Optional[str] = None,
                      limit: Optional[int] = None) -> dict[str, float]:
    """``eval --task tools`` (``evaluate.eval_command``'s hook): the benchmark on ``data`` against a checkpoint
    (``checkpoint_model()`` -> ``(model, tokenizer)``, built only when there is no endpoint) or an endpoint."""
    if (ckpt is None) == (endpoint is None):
        raise UserError("eval --task tools scores a checkpoint or an --endpoint: give exactly one")
    tasks = read_tool_tasks(data, limit)
    if endpoint is not None:
        respond = endpoint_responder(endpoint, endpoint_model, max_new_tokens, api_key)
    else:
        respond = model_responder(*checkpoint_model(), max_new_tokens)
    scores, _ = run_tool_benchmark(tasks, respond, with_builtin_tools(tools), max_turns)
    print(f"{data} ({ckpt or endpoint}):")
    print("\n".join("  " + line for line in score_lines(scores)))
    return scores


# ====================================================================== the shipped task file
def _task(rng: random.Random, question: str, names: Sequence[str], gt: Sequence[Any]) -> dict[str, Any]:
    """A task row offering ``names`` plus one other built-in tool (a distractor), in a shuffled order."""
    offered = list(names) + [rng.choice([n for n in BUILTIN_TOOLS if n not in names])]
    rng.shuffle(offered)
    schemas = [tool.schema() for tool in builtin_tools(offered)]
    return {"conversations": [{"role": "system", "content": SYSTEM_PROMPT, "tools": schemas},
                              {"role": "user", "content": question}], "gt": [str(v) for v in gt]}


def tool_task_rows(seed: int = 2027, per_tool: int = 4) -> list[dict[str, Any]]:
    """The benchmark's tasks: ``per_tool`` single-call tasks per built-in tool and as many two-call tasks, with
    every ``gt`` worked out from the tools' own tables (the calculator's for arithmetic)."""
    rng = random.Random(seed)
    units = {"km_miles": ("公里", "英里"), "kg_pounds": ("千克", "磅"), "meters_feet": ("米", "英尺"),
             "miles_km": ("英里", "公里")}
    zones = {"Asia/Tokyo": "东京", "Europe/London": "伦敦", "America/New_York": "纽约", "Australia/Sydney": "悉尼"}
    currencies = {"USD": "美元", "EUR": "欧元", "GBP": "英镑", "JPY": "日元", "CNY": "人民币", "AUD": "澳元"}
    cities, zone_names = rng.sample(sorted(WEATHER), per_tool), rng.sample(sorted(zones), min(per_tool, len(zones)))
    pairs, texts = rng.sample(sorted(EXCHANGE_RATES), per_tool), rng.sample(sorted(TRANSLATIONS), per_tool)
    rows = []
    for i in range(per_tool):
        a, b = rng.sample(BENCHMARK_NUMBERS, 2)
        rows.append(_task(rng, f"帮我算一下 {a} 乘以 {b} 等于多少", ["calculate_math"],
                          [calculate_math(f"{a}*{b}")["result"]]))
        pair, value = rng.choice(sorted(UNIT_FACTORS.keys() & units.keys())), rng.randint(2, 500)
        rows.append(_task(rng, f"把{value}{units[pair][0]}换算成{units[pair][1]}", ["unit_converter"],
                          [round(value * UNIT_FACTORS[pair], 4)]))
        rows.append(_task(rng, f"{cities[i]}今天天气怎么样？", ["get_current_weather"], [WEATHER[cities[i]][0]]))
        zone = zone_names[i % len(zone_names)]
        rows.append(_task(rng, f"{zones[zone]}现在几点了？（时区 {zone}）", ["get_current_time"], [TIMES[zone][11:16]]))
        (source, target), (text, language) = pairs[i], texts[i]
        rows.append(_task(rng, f"查一下{currencies[source]}兑{currencies[target]}的汇率", ["get_exchange_rate"],
                          [EXCHANGE_RATES[source, target]]))
        rows.append(_task(rng, f"把'{text}'翻译成{'英文' if language == 'english' else '中文'}", ["translate_text"],
                          [TRANSLATIONS[text, language]]))
        first, second = rng.sample([c for c in sorted(WEATHER) if c not in cities], 2)
        rows.append(_task(rng, f"{first}和{second}今天天气怎么样？", ["get_current_weather"],
                          [WEATHER[first][0], WEATHER[second][0]]))
    return rows


def write_tool_tasks(path: str | Path, seed: int = 2027, per_tool: int = 4) -> int:
    """Write :func:`tool_task_rows` as jsonl; returns the number of tasks."""
    rows = tool_task_rows(seed, per_tool)
    with atomic_file(Path(path)) as f:
        f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8"))
    return len(rows)


if __name__ == "__main__":  # python -m minimind_pl.commands.tool_eval OUT.jsonl
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m minimind_pl.commands.tool_eval OUT.jsonl")
    print(f"{write_tool_tasks(sys.argv[1])} tasks written to {sys.argv[1]}")
