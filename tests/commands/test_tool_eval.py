"""The tool-call benchmark: a scripted model that makes known calls gets the scores worked out by hand, the same in
this process and through our own server; the CLI hook, user tools by class_path, and the shipped task file."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import random_model, write_stage_checkpoint
from minimind_pl.cli import main
from minimind_pl.commands.serve import ChatEngine
from minimind_pl.commands.tool_eval import (model_responder, read_tool_tasks, run_tool_benchmark, tool_task_rows,
                                            write_tool_tasks)
from minimind_pl.errors import UserError
from minimind_pl.tokenizer import Tokenizer
from minimind_pl.tools import Toolbox, builtin_tools, values_found
from scripted_model import ScriptedModel, start

SHIPPED_TASKS = Path(__file__).resolve().parents[2] / "bench" / "tool_tasks.jsonl"
CALL = '<tool_call>\n{"name": "calculate_math", "arguments": {"expression": "256*37"}}\n</tool_call>'
ANSWER = "256 × 37 = 9472."
# Wilson 95% interval of 2/3 (z = 1.96), worked out by hand: centre (2/3 + z²/6) / (1 + z²/3), half-width
# z / (1 + z²/3) * sqrt((2/9)/3 + z²/36).
TWO_OF_THREE = (0.2077, 0.9385)


def task(tools, gt):
    system = {"role": "system", "content": "Use tools.", "tools": Toolbox(builtin_tools(tools)).schemas()}
    return {"conversations": [system, {"role": "user", "content": "256 times 37?"}], "gt": gt}


@pytest.fixture(scope="module")
def tokenizer(shared_dir):
    return Tokenizer.from_file(shared_dir / "minimind")


@pytest.fixture(scope="module")
def tasks_file(tmp_path_factory):
    """Three tasks the scripted model meets differently: solved with a valid call; solved though the call names a
    tool the task does not offer (invalid); a valid call but an answer without the expected value."""
    path = tmp_path_factory.mktemp("tools") / "tasks.jsonl"
    rows = [task(["calculate_math"], ["9472"]), task(["get_current_time"], ["9472"]),
            task(["get_current_time", "calculate_math"], ["12:00"])]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


@pytest.fixture(scope="module")
def scripted_model(tokenizer):
    """Calls the calculator, then (once a tool response is in its prompt) answers."""
    return ScriptedModel(tokenizer.encode(CALL), eos=tokenizer.eos_id, after_tool=tokenizer.encode(ANSWER))


def check_hand_scores(scores):
    assert (scores["tasks"], scores["calls"]) == (3, 3)
    assert scores["task_success"] == pytest.approx(2 / 3) and scores["valid_calls"] == pytest.approx(2 / 3)
    for name in ("task_success", "valid_calls"):
        assert (scores[f"{name}_low"], scores[f"{name}_high"]) == pytest.approx(TWO_OF_THREE, abs=1e-4)
    assert (scores["calls_per_task"], scores["calls_per_task_low"], scores["calls_per_task_high"]) == (1, 1, 1)
    assert scores["unfinished"] == 0 and scores["unfinished_low"] == 0
    assert scores["unfinished_high"] == pytest.approx(1.96 ** 2 / 3 / (1 + 1.96 ** 2 / 3), abs=1e-9)


def test_scores_of_a_scripted_model_in_process(tasks_file, scripted_model, tokenizer):
    tasks = read_tool_tasks(str(tasks_file))
    scores, episodes = run_tool_benchmark(tasks, model_responder(scripted_model, tokenizer, 64), builtin_tools())
    check_hand_scores(scores)
    assert json.loads(episodes[0].messages[-2]["content"]) == {"result": "9472"}  # the real result went back
    assert "unknown tool 'calculate_math'" in episodes[1].messages[-2]["content"]
    cut, _ = run_tool_benchmark(tasks, model_responder(scripted_model, tokenizer, 64), builtin_tools(), max_turns=1)
    assert cut["unfinished"] == 1 and cut["task_success"] == 0 and cut["calls_per_task"] == 1


def test_the_same_scores_through_our_server_and_the_cli(tasks_file, scripted_model, tokenizer, capsys):
    server, url = start(ChatEngine(scripted_model, tokenizer, model_name="scripted"))
    try:
        scores = main(["eval", "--task", "tools", "--data", str(tasks_file), "--endpoint", url,
                       "--endpoint_model", "scripted", "--max_new_tokens", "64"])
        check_hand_scores(scores)
        assert "task success    66.7% [20.8%, 93.9%] of 3 tasks" in capsys.readouterr().out
        mine = json.dumps([{"class_path": "minimind_pl.tools.FunctionTool", "init_args": {
            "name": "calculate_math", "description": "mine", "parameters": {"type": "object", "properties": {}},
            "function": "scripted_model.echo_arguments"}}])  # echoes the arguments back
        del scripted_model.prompts[:]
        main(["eval", "--task", "tools", "--data", str(tasks_file), "--endpoint", url, "--tools", mine,
              "--limit", "1", "--max_new_tokens", "64"])
        assert '{"expression": "256*37"}' in tokenizer.decode(scripted_model.prompts[-1])  # not the built-in's result
    finally:
        server.shutdown()
        server.server_close()


def test_a_checkpoint_is_benchmarked_and_bad_arguments_are_refused(tmp_path, shared_dir, tasks_file):
    start_file = write_stage_checkpoint(random_model(seed=5), tmp_path / "m.ckpt", shared_dir / "minimind", "SFT")
    scores = main(["eval", "--task", "tools", "--data", str(tasks_file), "--ckpt", str(start_file),
                   "--max_new_tokens", "4", "--device", "cpu"])
    assert scores["tasks"] == 3 and 0 <= scores["task_success"] <= 1
    with pytest.raises(UserError, match="exactly one"):
        from minimind_pl.commands.evaluate import eval_command
        eval_command(ckpt=str(start_file), data=str(tasks_file), task="tools", endpoint="http://127.0.0.1:9")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"conversations": [{"role": "user", "content": "hi"}], "gt": ["x"]}) + "\n")
    with pytest.raises(UserError, match="bad.jsonl:1: the first turn must be a system turn"):
        read_tool_tasks(str(bad))


def test_the_shipped_task_file_is_the_generator_s_and_its_answers_are_the_tools_results(tmp_path):
    write_tool_tasks(tmp_path / "tasks.jsonl")
    assert (tmp_path / "tasks.jsonl").read_text("utf-8") == SHIPPED_TASKS.read_text("utf-8")
    rows = tool_task_rows()
    questions = [r["conversations"][1]["content"] for r in rows]
    assert len(rows) == 28 and len(set(questions)) == 28
    by_question = {r["conversations"][1]["content"]: r for r in rows}
    box = Toolbox(builtin_tools())
    city, weather = next((q.removesuffix("今天天气怎么样？"), r) for q, r in by_question.items() if "天气" in q)
    result = box.run({"function": {"name": "get_current_weather", "arguments": json.dumps({"location": city})}})
    assert values_found(result.output, weather["gt"]) == weather["gt"] and "°C" in weather["gt"][0]
    product = next(r for q, r in by_question.items() if "乘以" in q)
    a, b = map(int, product["conversations"][1]["content"].split()[1::2][:2])
    assert product["gt"] == [str(a * b)]
