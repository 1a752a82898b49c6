"""Tools a model may call: the typed interface, the argument check, the time limit and output cap, MiniMind's six
mock tools, and the loop that runs a conversation's calls until the model answers.

A :class:`Tool` has a name, a description, a JSON-schema ``parameters`` object and :meth:`Tool.run`. Its schema is
what the chat template shows the model (``Tool.schema``: OpenAI's ``{"type": "function", "function": ...}``); a call
the model writes is parsed by ``chat_format`` (the one parser, shared with the server) and checked against the
schema before it runs (:func:`argument_problems`: required keys, types, enums; a required value may not be null or
an empty string, MiniMind's rule in ``train_agent.py``'s ``CHECK_ARGS``). Tools of your own are subclasses of
:class:`Tool`, or a :class:`FunctionTool` naming a function, given in YAML or on the command line by ``class_path``
(jsonargparse builds them).

A call runs in a daemon thread and is abandoned after the tool's ``timeout`` (1 s, MiniMind's limit): a thread, not a
process, because a tool is any Python callable (closures and lambdas do not pickle for a spawned process) and a
forked process would copy a trainer holding a GPU and its threads. The price is that a tool that never returns
keeps its thread (and its CPU share) until the program ends, so the built-in tools bound their own work (the
calculator refuses huge powers). Results are JSON text cut to ``MAX_OUTPUT_CHARS`` (2048, MiniMind's cap).

MiniMind's six mocks (``trainer/train_agent.py``: ``TOOLS``, ``MOCK_RESULTS``, the ``*_DATA`` tables) answer from
fixed tables with MiniMind's fallbacks, so an episode's results are the same on every run and a task's ``gt`` values
are known in advance. Their schemas are MiniMind's, word for word (the model sees the same system block).
"""

from __future__ import annotations

import ast
import json
import math
import operator
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from minimind_pl.chat_format import Reply, tool_call_parts
from minimind_pl.errors import UserError

MAX_OUTPUT_CHARS = 2048  # MiniMind: result_str[:2048]
DEFAULT_TIMEOUT = 1.0  # seconds; MiniMind: signal.alarm(1)
JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "null": lambda v: v is None,
}


# ====================================================================== the interface
class Tool:
    """A function the model may call: its name, what it does, its JSON-schema parameters, and :meth:`run`."""

    def __init__(self, name: str, description: str, parameters: dict, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Args:
            name: The name the model calls it by.
            description: What it does, shown to the model.
            parameters: A JSON schema of ``type: object`` (``properties``, ``required``) for its arguments.
            timeout: Seconds a call may take before it is abandoned.
        """
        if not name or not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise UserError(f"tool {name!r}: needs a name and a JSON schema of type object as its parameters")
        if timeout <= 0:
            raise UserError(f"tool {name!r}: timeout must be > 0, got {timeout}")
        self.name, self.description, self.parameters, self.timeout = name, description, parameters, timeout

    def run(self, **arguments: Any) -> Any:
        """The result of a call (anything ``json.dumps`` takes); raise to report an error to the model."""
        raise NotImplementedError

    def schema(self) -> dict[str, Any]:
        """The tool as the chat template lists it (OpenAI's function-tool form)."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


class FunctionTool(Tool):
    """A tool that calls a Python function with the call's arguments as keywords."""

    def __init__(self, name: str, description: str, parameters: dict, function: Callable[..., Any],
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        """Args:
            name: The name the model calls it by.
            description: What it does, shown to the model.
            parameters: A JSON schema of ``type: object`` for its arguments.
            function: The function (in YAML its import path, e.g. ``mypackage.tools.search``).
            timeout: Seconds a call may take before it is abandoned.
        """
        super().__init__(name, description, parameters, timeout)
        self.function = function

    def run(self, **arguments: Any) -> Any:
        """``function(**arguments)``."""
        return self.function(**arguments)


def argument_problems(parameters: Mapping[str, Any], arguments: Any) -> list[str]:
    """What is wrong with a call's arguments under a tool's JSON schema (empty when nothing): not an object, a
    required key missing, null or an empty string, a value of another type or outside its ``enum``."""
    if not isinstance(arguments, dict):
        return [f"arguments must be a JSON object, got {type(arguments).__name__}"]
    problems = [f"`{key}` is required" for key in parameters.get("required", ())
                if arguments.get(key) is None or arguments.get(key) == ""]
    for key, value in arguments.items():
        spec = parameters.get("properties", {}).get(key)
        if not isinstance(spec, Mapping) or value is None and key not in parameters.get("required", ()):
            continue
        types = spec.get("type")
        types = [types] if isinstance(types, str) else types or []
        given = json.dumps(value, ensure_ascii=False)
        if types and not any(JSON_TYPES.get(t, lambda v: True)(value) for t in types):
            problems.append(f"`{key}` must be of type {' or '.join(types)}, got {given}")
        elif "enum" in spec and value not in spec["enum"]:
            problems.append(f"`{key}` must be one of {spec['enum']}, got {given}")
    return problems


# ====================================================================== running calls
@dataclass
class ToolResult:
    """One call and what came of it.

    Attributes:
        name: The tool named by the call.
        arguments: The call's arguments as parsed (None when they were not valid JSON).
        output: The JSON text the model gets back (the result, or ``{"error": ...}``), at most ``MAX_OUTPUT_CHARS``.
        valid: The call named a known tool with arguments its schema accepts (whether or not it then ran well).
        error: Why the call failed (unknown tool, bad arguments, an exception, the time limit), or None.
    """

    name: str
    arguments: Any
    output: str
    valid: bool
    error: Optional[str] = None


def call_with_timeout(function: Callable[[], Any], seconds: float) -> Any:
    """``function()`` in a daemon thread; TimeoutError after ``seconds`` (the thread is abandoned, see the module
    doc); the function's own exception is raised here."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = function()
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True, name="tool-call")
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"took longer than {seconds:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def capped_json(value: Any) -> str:
    """``value`` as JSON text (unicode kept), cut to ``MAX_OUTPUT_CHARS``."""
    return json.dumps(value, ensure_ascii=False, default=str)[:MAX_OUTPUT_CHARS]


class Toolbox:
    """The tools of a conversation, by name: their schemas for the prompt, the check and the run of a parsed call."""

    def __init__(self, tools: Iterable[Tool]) -> None:
        """Args:
            tools: The tools (names must differ).
        """
        self.tools: dict[str, Tool] = {}
        for tool in tools:
            if tool.name in self.tools:
                raise UserError(f"two tools are named {tool.name!r}")
            self.tools[tool.name] = tool

    def schemas(self) -> list[dict[str, Any]]:
        """Every tool's schema, for the system turn's ``tools``."""
        return [tool.schema() for tool in self.tools.values()]

    def check(self, call: Mapping[str, Any]) -> tuple[str, Any, Optional[str]]:
        """``(name, arguments, problem)`` of a parsed call: problem None when it names a known tool with arguments
        its schema accepts."""
        try:
            name, arguments = tool_call_parts(call)
        except ValueError as exc:
            function = call.get("function") or call
            return str(function.get("name", "")), None, str(exc)
        if name not in self.tools:
            return name, arguments, f"unknown tool {name!r} (known: {', '.join(self.tools) or 'none'})"
        problems = argument_problems(self.tools[name].parameters, arguments)
        return name, arguments, "; ".join(problems) or None

    def run(self, call: Mapping[str, Any]) -> ToolResult:
        """Check and run one parsed call (``chat_format``'s OpenAI form); failures become an ``{"error": ...}``
        output the model reads, never an exception."""
        name, arguments, problem = self.check(call)
        if problem is not None:
            return ToolResult(name, arguments, capped_json({"error": problem}), False, problem)
        tool = self.tools[name]
        try:
            value = call_with_timeout(lambda: tool.run(**arguments), tool.timeout)
        except Exception as exc:  # the tool's failure is the model's to read
            error = f"{name} failed: {type(exc).__name__}: {exc}"
            return ToolResult(name, arguments, capped_json({"error": error}), True, error)
        return ToolResult(name, arguments, capped_json(value), True)


# ====================================================================== the loop
@dataclass
class Episode:
    """A conversation run to its end: the model's turns, the tool turns between them, and counts.

    Attributes:
        messages: The whole conversation (the prompt, each assistant turn, each tool turn).
        results: Every call the model made, in order, with its result.
        invalid_calls: ``<tool_call>`` blocks that were not calls (bad JSON, no name).
        unfinished: The model was still calling tools on its last allowed turn (no final answer).
        answer: The final turn's answer (empty when unfinished).
    """

    messages: list[dict[str, Any]]
    results: list[ToolResult] = field(default_factory=list)
    invalid_calls: int = 0
    unfinished: bool = False
    answer: str = ""

    @property
    def calls(self) -> int:
        """Calls the model wrote, valid or not (invalid blocks included)."""
        return len(self.results) + self.invalid_calls

    @property
    def valid_calls(self) -> int:
        """Calls that named a known tool with arguments its schema accepts."""
        return sum(result.valid for result in self.results)


def tool_message(result: ToolResult) -> dict[str, Any]:
    """The ``tool`` turn that gives a result back to the model."""
    return {"role": "tool", "content": result.output}


def run_episode(reply: Callable[[list[dict[str, Any]]], tuple[Reply, dict[str, Any]]], messages: Sequence[Mapping],
                toolbox: Toolbox, max_turns: int = 3,
                on_result: Optional[Callable[[ToolResult], None]] = None) -> Episode:
    """Let the model answer, run the calls of each reply and give it the results, until a reply calls no tool or
    ``max_turns`` replies were made (MiniMind's agent loop: 3 turns; still calling on the last one = unfinished).

    Args:
        reply: The model: from the conversation so far, its parsed reply and the assistant message to append.
        messages: The conversation to answer (a copy is extended).
        toolbox: The tools the calls run against.
        max_turns: Most assistant turns.
        on_result: Called with each call's result as it comes (``chat --tools`` prints them).
    """
    if max_turns < 1:
        raise UserError(f"max_turns must be >= 1, got {max_turns}")
    episode = Episode([dict(m) for m in messages])
    for turn in range(max_turns):
        parsed, message = reply(episode.messages)
        episode.messages.append(message)
        episode.invalid_calls += len(parsed.invalid_calls)
        if not parsed.tool_calls:
            episode.answer = parsed.content.rpartition("</tool_call>")[2].strip()
            return episode
        for call in parsed.tool_calls:
            result = toolbox.run(call)
            episode.results.append(result)
            episode.messages.append(tool_message(result))
            if on_result is not None:
                on_result(result)
    episode.unfinished = True
    return episode


# ====================================================================== scoring answers
_NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?![\w.])")
_NUMERIC_VALUE = re.compile(r"[-+]?\d+(?:\.\d+)?")


def values_found(text: str, values: Sequence[Any]) -> list[Any]:
    """The expected values that ``text`` holds, MiniMind's rule (``validate_gt_in_text``): a value is found when it
    is a case-insensitive substring, or when it is a number equal (within 1e-6) to a number standing alone in the
    text, thousands commas ignored."""
    lowered, numbers = text.lower(), [float(n) for n in _NUMBER.findall(text.replace(",", ""))]
    found = []
    for value in values:
        wanted = str(value).strip()
        if wanted and wanted.lower() in lowered:
            found.append(value)
        elif _NUMERIC_VALUE.fullmatch(wanted.replace(",", "")) and any(
                abs(float(wanted.replace(",", "")) - n) < 1e-6 for n in numbers):
            found.append(value)
    return found


# ====================================================================== MiniMind's six mock tools
WEATHER = {"北京": ("28°C", "晴"), "上海": ("15°C", "多云"), "广州": ("32°C", "闷热"), "深圳": ("30°C", "晴"),
           "杭州": ("22°C", "阴"), "成都": ("18°C", "小雨"), "武汉": ("25°C", "多云"), "南京": ("20°C", "晴"),
           "西安": ("16°C", "大风"), "重庆": ("26°C", "阴"), "Tokyo": ("12°C", "晴"), "New York": ("8°C", "多云"),
           "London": ("5°C", "小雨"), "Paris": ("10°C", "阴"), "Sydney": ("25°C", "晴朗")}
WEATHER_DEFAULT = ("22°C", "晴")
TIMES = {"Asia/Shanghai": "2025-03-07 14:30:00", "America/New_York": "2025-03-07 01:30:00",
         "Europe/London": "2025-03-07 06:30:00", "Asia/Tokyo": "2025-03-07 15:30:00",
         "Europe/Paris": "2025-03-07 07:30:00", "Australia/Sydney": "2025-03-07 17:30:00"}
TIME_DEFAULT, TIMEZONE_DEFAULT = "2025-03-07 14:30:00", "Asia/Shanghai"
EXCHANGE_RATES = {("USD", "CNY"): 7.21, ("EUR", "CNY"): 7.85, ("GBP", "CNY"): 9.12, ("JPY", "CNY"): 0.048,
                  ("USD", "EUR"): 0.92, ("USD", "GBP"): 0.79, ("CNY", "JPY"): 20.83, ("AUD", "CNY"): 4.72}
TRANSLATIONS = {("你好世界", "english"): "Hello World", ("Good morning", "chinese"): "早上好",
                ("今天天气真好", "english"): "The weather is nice today", ("I love programming", "chinese"): "我喜欢编程",
                ("机器学习很有趣", "english"): "Machine learning is interesting", ("Happy birthday", "chinese"): "生日快乐"}
#: ``from_to`` -> factor, MiniMind's table as it is (its celsius/fahrenheit rows are factors, not the affine formula).
UNIT_FACTORS = {"km_miles": 0.621371, "miles_km": 1.60934, "kg_pounds": 2.20462, "pounds_kg": 0.453592,
                "meters_feet": 3.28084, "feet_meters": 0.3048, "celsius_fahrenheit": 1.8, "fahrenheit_celsius": 0.5556}

# What MiniMind's calculator rewrites before it evaluates (full-width and typographic operators).
_CALCULATOR_SPELLINGS = {"^": "**", "×": "*", "÷": "/", "−": "-", "（": "(", "）": ")"}
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPONENT = 10_000  # a larger power could run for minutes; the thread would outlive its time limit


def _evaluate(node: ast.AST) -> Any:
    """Value of an arithmetic expression tree: numbers, + - * / // % **, and ``math``'s functions and constants
    (what MiniMind's ``eval(..., {"math": math})`` can reach, without the rest of Python)."""
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ValueError(f"exponent {right} is too large")
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "math" \
            and not node.attr.startswith("_") and hasattr(math, node.attr):
        return getattr(math, node.attr)
    if isinstance(node, ast.Call) and not node.keywords:
        function = _evaluate(node.func)
        if callable(function):
            return function(*map(_evaluate, node.args))
    raise ValueError(f"not arithmetic: {ast.unparse(node)}")


def calculate_math(expression: str) -> dict[str, str]:
    """MiniMind's ``calculate_math``: ``{"result": str(value)}`` of an arithmetic expression."""
    for spelling, python in _CALCULATOR_SPELLINGS.items():
        expression = expression.replace(spelling, python)
    return {"result": str(_evaluate(ast.parse(expression.strip(), mode="eval")))}


def unit_converter(value: float, from_unit: str, to_unit: str) -> dict[str, float]:
    """MiniMind's ``unit_converter``: value × the table's factor (1 for a pair it lacks), rounded to 4 places."""
    return {"result": round(float(value) * UNIT_FACTORS.get(f"{from_unit.lower()}_{to_unit.lower()}", 1), 4)}


def get_current_weather(location: str) -> dict[str, str]:
    """MiniMind's ``get_current_weather``: the table's temperature and condition (22°C, 晴 elsewhere), humidity 65%."""
    temperature, condition = WEATHER.get(location, WEATHER_DEFAULT)
    return {"city": location, "temperature": temperature, "humidity": "65%", "condition": condition}


def get_current_time(timezone: str = TIMEZONE_DEFAULT) -> dict[str, str]:
    """MiniMind's ``get_current_time``: a fixed time per time zone (Shanghai's for others)."""
    return {"datetime": TIMES.get(timezone, TIME_DEFAULT), "timezone": timezone}


def get_exchange_rate(from_currency: str, to_currency: str) -> dict[str, Any]:
    """MiniMind's ``get_exchange_rate``: the table's rate (1.0 for a pair it lacks)."""
    return {"from": from_currency, "to": to_currency, "rate": EXCHANGE_RATES.get((from_currency, to_currency), 1.0)}


def translate_text(text: str, target_language: str) -> dict[str, str]:
    """MiniMind's ``translate_text``: the table's translation (the text itself for others)."""
    return {"translated_text": TRANSLATIONS.get((text, target_language), text)}


def _object(properties: dict[str, Any], required: Sequence[str]) -> dict[str, Any]:
    """A JSON schema of an object with these properties."""
    return {"type": "object", "properties": properties, "required": list(required)}


_STRING = {"type": "string"}
# name -> (description, parameters, function): MiniMind's TOOLS in train_agent.py, in its order.
BUILTIN_TOOLS: dict[str, tuple[str, dict[str, Any], Callable[..., Any]]] = {
    "calculate_math": ("计算数学表达式", _object({"expression": _STRING}, ["expression"]), calculate_math),
    "unit_converter": ("单位换算", _object({"value": {"type": "number"}, "from_unit": _STRING, "to_unit": _STRING},
                                       ["value", "from_unit", "to_unit"]), unit_converter),
    "get_current_weather": ("获取天气", _object({"location": _STRING}, ["location"]), get_current_weather),
    "get_current_time": ("获取时间", _object({"timezone": {"type": "string", "default": TIMEZONE_DEFAULT}}, []),
                         get_current_time),
    "get_exchange_rate": ("查询汇率", _object({"from_currency": _STRING, "to_currency": _STRING},
                                          ["from_currency", "to_currency"]), get_exchange_rate),
    "translate_text": ("翻译文本", _object({"text": _STRING, "target_language": _STRING}, ["text", "target_language"]),
                       translate_text),
}


def with_builtin_tools(tools: Iterable[Tool] = ()) -> list[Tool]:
    """MiniMind's six mock tools and ``tools`` (a tool of a built-in one's name replaces it)."""
    return list({tool.name: tool for tool in [*builtin_tools(), *tools]}.values())


def builtin_tools(names: Optional[Iterable[str]] = None) -> list[Tool]:
    """MiniMind's mock tools (all six, or those named), as :class:`FunctionTool` objects."""
    names = list(BUILTIN_TOOLS if names is None else names)
    unknown = [n for n in names if n not in BUILTIN_TOOLS]
    if unknown:
        raise UserError(f"no built-in tool named {', '.join(unknown)} (built in: {', '.join(BUILTIN_TOOLS)})")
    return [FunctionTool(name, *BUILTIN_TOOLS[name]) for name in names]
