"""``ggml-backend serve``'s OpenAI dialect with real clients: the ``openai`` package (sync, async, streaming, tool
calls), LangChain's ``ChatOpenAI``, raw HTTP for what clients hide; plus what every dialect shares: parallel slots
under load, a client that vanishes, the queue limit, bad input, the API key, CORS, several models, SIGTERM.
Everything talks to 127.0.0.1 only."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

openai = pytest.importorskip("openai", reason="the openai package (a dev dependency) is the real client these tests drive the server with")
httpx = pytest.importorskip("httpx", reason="httpx (a dev dependency: pip install -e '.[dev]') is the HTTP client these server tests speak through")
pytest.importorskip("fastapi", reason="the server extra (fastapi, uvicorn, sse-starlette: pip install -e '.[server]') is not installed")
pytest.importorskip("sse_starlette", reason="the server extra (fastapi, uvicorn, sse-starlette: pip install -e '.[server]') is not installed")

from ggml_backend.server import ModelConfig  # noqa: E402

from server_fixtures import free_port, running_server  # noqa: E402

#: the sampling both sides use when a reply is compared with the engine's own (greedy, no repeat penalty)
GREEDY = {"temperature": 0, "extra_body": {"repeat_penalty": 1.0}}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def server(default_server):
    return default_server   # conftest.py: one default server for every dialect's tests


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def engine(qwen_engine):
    """The engine alone, for the replies the server must equal."""
    return qwen_engine


def chat(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def test_models_are_listed(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["qwen"]
    assert client.models.retrieve("qwen").id == "qwen"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("gpt-4")


def test_chat_reply_is_the_engines(client, engine):
    reply = client.chat.completions.create(model="qwen", messages=chat("Name a prime number."), max_tokens=12,
                                           **GREEDY)
    alone = engine.create_chat_completion(chat("Name a prime number."), max_tokens=12, temperature=0)
    assert reply.choices[0].message.content == alone["choices"][0]["message"]["content"]
    assert reply.choices[0].finish_reason == alone["choices"][0]["finish_reason"]
    assert reply.usage.prompt_tokens == alone["usage"]["prompt_tokens"]
    assert reply.usage.completion_tokens == alone["usage"]["completion_tokens"]
    assert reply.model == "qwen" and reply.object == "chat.completion"


def test_text_completion_with_logprobs(client, engine):
    reply = client.completions.create(model="qwen", prompt="def add(a, b):", max_tokens=8, logprobs=2, **GREEDY)
    alone = engine.create_completion("def add(a, b):", max_tokens=8, temperature=0, logprobs=2)
    assert reply.choices[0].text == alone["choices"][0]["text"]
    lp = reply.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == reply.usage.completion_tokens == 8
    assert all(len(top) >= 1 for top in lp.top_logprobs)
    assert lp.token_logprobs == pytest.approx(alone["choices"][0]["logprobs"]["token_logprobs"], abs=1e-4)


def test_stream_with_usage_ends_with_done(server, client):
    messages = chat("Count from 1 to 5.")
    whole = client.chat.completions.create(model="qwen", messages=messages, max_tokens=16, **GREEDY)
    chunks = list(client.chat.completions.create(model="qwen", messages=messages, max_tokens=16, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    # on the wire: server-sent events, each a JSON chunk, the last "data: [DONE]"
    with httpx.stream("POST", server[0] + "/v1/chat/completions", timeout=60,
                      json={"messages": messages, "max_tokens": 4, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "chat.completion.chunk" for e in events[:-1])


def test_chat_logprobs_in_openai_shape(client):
    reply = client.chat.completions.create(model="qwen", messages=chat("Count from one to ten in words."),
                                           max_tokens=4, logprobs=True, top_logprobs=3, **GREEDY)
    content = reply.choices[0].logprobs.content
    assert reply.choices[0].finish_reason == "length" and len(content) == reply.usage.completion_tokens == 4
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.bytes == list(entry.token.encode())
    greedy_tokens = [e.top_logprobs[0].token for e in content]
    assert [e.token for e in content] == greedy_tokens   # temperature 0 takes the most likely token


def test_async_clients_at_once_get_what_they_get_alone(server, client):
    questions = ["What is 2+2?", "Name a color.", "Say hello in French.", "What is the capital of Italy?"]
    alone = [client.chat.completions.create(model="qwen", messages=chat(q), max_tokens=10, **GREEDY)
             .choices[0].message.content for q in questions]

    async def ask_all():
        async with openai.AsyncOpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0) as aclient:
            replies = await asyncio.gather(*[aclient.chat.completions.create(
                model="qwen", messages=chat(q), max_tokens=10, **GREEDY) for q in questions])
        return [r.choices[0].message.content for r in replies]
    assert asyncio.run(ask_all()) == alone


def test_tool_calls_whole_and_streamed(client):
    messages = chat("What's the weather like in Paris right now?")
    reply = client.chat.completions.create(model="qwen", messages=messages, tools=[WEATHER_TOOL], max_tokens=64,
                                           **GREEDY)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    stream = client.chat.completions.create(model="qwen", messages=messages, tools=[WEATHER_TOOL], max_tokens=64,
                                            stream=True, **GREEDY)
    deltas = [c.choices[0] for c in stream if c.choices]
    calls = [tc for d in deltas for tc in (d.delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].id.startswith("call_")
    assert calls[0].function.name == "get_weather" and json.loads(calls[0].function.arguments) == {"city": "Paris"}
    assert deltas[-1].finish_reason == "tool_calls"


def test_tool_choice_forces_a_call(client):
    stock = {"type": "function", "function": {
        "name": "get_stock_price", "description": "The price of a stock",
        "parameters": {"type": "object", "properties": {"ticker": {"type": "string"}}, "required": ["ticker"]}}}
    reply = client.chat.completions.create(
        model="qwen", messages=chat("Tell me a joke about cats."), tools=[WEATHER_TOOL, stock], max_tokens=48,
        tool_choice={"type": "function", "function": {"name": "get_stock_price"}}, **GREEDY)
    calls = reply.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_stock_price"]
    assert set(json.loads(calls[0].function.arguments)) == {"ticker"}
    none = client.chat.completions.create(model="qwen", messages=chat("What's the weather in Rome?"),
                                          tools=[WEATHER_TOOL], tool_choice="none", max_tokens=8, **GREEDY)
    assert none.choices[0].message.tool_calls is None
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        client.chat.completions.create(model="qwen", messages=chat("hi"), tools=[WEATHER_TOOL], max_tokens=4,
                                       tool_choice={"type": "function", "function": {"name": "no_such_tool"}})


def test_langchain_chat_openai(server):
    langchain_openai = pytest.importorskip("langchain_openai", reason="langchain-openai (a dev dependency) is the real LangChain client of the server")
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        return "sunny"

    model = langchain_openai.ChatOpenAI(base_url=server[0] + "/v1", api_key="unused", model="qwen", temperature=0,
                                        max_tokens=12, max_retries=0, extra_body={"repeat_penalty": 1.0})
    answer = model.invoke("What is the capital of France? One word.")
    assert "Paris" in answer.content and answer.usage_metadata["output_tokens"] > 0
    streamed = list(model.stream("What is the capital of France? One word."))
    assert "".join(chunk.content for chunk in streamed) == answer.content
    calling = langchain_openai.ChatOpenAI(base_url=server[0] + "/v1", api_key="unused", model="qwen",
                                          temperature=0, max_tokens=64, max_retries=0).bind_tools([get_weather])
    message = calling.invoke("What's the weather like in Paris right now?")
    assert message.tool_calls and message.tool_calls[0]["name"] == "get_weather"
    assert message.tool_calls[0]["args"] == {"city": "Paris"}


def test_sixteen_streaming_clients_at_once(server, client):
    """16 streams through 2 slots (the rest wait in line): all complete, each exactly what it gives alone (the
    server issue's load test). Four distinct prompts, four clients each, so the references cost four generations."""
    n_clients, n_prompts = 16, 4
    prompts = [f"Write the number {i % n_prompts} in words." for i in range(n_clients)]
    alone_by_prompt = {p: client.chat.completions.create(model="qwen", messages=chat(p), max_tokens=8, **GREEDY)
                       .choices[0].message.content for p in prompts[:n_prompts]}
    alone = [alone_by_prompt[p] for p in prompts]
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def stream_one(i):
        try:
            own = openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=300)
            chunks = own.chat.completions.create(model="qwen", messages=chat(prompts[i]), max_tokens=8, stream=True,
                                                 **GREEDY)
            results[i] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=stream_one, args=(i,)) for i in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors[:3]
    assert [results[i] for i in range(n_clients)] == alone


def _pool(app):
    return app.state.registry.pools["qwen"]


def test_a_client_that_vanishes_frees_its_slot(server):
    url, app = server
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=60,
                      json={"messages": chat("Write a long story about a dragon."), "max_tokens": 1000,
                            "stream": True}) as response:
        lines = response.iter_lines()
        received = [line for line, _ in zip(lines, range(6))]
        assert any(line.startswith("data: ") for line in received)
        pool = _pool(app)
        busy_slot = next(s for s in pool.slots if s.busy)
    # the connection is closed: the generation stops within a token and its slot is free again
    deadline = time.monotonic() + 10
    while busy_slot.busy and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not busy_slot.busy
    time.sleep(0.5)   # the token being computed when the client left (the server computes one ahead) lands
    n_tokens = busy_slot.llm.n_tokens
    time.sleep(0.5)
    assert busy_slot.llm.n_tokens == n_tokens, "the generation went on after its client left"
    assert n_tokens < 200


def test_n_choices_come_indexed_and_choice_0_is_the_single_reply(client):
    """``n``: the prompt evaluated once, n choices decoded together (ContinuousBatcher), indexed 0..n-1; with a
    seed, choice 0 is the n=1 reply and a repeat gives the same choices."""
    sampling = {"temperature": 0.9, "seed": 11, "max_tokens": 6}
    single = client.completions.create(model="qwen", prompt="def add(a, b):", **sampling)
    many = client.completions.create(model="qwen", prompt="def add(a, b):", n=3, **sampling)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert many.choices[0].text == single.choices[0].text
    assert 3 <= many.usage.completion_tokens <= 18 and many.usage.prompt_tokens == single.usage.prompt_tokens
    again = client.completions.create(model="qwen", prompt="def add(a, b):", n=3, **sampling)
    assert [c.text for c in again.choices] == [c.text for c in many.choices]
    chunks = list(client.chat.completions.create(model="qwen", messages=chat("Name a color."), n=2, stream=True,
                                                 **sampling))
    texts = {0: "", 1: ""}
    finished = set()
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1} and all(texts.values())
    whole = client.chat.completions.create(model="qwen", messages=chat("Name a color."), n=2, **sampling)
    assert [c.message.content for c in whole.choices] == [texts[0], texts[1]]


def test_a_client_leaving_an_n_stream_ends_its_choices_and_frees_the_slot(server, client):
    """The n choices of a request decode in its slot; a client that goes mid-stream ends all of them (and only
    them): the slot is free again and other requests are served."""
    url, app = server
    no_end = {"151643": -100, "151645": -100}
    with httpx.stream("POST", url + "/v1/completions", timeout=60,
                      json={"prompt": "1, 2, 3, 4,", "max_tokens": 300, "n": 3, "stream": True,
                            "logit_bias": no_end}) as held:
        lines = held.iter_lines()
        indices = set()
        while len(indices) < 3:
            line = next(lines)
            if line.startswith("data: {"):
                indices.add(json.loads(line[6:])["choices"][0]["index"])
    pool = _pool(app)
    deadline = time.monotonic() + 20
    while pool.n_busy and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool.n_busy == 0
    combined = pool.llm.model.batcher   # every decode pass of the choices goes through it
    time.sleep(0.5)                      # the step in progress when the client left lands
    passes = combined.passes
    time.sleep(0.5)
    assert combined.passes == passes, "the n > 1 generation went on after its client left"
    out = client.completions.create(model="qwen", prompt="Hi", max_tokens=2, n=2)
    assert [c.index for c in out.choices] == [0, 1]


@pytest.mark.parametrize("payload, status, needle", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    ({"messages": chat("hi"), "temperature": "hot"}, 400, "'temperature' must be a number"),
    ({"messages": chat("hi"), "max_tokens": -5}, 400, "'max_tokens' must be >= 1"),
    ({"messages": chat("hi"), "max_tokens": "many"}, 400, "'max_tokens' must be an integer"),
    ({"messages": chat("hi"), "model": "gpt-4"}, 404, "does not exist"),
    ({"messages": "hi"}, 400, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ({"messages": chat("hi " * 3000)}, 400, "context"),
    ({"messages": chat("hi"), "max_tokens": 5000}, 400, "context"),
    ({"messages": chat("hi"), "n": 17}, 400, "'n' must be"),
    ({"messages": chat("hi"), "response_format": {"type": "xml"}}, 400, "response_format"),
    ({"messages": chat("hi"), "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "string", "pattern": "(?<=a)b"}}}}, 400, "JSON schema"),
    ({"messages": chat("hi"), "logit_bias": {"99999999": 5}}, 400, "outside the vocabulary"),
    ({"messages": chat("hi"), "stop": 5}, 400, "'stop' must be a string or a list"),
    ({"messages": chat("hi"), "top_k": 1.5}, 400, "'top_k' must be an integer"),
])
def test_bad_requests_get_a_clear_openai_error(server, payload, status, needle):
    body = {"content": payload} if isinstance(payload, bytes) else {"json": payload}
    response = httpx.post(server[0] + "/v1/chat/completions", timeout=60, **body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert needle in error["message"]


def test_oversized_body_and_unknown_route(server):
    response = httpx.post(server[0] + "/v1/chat/completions", content=b"x" * (9 * 1024 * 1024), timeout=60)
    assert response.status_code == 413 and "larger than" in response.json()["error"]["message"]
    response = httpx.get(server[0] + "/v1/nothing-here")
    assert response.status_code == 404 and "no route" in response.json()["error"]["message"]
    assert httpx.get(server[0] + "/docs").status_code == 404   # no route serves pages or files


def test_queue_limit_answers_503_with_retry_after():
    with running_server(models=[ModelConfig(alias="qwen", n_ctx=1024, n_parallel=1)], queue_limit=0) as (url, app):
        no_end = {"151643": -100, "151645": -100}   # Qwen's end tokens: the held reply goes on
        with httpx.stream("POST", url + "/v1/completions", timeout=60,
                          json={"prompt": "1, 2, 3, 4, 5,", "max_tokens": 200, "stream": True,
                                "logit_bias": no_end}) as held:
            lines = held.iter_lines()   # kept: a dropped line iterator closes the connection
            next(lines)
            response = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
            assert response.status_code == 503
            assert response.headers["retry-after"] == "1"
            assert "busy" in response.json()["error"]["message"]


def test_a_request_waiting_for_the_slot_of_a_client_that_leaves_gets_its_own_reply():
    """One slot: a long stream holds it, a second request waits in line; the first client leaves mid-stream, so
    the slot passes to the second while the first generation may still be finishing its step on the same
    context. The second gets exactly what it gets alone, and the slot is free after it."""
    body = {"prompt": "def fibonacci(n):", "max_tokens": 12, "temperature": 0, "repeat_penalty": 1.0}
    with running_server(models=[ModelConfig(alias="qwen", n_ctx=1024, n_parallel=1)]) as (url, app):
        alone = httpx.post(url + "/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
        no_end = {"151643": -100, "151645": -100}
        waiting: dict = {}
        with httpx.stream("POST", url + "/v1/completions", timeout=60,
                          json={"prompt": "1, 2, 3, 4, 5,", "max_tokens": 500, "stream": True,
                                "logit_bias": no_end}) as held:
            lines = held.iter_lines()
            next(lines)
            second = threading.Thread(target=lambda: waiting.update(
                reply=httpx.post(url + "/v1/completions", json=body, timeout=120)))
            second.start()
            pool = app.state.registry.pools["qwen"]
            deadline = time.monotonic() + 30
            while not pool.waiting and time.monotonic() < deadline:
                time.sleep(0.01)
            assert pool.waiting, "the second request did not wait for the slot"
            for _ in range(3):
                next(lines)
        # the first client is gone: the second request takes the slot
        second.join(120)
        assert waiting["reply"].status_code == 200
        assert waiting["reply"].json()["choices"][0]["text"] == alone
        assert httpx.post(url + "/v1/completions", json=body, timeout=120).json()["choices"][0]["text"] == alone


def test_api_key_and_cors():
    with running_server(api_key="s3cret", cors_origins=["http://ui.example"]) as (url, app):
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/v1/models", headers={"X-API-Key": "s3cret"}).status_code == 200
        keyed = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in keyed.models.list().data] == ["qwen"]
        preflight = httpx.options(url + "/v1/chat/completions", headers={
            "Origin": "http://ui.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert preflight.headers["access-control-allow-origin"] == "http://ui.example"
        other = httpx.get(url + "/v1/models", headers={"Origin": "http://evil.example", "X-API-Key": "s3cret"})
        assert "access-control-allow-origin" not in other.headers
    with running_server() as (url, app):   # no --cors: browsers on other origins get no access
        response = httpx.get(url + "/v1/models", headers={"Origin": "http://ui.example"})
        assert "access-control-allow-origin" not in response.headers


def test_several_models_from_a_yaml_file(tmp_path):
    from ggml_backend.default_model import gemma_model_path
    from ggml_backend.server import ServerConfig, load_models_file
    config_file = tmp_path / "models.yaml"
    config_file.write_text(f"models:\n  - alias: qwen\n    n_ctx: 2048\n    n_parallel: 1\n"
                           f"  - alias: gemma\n    path: {gemma_model_path()}\n    n_ctx: 1024\n    n_parallel: 2\n")
    models = load_models_file(str(config_file), ModelConfig(alias="unused"))
    with running_server(ServerConfig(models=models, port=free_port())) as (url, app):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        listed = {m.id: m.meta for m in client.models.list().data}
        assert set(listed) == {"qwen", "gemma"} and not any(meta["loaded"] for meta in listed.values())
        reply = client.chat.completions.create(model="gemma", messages=chat("Say hi."), max_tokens=6, temperature=0)
        assert reply.model == "gemma" and reply.usage.completion_tokens > 0
        assert set(app.state.registry.pools) == {"gemma"}   # loaded when first asked for, the other not
        assert app.state.registry.pools["gemma"].n_ctx == 512
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - alias: x\n    n_ctxx: 5\n")
    with pytest.raises(ValueError, match="unknown keys n_ctxx"):
        load_models_file(str(bad), ModelConfig(alias="unused"))


def test_serve_needs_a_key_off_loopback():
    from ggml_backend.cli import serve
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    config, generated = serve.build_config(parser.parse_args(["--host", "0.0.0.0"]))
    assert generated and len(config.api_key) >= 24
    config, generated = serve.build_config(parser.parse_args([]))
    assert config.host == "127.0.0.1" and config.api_key is None and not generated
    assert config.models[0].alias == "qwen2.5-coder-0.5b-instruct-q4_k_m"
    with pytest.raises(ValueError, match="tokens per slot"):
        serve.build_config(parser.parse_args(["-c", "32", "-np", "4"]))


def test_sigterm_drains_and_exits():
    """The command as users run it: SIGTERM while a stream is running ends the stream cleanly (its [DONE] comes)
    and the process exits on its own."""
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, "-m", "ggml_backend", "serve", "--port", str(port), "-np", "1",
                                "-c", "1024"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read().decode()[-2000:]
            time.sleep(0.2)
        with httpx.stream("POST", url + "/v1/completions", timeout=60,
                          json={"prompt": "Once upon a time", "max_tokens": 400, "stream": True}) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            process.send_signal(signal.SIGTERM)
            rest = list(lines)   # ends: the server closes the stream instead of hanging
        assert len(rest) < 800 and [line for line in rest if line][-1] == "data: [DONE]"
        # uvicorn drains, then re-raises the signal so the process ends as a SIGTERM'd process does
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)
        assert b"Traceback" not in process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_embeddings_float_and_base64_equal_the_engine(client, engine):
    from ggml_backend.embeddings import LLAMA_POOLING_TYPE_MEAN, embed_texts
    texts = ["Hello world", "def add(a, b): return a + b"]
    expected = embed_texts(engine, texts, pooling_type=LLAMA_POOLING_TYPE_MEAN)   # no pooling in the file: mean
    packed = client.embeddings.create(model="qwen", input=texts)        # the openai package asks for base64
    plain = client.embeddings.create(model="qwen", input=texts[0], encoding_format="float")
    assert [d.embedding for d in packed.data] == expected and plain.data[0].embedding == expected[0]
    assert packed.model == "qwen" and packed.usage.prompt_tokens == sum(len(engine.tokenize(t.encode())) for t in texts)
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="qwen", input=[])


def test_response_format_constrains_the_reply(client, server):
    """OpenAI's json_schema (as the openai package and LangChain's with_structured_output send it) and
    json_object: the reply parses and validates, at temperature 1 over seeds."""
    person = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    for seed in (1, 2):
        reply = client.chat.completions.create(
            model="qwen", messages=chat("Invent a person."), max_tokens=60, temperature=1.0, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": person,
                                                                     "strict": True}})
        data = json.loads(reply.choices[0].message.content)
        assert set(data) == {"name", "age"} and isinstance(data["age"], int)
    reply = client.chat.completions.create(model="qwen", messages=chat("A JSON object about a cat, please."),
                                           max_tokens=60, response_format={"type": "json_object"}, **GREEDY)
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    langchain_openai = pytest.importorskip("langchain_openai", reason="langchain-openai (a dev dependency) is the real LangChain client of the server")
    from pydantic import BaseModel

    class Person(BaseModel):
        name: str
        age: int
    structured = langchain_openai.ChatOpenAI(base_url=server[0] + "/v1", api_key="unused", model="qwen",
                                             temperature=0, max_tokens=60, max_retries=0
                                             ).with_structured_output(Person, method="json_schema")
    person_out = structured.invoke("Invent a person called Ada who is 36.")
    assert isinstance(person_out, Person) and person_out.age >= 0
