"""The OpenAI-compatible server: real `openai` client on loopback, errors, concurrency, the web page."""

from __future__ import annotations

import http.client
import inspect
import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import random_model, require, require_module
from scripted_model import ScriptedModel, start
from minimind_pl.chat_format import OutputParser, StopMatcher
from minimind_pl.commands.serve import ChatEngine, make_server, serve_command
from minimind_pl.generation import generate
from minimind_pl.tokenizer import Tokenizer

SCRIPT = "<think>\nLet me think.\n</think>\n\nHello there, friend!"
TOOL_SCRIPT = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>'
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def tokenizer(shared_dir: Path) -> Tokenizer:
    """MiniMind's tokenizer."""
    return Tokenizer.from_file(shared_dir / "minimind")


@pytest.fixture(scope="module")
def scripted(tokenizer):
    """A server whose model always answers SCRIPT."""
    model = ScriptedModel(tokenizer.encode(SCRIPT))
    server, url = start(ChatEngine(model, tokenizer, model_name="minimind-test"), max_body_bytes=4096)
    yield server, url, model
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def random_server(tokenizer):
    """A server with a real (random, debug-size) transformer: (url, model).

    Its next-token distributions are nearly flat (the top token has well under 1% of the mass), so sampling
    and greedy decoding part ways at once.
    """
    model = random_model(seed=1)
    server, url = start(ChatEngine(model, tokenizer))
    yield url, model
    server.shutdown()
    server.server_close()


def client(url: str, key: str = "unused"):
    """An openai client for the server."""
    openai = require_module("openai")
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def raw(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, parsed JSON or text) of one plain HTTP request."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    data = response.read().decode("utf-8")
    conn.close()
    try:
        return response.status, json.loads(data)
    except json.JSONDecodeError:
        return response.status, data


# ---------------------------------------------------------------------------- parsing units


def test_output_parser_splits_thinking_across_any_chunking():
    for size in (1, 2, 3, 7, 100):
        parser = OutputParser()
        events = []
        for i in range(0, len(SCRIPT), size):
            events += parser.feed(SCRIPT[i:i + size])
        events += parser.finish()
        reasoning = "".join(v for k, v in events if k == "reasoning")
        content = "".join(v for k, v in events if k == "content")
        assert (reasoning, content) == ("Let me think.", "Hello there, friend!"), size


def test_output_parser_open_thinking_and_tool_calls():
    parser = OutputParser(open_thinking=True, parse_tools=True)
    events = parser.feed("plan it\n</think>\n\n" + TOOL_SCRIPT) + parser.finish()
    assert [k for k, _ in events] == ["reasoning", "content", "tool_call"]
    call = events[-1][1]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "北京"}'}
    broken = OutputParser(parse_tools=True)
    events = broken.feed("<tool_call>not json</tool_call>") + broken.finish()
    assert events == [("content", "<tool_call>not json</tool_call>")]


def test_stop_matcher_holds_back_partial_stops():
    stop = StopMatcher(["END", "xyz"])
    assert [stop.feed(piece) for piece in ["abc x", "y", "1 E", "N", "D tail"]] == ["abc ", "", "xy1 ", "", ""]
    assert stop.stopped and stop.feed("more") == ""
    assert StopMatcher([]).feed("E") == "E"


# ---------------------------------------------------------------------------- the API


def test_chat_completion_with_reasoning_and_usage(scripted, tokenizer):
    _, url, _ = scripted
    response = client(url).chat.completions.create(model="minimind-test", messages=[{"role": "user", "content": "hi"}])
    message = response.choices[0].message
    assert message.content == "Hello there, friend!"
    assert message.model_extra["reasoning_content"] == "Let me think."
    assert response.choices[0].finish_reason == "stop"
    assert response.usage.completion_tokens == len(tokenizer.encode(SCRIPT))  # eos is not counted
    assert response.model == "minimind-test"


def test_streaming_ends_with_done_and_matches(scripted):
    _, url, _ = scripted
    stream = client(url).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks if c.choices)
    assert (reasoning, content) == ("Let me think.", "Hello there, friend!")
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.total_tokens > 0
    status, text = raw(url, "POST", "/v1/chat/completions",
                       json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": True}).encode(),
                       {"Content-Type": "application/json"})
    assert status == 200 and text.rstrip().endswith("data: [DONE]")


def test_sampling_stop_max_tokens_and_thinking_kwargs(scripted, tokenizer):
    _, url, model = scripted
    api = client(url)
    response = api.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                           stop=["friend"], temperature=0.0, top_p=0.5)
    assert response.choices[0].message.content == "Hello there, "
    short = api.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    api.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=1,
                                extra_body={"chat_template_kwargs": {"open_thinking": True}})
    assert tokenizer.decode(model.prompts[-1]).endswith("<|im_start|>assistant\n<think>\n")


def test_tool_calls(tokenizer):
    model = ScriptedModel(tokenizer.encode(TOOL_SCRIPT))
    server, url = start(ChatEngine(model, tokenizer))
    try:
        api = client(url)
        messages = [{"role": "user", "content": "北京天气？"}]
        response = api.chat.completions.create(model="m", messages=messages, tools=TOOLS)
        choice = response.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
        call = choice.message.tool_calls[0]
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "北京"}
        assert "get_weather" in tokenizer.decode(model.prompts[-1])  # the tools reached the template
        chunks = list(api.chat.completions.create(model="m", messages=messages, tools=TOOLS, stream=True))
        calls = [t for c in chunks for t in (c.choices[0].delta.tool_calls or [])]
        assert calls[0].function.name == "get_weather" and calls[0].index == 0
    finally:
        server.shutdown()
        server.server_close()


def test_models_health_and_page(scripted):
    _, url, _ = scripted
    assert [m.id for m in client(url).models.list().data] == ["minimind-test"]
    assert raw(url, "GET", "/health") == (200, {"status": "ok"})
    status, page = raw(url, "GET", "/")
    assert status == 200 and "<details" in page and "/v1/chat/completions" in page


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    (b"[1, 2]", None),
    (json.dumps({"model": "m"}).encode(), "messages"),
    (json.dumps({"messages": []}).encode(), "messages"),
    (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), "messages[0].role"),
    (json.dumps({"messages": [{"role": "user", "content": 3}]}).encode(), "messages[0].content"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10 ** 9}).encode(), "max_tokens"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}).encode(), "max_tokens"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}).encode(), "temperature"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "stop": [1]}).encode(), "stop"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "n": 2}).encode(), "n"),
])
def test_bad_requests_get_openai_errors(scripted, body, param):
    _, url, _ = scripted
    status, data = raw(url, "POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    assert status == 400
    assert set(data["error"]) == {"message", "type", "param", "code"} and data["error"]["param"] == param


def test_oversized_body_unknown_route_and_context(scripted):
    server, url, _ = scripted
    status, data = raw(url, "POST", "/v1/chat/completions", b"x" * 5000, {"Content-Type": "application/json"})
    assert status == 413 and data["error"]["code"] == "request_too_large"
    assert raw(url, "GET", "/v1/nothing")[0] == 404
    long = {"messages": [{"role": "user", "content": "字" * 600}], "max_tokens": 10}
    status, data = raw(url, "POST", "/v1/chat/completions", json.dumps(long).encode())
    assert status == 400 and data["error"]["code"] == "context_length_exceeded"
    assert raw(url, "GET", "/health")[0] == 200  # still serving


def test_api_key(tokenizer):
    openai = require_module("openai")
    server, url = start(ChatEngine(ScriptedModel(tokenizer.encode("ok")), tokenizer), api_key="sk-test")
    try:
        with pytest.raises(openai.AuthenticationError):
            client(url, key="wrong").models.list()
        response = client(url, key="sk-test").chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}])
        assert response.choices[0].message.content == "ok"
    finally:
        server.shutdown()
        server.server_close()


def test_binds_loopback_by_default(tokenizer):
    assert inspect.signature(serve_command).parameters["host"].default == "127.0.0.1"
    server = make_server(ChatEngine(ScriptedModel([5]), tokenizer), port=0)
    assert server.server_address[0] == "127.0.0.1"
    server.server_close()


def test_concurrent_clients_each_get_a_complete_answer(scripted):
    _, url, _ = scripted
    api = client(url)

    def ask(i: int) -> str:
        messages = [{"role": "user", "content": f"question {i}"}]
        if i % 2:
            return api.chat.completions.create(model="m", messages=messages).choices[0].message.content
        chunks = api.chat.completions.create(model="m", messages=messages, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(ask, range(6)))
    assert answers == ["Hello there, friend!"] * 6


@pytest.mark.parametrize("interval", [0.0, 0.2])
def test_stream_interval_groups_tokens_into_fewer_events(tokenizer, interval):
    """A model taking 10 ms a step: with no interval every token is its own streamed event (the loop keeps up);
    with 0.2 s the decode thread hands tokens over at most every 0.2 s (the end at once), so 30 tokens come in
    a few events. Either way the text and the usage are the whole answer's."""
    from minimind_pl.commands.serve import ServerSettings
    answer = " ".join(["word"] * 30)
    ids = tokenizer.encode(answer)
    model = ScriptedModel(ids, delay=0.01)
    server, url = start(ChatEngine(model, tokenizer, settings=ServerSettings(stream_interval=interval)))
    try:
        start_time = time.monotonic()
        chunks = list(client(url).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True,
            stream_options={"include_usage": True}))
        seconds = time.monotonic() - start_time
    finally:
        server.shutdown()
        server.server_close()
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == answer and chunks[-1].usage.completion_tokens == len(ids)
    if interval:
        assert len(pieces) <= seconds / interval + 2
    else:
        assert len(pieces) >= len(ids) // 2  # (a loaded machine may still group a few)


def test_client_leaving_mid_stream_frees_the_model(scripted):
    _, url, _ = scripted
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        assert sock.recv(64).startswith(b"HTTP/1.1 200")
    response = client(url).chat.completions.create(model="m", messages=[{"role": "user", "content": "again"}])
    assert response.choices[0].message.content == "Hello there, friend!"


def test_real_transformer_answers(random_server):
    api = client(random_server[0])
    response = api.chat.completions.create(model="m", messages=[{"role": "user", "content": "你好"}], max_tokens=6,
                                           seed=1, extra_body={"chat_template_kwargs": {"open_thinking": True}})
    assert response.usage.completion_tokens <= 6
    again = api.chat.completions.create(model="m", messages=[{"role": "user", "content": "你好"}], max_tokens=6,
                                        seed=1, extra_body={"chat_template_kwargs": {"open_thinking": True}})
    assert again.choices[0].message.model_dump() == response.choices[0].message.model_dump()  # seeded


def test_temperature_zero_answers_as_greedy_generation(random_server, tokenizer):
    """temperature 0 means greedy: the answer is exactly what greedy ``generate`` writes, streamed or not."""
    url, model = random_server
    messages = [{"role": "user", "content": "你好，请介绍一下你自己。"}]
    prompt = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    greedy = generate(model, [prompt], max_new_tokens=24, do_sample=False, eos_token_id=tokenizer.eos_id)[0]
    expected = tokenizer.decode(greedy, skip_special_tokens=True)
    assert len(greedy) == 24 and len(set(greedy)) > 1 and expected.strip()

    def answer(**fields) -> tuple[str, int]:
        body = json.dumps({"messages": messages, "max_tokens": 24, **fields}).encode()
        status, data = raw(url, "POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        assert status == 200, data
        return data["choices"][0]["message"]["content"], data["usage"]["completion_tokens"]

    sampled, _ = answer(temperature=1.0, seed=0)
    assert sampled != expected  # sampling shows on this model, so the check below is not vacuous
    assert answer(temperature=0) == (expected, 24)
    assert answer(temperature=0.0, top_p=0.5, top_k=5, seed=3) == (expected, 24)  # the rest does not matter
    body = json.dumps({"messages": messages, "max_tokens": 24, "temperature": 0, "stream": True}).encode()
    status, text = raw(url, "POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    assert status == 200 and "".join(e["choices"][0]["delta"].get("content", "") for e in events) == expected


# ---------------------------------------------------------------------------- the web page in a browser


def browser():
    """Headless Debian chromium through selenium (``require``: skipped locally without it, a failure in CI)."""
    webdriver = require_module("selenium.webdriver")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    require(bool(chromium and driver_path), "chromium / chromedriver are not installed "
                                            "(apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver_path), options=options)


def test_web_page_streams_folds_thinking_and_keeps_the_conversation(scripted, tokenizer, tmp_path):
    _, url, model = scripted
    driver = browser()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        driver.get(url + "/")
        WebDriverWait(driver, 20).until(lambda d: d.find_element(By.ID, "model").text == "minimind-test")
        for turn, question in enumerate(["first question", "second question"], start=1):
            box = driver.find_element(By.ID, "input")
            box.send_keys(question)
            box.send_keys(Keys.ENTER)
            WebDriverWait(driver, 30).until(
                lambda d: len(d.find_elements(By.CSS_SELECTOR, ".assistant[data-done='true']")) == turn)
        bubbles = driver.find_elements(By.CSS_SELECTOR, ".assistant")
        assert [b.find_element(By.CLASS_NAME, "answer").text for b in bubbles] == ["Hello there, friend!"] * 2
        details = bubbles[0].find_element(By.CSS_SELECTOR, "details.thinking")
        assert details.get_attribute("open") is None  # folded
        assert "Let me think." in details.get_attribute("textContent")
        assert not driver.find_elements(By.CSS_SELECTOR, ".error")
        prompt = tokenizer.decode(model.prompts[-1])  # the second request carried the first turn
        assert "first question" in prompt and "Hello there, friend!" in prompt and "second question" in prompt
        driver.save_screenshot(str(tmp_path / "chat.png"))
    finally:
        driver.quit()


# ---------------------------------------------------------------------------- batching


def run_jobs(scheduler, jobs_and_delays):
    """Submit (job, steps to wait before submitting) in order; returns each job's tokens once all ended."""
    from minimind_pl.commands.serve.scheduler import END

    results = [[] for _ in jobs_and_delays]
    done = threading.Semaphore(0)

    def collector(out):
        def emit(item):
            if item is END or isinstance(item, BaseException):
                done.release()
            else:
                out.append(item)
        return emit

    for (job, wait_steps), out in zip(jobs_and_delays, results):
        job.emit = collector(out)
        start = scheduler.steps
        while scheduler.steps < start + wait_steps:
            time.sleep(0.001)
        scheduler.submit(job)
    for _ in jobs_and_delays:
        assert done.acquire(timeout=60)
    return results


def test_batched_decoding_equals_each_request_alone():
    """Requests joining a running batch (other prompt lengths, later steps) get exactly what they get alone."""
    from minimind_pl.commands.serve.scheduler import BatchScheduler, Job
    from minimind_pl.generation import GREEDY, SamplingSettings

    model = random_model(seed=2)
    prompts = [[5, 17, 300, 42], [9], list(range(100, 130)), [7, 7, 7]]
    sampled = SamplingSettings(temperature=1.2, top_k=0, top_p=1.0, repetition_penalty=1.3)
    settings = [GREEDY, GREEDY, sampled, GREEDY.with_overrides(repetition_penalty=1.5)]
    lengths = [12, 20, 16, 9]
    scheduler = BatchScheduler(model, eos_id=None, max_batch_size=3)
    try:
        jobs = [(Job(p, n, s, emit=None, generator=torch.Generator().manual_seed(i)), wait)
                for i, (p, n, s, wait) in enumerate(zip(prompts, lengths, settings, [0, 0, 3, 5]))]
        batched = run_jobs(scheduler, jobs)
    finally:
        scheduler.close()
    alone = [generate(model, [p], max_new_tokens=n, sampling=s, eos_token_id=None,
                      generator=torch.Generator().manual_seed(i))[0]
             for i, (p, n, s) in enumerate(zip(prompts, lengths, settings))]
    assert batched == alone and [len(b) for b in batched] == lengths
    assert scheduler.steps < sum(lengths)  # they did decode together


def test_concurrent_requests_decode_together(tokenizer):
    model = ScriptedModel(tokenizer.encode(SCRIPT), delay=0.02)  # an answer takes ~0.3 s: the 4 overlap
    server, url = start(ChatEngine(model, tokenizer))
    api = client(url)
    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            answers = list(pool.map(lambda i: api.chat.completions.create(
                model="m", messages=[{"role": "user", "content": f"q{i}"}]).choices[0].message.content, range(4)))
        assert answers == ["Hello there, friend!"] * 4
        steps = len(tokenizer.encode(SCRIPT)) + 1
        assert model.calls < 2 * steps  # one at a time would take 4 * steps forwards
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------------------- MiniMind's fields, /v1/completions


def test_top_level_open_thinking(scripted, tokenizer):
    _, url, model = scripted
    api = client(url)
    api.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=1,
                                extra_body={"open_thinking": True})
    assert tokenizer.decode(model.prompts[-1]).endswith("<|im_start|>assistant\n<think>\n")
    api.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=1,
                                extra_body={"open_thinking": False, "chat_template_kwargs": {"open_thinking": True}})
    assert not tokenizer.decode(model.prompts[-1]).endswith("<think>\n")  # the top-level field decides
    status, data = raw(url, "POST", "/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": "x"}], "open_thinking": "yes"}).encode())
    assert status == 400 and data["error"]["param"] == "open_thinking"


def test_text_completions_continue_plain_text(random_server, tokenizer):
    url, model = random_server
    api = client(url)
    prompt = "很久很久以前，"
    ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
    expected = tokenizer.decode(generate(model, [ids], max_new_tokens=10, do_sample=False,
                                         eos_token_id=tokenizer.eos_id)[0], skip_special_tokens=True)
    response = api.completions.create(model="m", prompt=prompt, max_tokens=10, temperature=0)
    assert response.object == "text_completion" and response.choices[0].text == expected
    assert response.usage.prompt_tokens == len(ids)
    chunks = list(api.completions.create(model="m", prompt=prompt, max_tokens=10, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    status, data = raw(url, "POST", "/v1/completions", json.dumps({"prompt": ["a", "b"]}).encode())
    assert status == 400 and data["error"]["param"] == "prompt"


def test_openapi_docs(scripted):
    _, url, _ = scripted
    status, page = raw(url, "GET", "/docs")
    assert status == 200 and "swagger" in page.lower()
    status, schema = raw(url, "GET", "/openapi.json")
    assert status == 200 and {"/v1/chat/completions", "/v1/completions", "/v1/models"} <= set(schema["paths"])
    body = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "messages" in body["properties"] and "open_thinking" in body["properties"]


# ---------------------------------------------------------------------------- hardening


def test_foreign_hosts_and_origins_are_refused_without_a_key(scripted, tokenizer):
    _, url, _ = scripted
    port = url.rsplit(":", 1)[1]
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
    for headers in ({"Host": f"evil.example:{port}"},  # DNS rebinding: a foreign name for this address
                    {"Origin": "http://evil.example"}):  # a cross-site page
        status, data = raw(url, "POST", "/v1/chat/completions", body, headers)
        assert status == 403 and data["error"]["code"] == "forbidden_origin", headers
    assert raw(url, "POST", "/v1/chat/completions", body, {"Origin": url})[0] == 200  # the server's own page
    assert raw(url, "POST", "/v1/chat/completions", body, {"Host": f"localhost:{port}"})[0] == 200
    server, keyed = start(ChatEngine(ScriptedModel(tokenizer.encode("ok")), tokenizer), api_key="sk-test",
                          allowed_hosts=["myhost.lan"])
    try:  # with a key, the key is the protection
        status, _ = raw(keyed, "POST", "/v1/chat/completions", body,
                        {"Host": "evil.example", "Origin": "http://evil.example", "Authorization": "Bearer sk-test"})
        assert status == 200
        assert raw(keyed, "POST", "/v1/chat/completions", body, {"Authorization": "Bearer sk-tesx"})[0] == 401
    finally:
        server.shutdown()
        server.server_close()
    server, named = start(ChatEngine(ScriptedModel([5]), tokenizer), allowed_hosts=["myhost.lan"])
    try:
        assert raw(named, "GET", "/v1/models", headers={"Host": "myhost.lan"})[0] == 200
    finally:
        server.shutdown()
        server.server_close()


def test_cors_preflight_and_options(scripted, tokenizer):
    _, url, _ = scripted
    status, _ = raw(url, "OPTIONS", "/v1/chat/completions")
    assert status == 204  # no CORS configured: allowed methods, no cross-origin grant
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=10)
    conn.request("OPTIONS", "/v1/chat/completions")
    response = conn.getresponse()
    assert "POST" in response.getheader("Allow") and response.getheader("Access-Control-Allow-Origin") is None
    conn.close()
    assert raw(url, "OPTIONS", "/nothing")[0] == 404
    app_origin = "http://app.example:3000"
    server, cors = start(ChatEngine(ScriptedModel(tokenizer.encode("ok")), tokenizer), cors_origins=[app_origin])
    try:
        conn = http.client.HTTPConnection(cors.removeprefix("http://"), timeout=10)
        conn.request("OPTIONS", "/v1/chat/completions", headers={
            "Origin": app_origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        response = conn.getresponse()
        response.read()
        assert response.status == 200 and response.getheader("Access-Control-Allow-Origin") == app_origin
        assert "POST" in response.getheader("Access-Control-Allow-Methods")
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}]})
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Origin": app_origin})
        response = conn.getresponse()
        assert json.loads(response.read())["choices"][0]["message"]["content"] == "ok"
        assert response.getheader("Access-Control-Allow-Origin") == app_origin
        conn.close()
        status, _ = raw(cors, "POST", "/v1/chat/completions", body.encode(), {"Origin": "http://other.example"})
        assert status == 403
    finally:
        server.shutdown()
        server.server_close()


def slow_server(tokenizer, **settings):
    """A server whose model takes 20 ms a step for a long answer, with the given ServerSettings fields."""
    from minimind_pl.commands.serve import ServerSettings

    model = ScriptedModel(tokenizer.encode("慢" * 300), delay=0.02)
    server, url = start(ChatEngine(model, tokenizer, settings=ServerSettings(**settings)))
    return server, url, model


def test_full_queue_gets_429(tokenizer):
    server, url, model = slow_server(tokenizer, max_batch_size=1, max_queue=1)
    scheduler = server.engine.scheduler
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}).encode()
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            running = [pool.submit(raw, url, "POST", "/v1/chat/completions", body)]
            wait_until(lambda: scheduler.load() == (1, 0))
            running.append(pool.submit(raw, url, "POST", "/v1/chat/completions", body))
            wait_until(lambda: scheduler.load() == (1, 1))
            status, data = raw(url, "POST", "/v1/chat/completions", body)
            assert status == 429 and data["error"]["code"] == "queue_full"
            assert [f.result()[0] for f in running] == [200, 200]  # the queued one is served after
    finally:
        server.shutdown()
        server.server_close()


def wait_until(condition, timeout: float = 10.0) -> None:
    """Poll ``condition`` until it holds (fails after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_time_limit_stops_generation(tokenizer):
    server, url, model = slow_server(tokenizer, request_timeout=0.3)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 200}
    try:
        status, data = raw(url, "POST", "/v1/chat/completions", json.dumps(body).encode())
        assert status == 504 and data["error"]["code"] == "timeout"
        status, text = raw(url, "POST", "/v1/chat/completions", json.dumps({**body, "stream": True}).encode())
        assert status == 200 and '"code": "timeout"' in text and text.rstrip().endswith("data: [DONE]")
        assert "慢" in text  # what came before the limit was delivered
        wait_until(lambda: server.engine.scheduler.load() == (0, 0))  # the decode thread drops the row just after
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("stream", [False, True])
def test_client_leaving_stops_generation(tokenizer, stream):
    server, url, model = slow_server(tokenizer)
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 250, "stream": stream}).encode()
    try:
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            wait_until(lambda: model.calls > 3)
        wait_until(lambda: server.engine.scheduler.load() == (0, 0), timeout=5)
        calls = model.calls
        time.sleep(0.2)
        assert model.calls == calls < 100  # stopped long before its 250 tokens
    finally:
        server.shutdown()
        server.server_close()


def test_missing_serve_extra_names_the_install_command(monkeypatch):
    import importlib.util

    from minimind_pl.commands.serve.command import require_serve_extra
    from minimind_pl.errors import UserError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    with pytest.raises(UserError, match=r'uvicorn: pip install -e "\.\[serve\]"'):
        require_serve_extra()


def test_serve_command_key_from_environment_warning_and_access_log(tmp_path, tokenizer_dir):
    """The real command in a subprocess: bound beyond loopback it warns, takes the key from the environment
    and logs every request."""
    import os
    import signal
    import subprocess
    import sys

    from helpers import REPO, write_stage_checkpoint

    ckpt = write_stage_checkpoint(random_model(), tmp_path / "tiny.ckpt", tokenizer_dir, stage="SFT")
    env = {**os.environ, "MINIMIND_API_KEY": "sk-env"}
    process = subprocess.Popen([sys.executable, "main.py", "serve", "--ckpt", str(ckpt), "--host", "0.0.0.0",
                                "--port", "0", "--device", "cpu", "--max_tokens", "4", "--cors_origins",
                                "http://a.example,http://app.example"], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        while not lines or "serving" not in lines[-1]:
            line = process.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        port = int(lines[-1].split("http://0.0.0.0:")[1].split("/")[0])
        url = f"http://127.0.0.1:{port}"
        assert raw(url, "GET", "/v1/models")[0] == 401
        assert [m.id for m in client(url, key="sk-env").models.list().data] == ["minimind"]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("OPTIONS", "/v1/models", headers={"Origin": "http://app.example",
                                                       "Access-Control-Request-Method": "GET"})
        assert conn.getresponse().getheader("Access-Control-Allow-Origin") == "http://app.example"
        conn.close()
    finally:
        process.send_signal(signal.SIGINT)
        output = "".join(lines) + process.communicate(timeout=30)[0]
    assert "without an API key" not in output  # the key came from MINIMIND_API_KEY
    assert '"GET /v1/models HTTP/1.1" 401' in output and '"GET /v1/models HTTP/1.1" 200' in output


def test_binding_beyond_loopback_without_a_key_warns(tmp_path, tokenizer_dir, monkeypatch, capsys):
    from helpers import write_stage_checkpoint

    from minimind_pl.cli import main
    from minimind_pl.commands.serve import app
    from minimind_pl.commands.serve.command import exposure_warning

    ckpt = write_stage_checkpoint(random_model(), tmp_path / "tiny.ckpt", tokenizer_dir, stage="SFT")
    keys = []

    class Unbound:  # the command up to serving, nothing bound
        server_address = ("0.0.0.0", 8998)
        serve_forever = server_close = lambda self: None

    monkeypatch.setattr(app, "make_server",
                        lambda engine, host, port, api_key=None, **kw: keys.append(api_key) or Unbound())
    monkeypatch.delenv("MINIMIND_API_KEY", raising=False)
    main(["serve", "--ckpt", str(ckpt), "--host", "0.0.0.0", "--device", "cpu"])
    assert "warning: serving on 0.0.0.0 without an API key" in capsys.readouterr().err
    monkeypatch.setenv("MINIMIND_API_KEY", "sk-env")
    main(["serve", "--ckpt", str(ckpt), "--host", "0.0.0.0", "--device", "cpu"])
    assert "without an API key" not in capsys.readouterr().err and keys == [None, "sk-env"]
    assert exposure_warning("::1", None) is None and exposure_warning("localhost", None) is None
    assert exposure_warning("192.168.1.5", None) is not None


def test_web_page_runs_tool_calls_over_turns_and_regenerates(tokenizer):
    calc_call = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "(3+4)*2"}}\n</tool_call>'
    model = ScriptedModel(tokenizer.encode(calc_call), after_tool=tokenizer.encode("It is 14."))
    server, url = start(ChatEngine(model, tokenizer, model_name="tool-test"))
    driver = browser()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    def finished(count):
        WebDriverWait(driver, 30).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, ".assistant[data-done='true']")) == count
            and not d.find_element(By.ID, "send").get_attribute("disabled"))

    try:
        driver.get(url + "/")
        WebDriverWait(driver, 20).until(lambda d: d.find_element(By.ID, "model").text == "tool-test")
        assert driver.execute_script(
            "return [calculate('2^3^2'), calculate('-(1+2)*3 % 5'), calculate('.5*4'),"
            " convertUnits(100, 'C', 'F'), convertUnits(2, 'kg', 'g')]") == [512, -4, 2, 212, 2000]
        broken = "runTool({function: {name: 'calculator', arguments: '{\"expression\": \"1+\"}'}})"
        assert driver.execute_script("return " + broken).startswith("error:")
        driver.find_element(By.CSS_SELECTOR, "input[name=tool][value=calculator]").click()
        box = driver.find_element(By.ID, "input")
        box.send_keys("what is (3+4)*2?")
        box.send_keys(Keys.ENTER)
        finished(2)  # a turn that calls the tool, then the answer
        first, second = driver.find_elements(By.CSS_SELECTOR, ".assistant")
        assert "tool call: calculator" in first.find_element(By.CLASS_NAME, "tool").text
        assert first.find_element(By.CLASS_NAME, "tool-result").text == "→ 14"
        assert second.find_element(By.CLASS_NAME, "answer").text == "It is 14."
        prompt = tokenizer.decode(model.prompts[-1])
        assert "<tool_response>\n14\n</tool_response>" in prompt and '"name": "calculator"' in prompt
        asked = len(model.prompts)
        driver.find_element(By.ID, "regenerate").click()
        finished(2)  # the old answer was replaced, not added to
        assert len(model.prompts) == asked + 2 and len(driver.find_elements(By.CSS_SELECTOR, ".user")) == 1
        assert tokenizer.decode(model.prompts[-1]).count("what is (3+4)*2?") == 1
        assert not driver.find_elements(By.CSS_SELECTOR, ".error")
    finally:
        driver.quit()
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------------------- request checks, unit by unit (issue 24)

from minimind_pl.commands.serve import ServerSettings  # noqa: E402
from minimind_pl.commands.serve.app import OriginGuard, authorize, host_name, is_loopback, read_body  # noqa: E402
from minimind_pl.commands.serve.requests import (  # noqa: E402
    APIError, parse_chat_request, parse_completion_request,
)
from minimind_pl.generation import SamplingSettings  # noqa: E402

HI = [{"role": "user", "content": "hi"}]


def chat(**fields):
    """``parse_chat_request`` of a body with ``HI`` and ``fields``, under the default ServerSettings."""
    return parse_chat_request(json.dumps({"messages": HI, **fields}).encode(), ServerSettings())


def refused(parse, fields: dict, status: int = 400) -> APIError:
    """The APIError ``parse`` raises for a body of ``fields``."""
    with pytest.raises(APIError) as caught:
        parse(json.dumps(fields).encode(), ServerSettings())
    assert caught.value.status == status
    return caught.value


@pytest.mark.parametrize("fields, thinking", [
    ({}, False),
    ({"chat_template_kwargs": {"enable_thinking": True}}, True),  # vLLM's and SGLang's name
    ({"chat_template_kwargs": {"open_thinking": True}}, True),
    ({"chat_template_kwargs": {"open_thinking": False, "enable_thinking": True}}, False),  # MiniMind's name first
    ({"open_thinking": True}, True),
    ({"open_thinking": False, "chat_template_kwargs": {"enable_thinking": True}}, False),  # the top level first
])
def test_thinking_is_asked_for_by_any_of_its_names(fields, thinking):
    assert chat(**fields).open_thinking is thinking


def test_a_chat_request_keeps_every_checked_field():
    request = chat(stream=True, stream_options={"include_usage": True}, max_completion_tokens=7, temperature=0.3,
                   top_p=0.5, top_k=4, repetition_penalty=1.2, stop="END", seed=11, tools=[{"type": "function"}],
                   messages=[{"role": "system", "content": None},
                             {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text"},
                                                          {"type": "text", "text": "b"}]}])
    assert (request.stream, request.include_usage, request.max_tokens, request.stop, request.seed) == (
        True, True, 7, ["END"], 11)
    assert request.sampling == SamplingSettings(temperature=0.3, top_p=0.5, top_k=4, repetition_penalty=1.2)
    assert request.tools == [{"type": "function"}]
    assert [m["content"] for m in request.messages] == ["", "ab"]
    plain = chat()
    assert (plain.stream, plain.include_usage, plain.max_tokens, plain.stop, plain.seed, plain.tools) == (
        False, False, None, [], None, None)
    assert plain.sampling == ServerSettings().sampling  # the server's defaults: MiniMind's
    assert chat(stop=["a", "b", "c", "d"]).stop == ["a", "b", "c", "d"]
    assert chat(max_tokens=8192).max_tokens == 8192  # the limits themselves are allowed
    assert chat(temperature=2.0, top_p=1.0, top_k=0, repetition_penalty=10.0).sampling == SamplingSettings(
        temperature=2.0, top_p=1.0, top_k=0, repetition_penalty=10.0)
    assert chat(repetition_penalty=0.5).sampling.repetition_penalty == 0.5  # below 1 rewards repeats: allowed
    assert refused(parse_chat_request, {"messages": HI, "max_tokens": 8193}).code == "max_tokens_too_large"


@pytest.mark.parametrize("fields, param, message", [
    ({"messages": HI, "chat_template_kwargs": [1]}, "chat_template_kwargs", "chat_template_kwargs must be an object"),
    ({"messages": HI, "stream": "yes"}, "stream", "stream must be of type bool"),
    ({"messages": HI, "seed": True}, "seed", "seed must be of type int"),
    ({"messages": HI, "tools": {"a": 1}}, "tools", "tools must be of type list"),
    ({"messages": HI, "max_tokens": 8193}, "max_tokens",
     "max_tokens=8193 is larger than this server allows (8192)"),
    ({"messages": HI, "max_completion_tokens": 0}, "max_completion_tokens",
     "max_completion_tokens must be a positive integer"),
    ({"messages": HI, "max_tokens": True}, "max_tokens", "max_tokens must be a positive integer"),
    ({"messages": HI, "max_tokens": 2.5}, "max_tokens", "max_tokens must be a positive integer"),
    ({"messages": HI, "temperature": 2.5}, "temperature", "temperature must be between 0.0 and 2.0, got 2.5"),
    ({"messages": HI, "top_p": 0}, "top_p", "top_p must be between 1e-06 and 1.0, got 0"),
    ({"messages": HI, "top_k": 2.0}, "top_k", "top_k must be a number"),
    ({"messages": HI, "top_k": -1}, "top_k", "top_k must be between 0 and 1000000000.0, got -1"),
    ({"messages": HI, "repetition_penalty": False}, "repetition_penalty", "repetition_penalty must be a number"),
    ({"messages": HI, "repetition_penalty": 10.5}, "repetition_penalty",
     "repetition_penalty must be between 0.001 and 10.0, got 10.5"),
    ({"messages": HI, "stop": ["a", "b", "c", "d", "e"]}, "stop",
     "stop must be a string or a list of at most 4 non-empty strings"),
    ({"messages": HI, "stop": [""]}, "stop", "stop must be a string or a list of at most 4 non-empty strings"),
    ({"messages": HI, "stop": 5}, "stop", "stop must be a string or a list of at most 4 non-empty strings"),
    ({"messages": HI, "n": 2}, "n", "only n=1 is supported"),
    ({"messages": "hi"}, "messages", "messages must be a non-empty list"),
    ({"messages": ["hi"]}, "messages[0]", "messages[0] must be an object"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "robot", "content": "x"}]}, "messages[1].role",
     "messages[1].role must be one of ['system', 'user', 'assistant', 'tool'], got 'robot'"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "url": "x"}]}]}, "messages[0].content",
     "messages[0].content must be a string or a list of text and image_url parts"),
])
def test_bad_chat_fields_are_named_with_their_values(fields, param, message):
    error = refused(parse_chat_request, fields)
    assert (error.param, error.message) == (param, message)
    assert error.body() == {"error": {"message": message, "type": "invalid_request_error", "param": param,
                                      "code": error.code}}


def test_bodies_that_are_not_json_objects():
    error = refused(parse_chat_request, [1])
    assert (error.message, error.code) == ("request body must be a JSON object", "invalid_json")
    with pytest.raises(APIError, match="request body is not valid JSON") as caught:
        parse_chat_request(b"\xff", ServerSettings())
    assert caught.value.code == "invalid_json"


def test_completion_requests_take_one_prompt():
    settings = ServerSettings(max_tokens_limit=100)
    request = parse_completion_request(json.dumps({"prompt": ["Once"], "max_tokens": 100}).encode(), settings)
    assert (request.prompt, request.max_tokens) == ("Once", 100)
    for prompt in ("", ["a", "b"], 5, None):
        error = refused(parse_completion_request, {"prompt": prompt})
        assert (error.param, error.message) == ("prompt", "prompt must be a non-empty string (one prompt per request)")


def test_loopback_and_host_names():
    assert [is_loopback(h) for h in ("localhost", "LOCALHOST", "127.0.0.1", "127.8.9.1", "[::1]", "::1")] == [True] * 6
    assert [is_loopback(h) for h in ("10.0.0.1", "evil.example", "", "[::2]")] == [False] * 4
    assert [host_name(h) for h in ("[::1]:80", "LocalHost:8998", "example.com", "")] == [
        "::1", "localhost", "example.com", ""]


def guard_problem(headers: dict, **kwargs):
    """Why `OriginGuard` refuses a request with ``headers`` (None: it passes)."""
    from starlette.datastructures import Headers

    return OriginGuard(None, **kwargs).problem(Headers(headers=headers))


def test_origin_guard_rules():
    assert guard_problem({"host": "127.0.0.1:8998"}) is None
    assert guard_problem({"host": "192.168.1.5:8998"}) is None  # an IP literal cannot be rebound
    assert guard_problem({"host": "MyHost.lan:80"}, allowed_hosts=["myhost.LAN"]) is None
    assert guard_problem({}).startswith("Host '' is not served")
    assert guard_problem({"host": "evil.example:8998"}) == (
        "Host 'evil.example:8998' is not served without an API key (DNS rebinding protection); use localhost or "
        "the IP address, start the server with --allowed_hosts, or set an API key")
    assert guard_problem({"host": "localhost:8998", "origin": "http://LOCALHOST:8998/"}) is None  # same origin
    assert guard_problem({"host": "localhost:8998", "origin": "http://app.example"}) == (
        "cross-origin request from 'http://app.example' refused; allow it with --cors_origins, or set an API key")
    assert guard_problem({"host": "localhost:8998", "origin": "http://App.example/"},
                         cors_origins=["http://app.example/"]) is None
    assert guard_problem({"host": "localhost:8998", "origin": "http://any.example"}, cors_origins=["*"]) is None
    # origins compare without case: a configured or sent origin in capitals matches its lower-case form
    assert guard_problem({"host": "localhost:8998", "origin": "http://app.mx"}, cors_origins=["http://APP.MX"]) is None
    assert guard_problem({"host": "localhost:8998", "origin": "http://APP.MX"}, cors_origins=["http://app.mx"]) is None


def http_request(headers: dict, chunks: list[bytes] = ()):
    """A Starlette request with ``headers`` whose body arrives in ``chunks``."""
    from starlette.requests import Request

    pieces = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

    async def receive():
        return pieces.pop(0) if pieces else {"type": "http.request", "body": b"", "more_body": False}

    return Request({"type": "http", "headers": [(k.encode(), v.encode()) for k, v in headers.items()]}, receive)


def test_api_key_is_a_bearer_token():
    authorize(http_request({}), None)  # no key: everyone passes
    authorize(http_request({"authorization": "Bearer sk-1"}), "sk-1")
    for sent in ({}, {"authorization": "sk-1"}, {"authorization": "Bearer sk-2"}):
        with pytest.raises(APIError) as caught:
            authorize(http_request(sent), "sk-1")
        assert (caught.value.status, caught.value.code, caught.value.kind) == (
            401, "invalid_api_key", "authentication_error")
        assert caught.value.message == "invalid or missing API key (Authorization: Bearer ...)"


def test_body_limit_counts_declared_and_streamed_bytes():
    import asyncio

    assert asyncio.run(read_body(http_request({"content-length": "10"}, [b"12345", b"67890"]), 10)) == b"1234567890"
    for headers, chunks in (({"content-length": "11"}, [b"x"]),  # declared too large: refused before reading
                            ({}, [b"123456", b"78901"]),  # no length given: refused once 11 bytes arrived
                            ({"content-length": "5"}, [b"123456", b"78901"])):  # a length that lies
        with pytest.raises(APIError) as caught:
            asyncio.run(read_body(http_request(headers, chunks), 10))
        assert (caught.value.status, caught.value.code) == (413, "request_too_large")
        assert caught.value.message == "request body exceeds the limit of 10 bytes"


def test_tool_call_text_stays_text_when_the_request_sent_no_tools(tokenizer):
    model = ScriptedModel(tokenizer.encode(TOOL_SCRIPT))
    server, url = start(ChatEngine(model, tokenizer))
    try:
        choice = client(url).chat.completions.create(model="m", messages=HI).choices[0]
        assert choice.finish_reason == "stop" and choice.message.tool_calls is None
        assert choice.message.content == TOOL_SCRIPT
    finally:
        server.shutdown()
        server.server_close()


def test_default_answer_budget_is_what_the_context_leaves(tokenizer):
    # default max_tokens 1024, but the debug model's context is 512: a prompt of P tokens leaves 512 - P
    model = ScriptedModel(tokenizer.encode("慢" * 600))
    server, url = start(ChatEngine(model, tokenizer, settings=ServerSettings(max_tokens=1024)))
    try:
        response = client(url).chat.completions.create(model="m", messages=HI)
        prompt = len(model.prompts[-1])
        assert response.usage.prompt_tokens == prompt
        assert (response.usage.completion_tokens, response.choices[0].finish_reason) == (512 - prompt, "length")
        # a smaller default applies as it is
        server.engine.settings.max_tokens = 5
        assert client(url).chat.completions.create(model="m", messages=HI).usage.completion_tokens == 5
    finally:
        server.shutdown()
        server.server_close()


def test_a_refused_origin_gets_a_complete_openai_error(scripted):
    _, url, _ = scripted
    status, data = raw(url, "GET", "/v1/models", headers={"Origin": "http://evil.example"})
    assert status == 403 and data == {"error": {
        "message": "cross-origin request from 'http://evil.example' refused; allow it with --cors_origins, or set an "
                   "API key", "type": "permission_error", "param": None, "code": "forbidden_origin"}}


# ---------------------------------------------------------------------------- images (MiniMind-V)


def png_bytes(size=(40, 30), colour=(220, 30, 60)) -> bytes:
    import io

    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, colour)
    ImageDraw.Draw(image).rectangle((4, 4, 20, 16), fill=(20, 200, 90))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def image_message(url: str, text: str = "看看") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]}]


@pytest.fixture(scope="module")
def vlm_server(tokenizer, tmp_path_factory):
    """A server with a random tiny MiniMind-V model (16 placeholders per image) and small image limits."""
    from helpers import random_vlm, tiny_tower_folder
    from minimind_pl.commands.serve.requests import ServerSettings

    model = random_vlm(tiny_tower_folder(tmp_path_factory.mktemp("tower") / "siglip"))
    settings = ServerSettings(max_image_pixels=5000, max_batch_size=4)
    server, url = start(ChatEngine(model, tokenizer, settings=settings), max_body_bytes=1 << 20)
    yield url, model
    server.shutdown()
    server.server_close()


def greedy_image_answer(model, tokenizer, text: str, images: list[bytes], n: int, images_first: bool = False) -> str:
    """Reference: the prompt with each image written out as 16 × <|image_pad|> by hand (after the text, or before
    it), greedy generation."""
    import io

    from PIL import Image

    placeholders = "<|image_pad|>" * 16 * len(images)
    content = placeholders + text if images_first else text + placeholders
    ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                         add_generation_prompt=True))
    pixels = torch.stack([model.tower.image_spec(Image.open(io.BytesIO(b))) for b in images]) if images else None
    out = generate(model, [ids], max_new_tokens=n, do_sample=False, eos_token_id=tokenizer.eos_id, images=[pixels])
    return tokenizer.decode(out[0], skip_special_tokens=True)


def test_image_content_parts_answer_as_generation_alone_batched_with_text(vlm_server, tokenizer):
    url, model = vlm_server
    api = client(url)
    image = png_bytes()
    requests = [image_message(data_url(image)), [{"role": "user", "content": "你好"}],
                image_message(data_url(png_bytes(colour=(10, 40, 230))), "这")]
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda m: api.chat.completions.create(
            model="m", messages=m, temperature=0, max_tokens=6).choices[0].message.content, requests))
    assert answers[0] == greedy_image_answer(model, tokenizer, "看看", [image], 6)
    assert answers[1] == greedy_image_answer(model, tokenizer, "你好", [], 6)
    assert answers[2] == greedy_image_answer(model, tokenizer, "这", [png_bytes(colour=(10, 40, 230))], 6)


@pytest.mark.parametrize("url, param, words", [
    ("https://example.com/cat.png", "messages[0].content[1]", "remote image URLs are not fetched"),
    ("ftp://example.com/cat.png", "messages[0].content[1]", "unsupported image URL"),
    ("data:image/png;base64,not base64!", "messages[0].content[1]", "invalid base64"),
    ("data:text/plain;base64,aGk=", "messages[0].content[1]", "data:image/<type>;base64"),
    (data_url(b"\x89PNG\r\n\x1a\n broken"), "messages[0].content[1]", "undecodable image"),
    (data_url(png_bytes(size=(100, 100))), "messages[0].content[1]", "too many pixels: 100x100 = 10000"),
])
def test_refused_images_get_a_400_naming_the_part(vlm_server, url, param, words):
    openai = require_module("openai")
    with pytest.raises(openai.BadRequestError) as error:
        client(vlm_server[0]).chat.completions.create(model="m", messages=image_message(url), max_tokens=2)
    assert error.value.status_code == 400 and words in str(error.value) and error.value.body["param"] == param


def test_a_text_model_refuses_images(random_server):
    openai = require_module("openai")
    with pytest.raises(openai.BadRequestError, match="text model"):
        client(random_server[0]).chat.completions.create(model="m", messages=image_message(data_url(png_bytes())))


def test_image_urls_are_fetched_only_when_allowed(vlm_server, tokenizer, tmp_path):
    """--allow_image_urls: an http URL is fetched (here from a loopback file server) within the byte limit."""
    import functools
    import http.server

    from minimind_pl.commands.serve.requests import ServerSettings

    _, model = vlm_server
    image = png_bytes()
    (tmp_path / "a.png").write_bytes(image)
    (tmp_path / "big.png").write_bytes(image + b"\0" * 4096)
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(tmp_path)))
    threading.Thread(target=files.serve_forever, daemon=True).start()
    settings = ServerSettings(allow_image_urls=True, max_image_bytes=len(image) + 100)
    server, url = start(ChatEngine(model, tokenizer, settings=settings))
    base = f"http://127.0.0.1:{files.server_address[1]}"
    try:
        answer = client(url).chat.completions.create(model="m", messages=image_message(base + "/a.png"),
                                                     temperature=0, max_tokens=5).choices[0].message.content
        assert answer == greedy_image_answer(model, tokenizer, "看看", [image], 5)
        for name, words in [("big.png", "image too large"), ("missing.png", "cannot fetch the image")]:
            status, body = raw(url, "POST", "/v1/chat/completions", json.dumps(
                {"messages": image_message(f"{base}/{name}"), "max_tokens": 2}).encode(),
                {"Content-Type": "application/json"})
            assert status == 400 and words in body["error"]["message"]
    finally:
        server.shutdown()
        server.server_close()
        files.shutdown()


def test_web_page_attaches_an_image_to_a_question(vlm_server, tokenizer, tmp_path):
    """The page sends the attached file as a data: URL part before the text; the answer is the model's greedy
    answer to that image and question; the picture shows in the user's bubble and the attachment is cleared."""
    url, model = vlm_server
    image = png_bytes(colour=(30, 160, 200))
    (tmp_path / "photo.png").write_bytes(image)
    driver = browser()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        driver.get(url + "/")
        driver.find_element(By.ID, "temperature").send_keys("0")
        driver.find_element(By.ID, "max-tokens").send_keys("6")
        driver.find_element(By.ID, "image").send_keys(str(tmp_path / "photo.png"))
        assert driver.find_element(By.ID, "attached").text == "1 image"
        box = driver.find_element(By.ID, "input")
        box.send_keys("这是什么")
        box.send_keys(Keys.ENTER)
        WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".assistant[data-done='true']"))
        assert not driver.find_elements(By.CSS_SELECTOR, ".error")
        answer = driver.find_element(By.CSS_SELECTOR, ".assistant .answer").get_attribute("textContent")
        assert answer == greedy_image_answer(model, tokenizer, "这是什么", [image], 6, images_first=True)
        assert driver.find_element(By.CSS_SELECTOR, ".user img").get_attribute("src").startswith("data:image/png;base64,")
        assert driver.find_element(By.ID, "attached").text == ""
    finally:
        driver.quit()
