"""``ggml-backend serve``'s llama.cpp dialect (``/completion``, ``/tokenize``, ``/detokenize``, ``/props``,
``/slots``, ``/metrics``, ``/health``) driven with raw HTTP (``httpx``), as scripts written against
``llama-server`` drive it: reply shapes, greedy replies equal to the engine's own, stop words and the stop flags,
streams, token probabilities, Prometheus text, a busy slot, bad input in llama.cpp's error shape, the API key.
Everything talks to 127.0.0.1 only."""
from __future__ import annotations

import json
import re

import pytest

httpx = pytest.importorskip("httpx", reason="httpx (a dev dependency: pip install -e '.[dev]') is the HTTP client these server tests speak through")
pytest.importorskip("fastapi", reason="the server extra (fastapi, uvicorn, sse-starlette: pip install -e '.[server]') is not installed")
pytest.importorskip("sse_starlette", reason="the server extra (fastapi, uvicorn, sse-starlette: pip install -e '.[server]') is not installed")

from ggml_backend.server import ModelConfig  # noqa: E402

from refdata import real_model  # noqa: E402
from server_fixtures import running_server  # noqa: E402

CODE_PROMPT = "def fibonacci(n):"
# a reply that ends itself with a wide margin: "Say hi" was a near tie of "#" and "import" for the first token
# (llama.cpp 23.17 / 23.13), which an AVX2-only CPU's float sums broke the other way into a reply that never ends;
# "OK" leads "Ok" by 5.5 nats there
CHAT_PROMPT = "<|im_start|>user\nReply with the single word OK<|im_end|>\n<|im_start|>assistant\n"
#: the fields every final /completion reply has (llama-server's, old stopped_* flags and new stop_type both)
FINAL_FIELDS = {"content", "stop", "id_slot", "model", "tokens_predicted", "tokens_evaluated", "generation_settings",
                "prompt", "truncated", "stop_type", "stopped_eos", "stopped_word", "stopped_limit", "stopping_word",
                "tokens_cached", "timings"}
TIMING_FIELDS = {"prompt_n", "prompt_ms", "prompt_per_token_ms", "prompt_per_second", "predicted_n", "predicted_ms",
                 "predicted_per_token_ms", "predicted_per_second"}
#: a Prometheus text-format sample line: name, optional {labels}, a number
SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*\})? '
                    r'(-?[0-9.]+(?:e[-+]?[0-9]+)?|NaN|[-+]Inf)$')


@pytest.fixture(scope="module")
def server(default_server):
    return default_server[0]   # conftest.py: one default server for every dialect's tests


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def engine(qwen_engine):
    """The engine alone (one slot's context), for the replies the server must equal."""
    return qwen_engine


def complete(client, **body) -> dict:
    r = client.post("/completion", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def stream(client, **body) -> list[dict]:
    events = []
    with client.stream("POST", "/completion", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: "):]))
    return events


def metrics(client) -> dict[str, float]:
    text = client.get("/metrics").text
    return {m.group(1) + (m.group(2) or ""): float(m.group(4))
            for m in map(SAMPLE.match, text.splitlines()) if m}


def test_health(client):
    r = client.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_greedy_completion_is_the_engines(client, engine):
    reply = complete(client, prompt=CODE_PROMPT, n_predict=12, temperature=0)
    alone = engine.create_completion(CODE_PROMPT, temperature=0, max_tokens=12)
    assert reply["content"] == alone["choices"][0]["text"]
    assert FINAL_FIELDS <= set(reply)
    assert reply["stop"] is True and reply["model"] == "qwen" and reply["id_slot"] in (0, 1)
    assert reply["tokens_predicted"] == alone["usage"]["completion_tokens"] == 12
    assert reply["tokens_evaluated"] == alone["usage"]["prompt_tokens"]
    assert reply["prompt"] == CODE_PROMPT
    assert (reply["stop_type"], reply["stopped_limit"], reply["stopped_eos"], reply["stopped_word"]) == \
        ("limit", True, False, False)
    assert reply["stopping_word"] == "" and reply["truncated"] is False
    assert reply["tokens_cached"] == reply["tokens_evaluated"] + reply["tokens_predicted"] - 1
    timings = reply["timings"]
    assert TIMING_FIELDS <= set(timings) and timings["predicted_n"] == 12
    assert timings["prompt_ms"] > 0 and timings["predicted_per_second"] > 0
    settings = reply["generation_settings"]
    assert settings["n_predict"] == 12 and settings["temperature"] == 0 and settings["n_ctx"] == 2048
    assert settings["repeat_penalty"] == 1.0 and settings["seed"] == 0xFFFFFFFF
    assert settings["samplers"] == ["penalties", "top_k", "tfs_z", "typ_p", "top_p", "min_p", "temperature"]
    # llama-server's alias, and the prompt as token ids and as a mix of ids and text
    ids = client.post("/tokenize", json={"content": CODE_PROMPT}).json()["tokens"]
    assert client.post("/completions", json={"prompt": ids, "n_predict": 12, "temperature": 0}).json()["content"] \
        == reply["content"]
    mixed = complete(client, prompt=[ids[0], CODE_PROMPT[len("def"):]], n_predict=12, temperature=0)
    assert mixed["content"] == reply["content"] and mixed["tokens_evaluated"] == len(ids)


def test_stop_word_and_end_of_generation(client, engine):
    reply = complete(client, prompt=CODE_PROMPT, n_predict=24, temperature=0, stop=["return", "never seen"])
    alone = engine.create_completion(CODE_PROMPT, temperature=0, max_tokens=24, stop=["return", "never seen"])
    assert reply["content"] == alone["choices"][0]["text"] and "return" not in reply["content"]
    assert (reply["stop_type"], reply["stopped_word"], reply["stopped_eos"], reply["stopped_limit"]) == \
        ("word", True, False, False)
    assert reply["stopping_word"] == "return"
    assert reply["generation_settings"]["stop"] == ["return", "never seen"]

    reply = complete(client, prompt=CHAT_PROMPT, n_predict=16, temperature=0)
    alone = engine.create_completion(CHAT_PROMPT, temperature=0, max_tokens=16)
    assert reply["content"] == alone["choices"][0]["text"]
    assert alone["choices"][0]["finish_reason"] == "stop", "the model no longer ends this reply: pick another"
    assert (reply["stop_type"], reply["stopped_eos"], reply["stopped_word"], reply["stopped_limit"]) == \
        ("eos", True, False, False)
    assert reply["stopping_word"] == "" and reply["tokens_predicted"] < 16

    # ignore_eos: the end token is never drawn, so the reply runs to n_predict
    longer = complete(client, prompt=CHAT_PROMPT, n_predict=16, temperature=0, ignore_eos=True)
    assert longer["stop_type"] == "limit" and longer["tokens_predicted"] == 16
    assert longer["content"].startswith(reply["content"]) and len(longer["content"]) > len(reply["content"])


def test_stream_is_the_reply_in_pieces(client):
    body = {"prompt": CODE_PROMPT, "n_predict": 12, "temperature": 0}
    whole = complete(client, **body)
    events = stream(client, **body)
    assert "".join(e["content"] for e in events) == whole["content"]
    assert all(e["stop"] is False for e in events[:-1]) and events[-1]["stop"] is True
    assert [e["tokens_predicted"] for e in events[:-1]] == sorted(e["tokens_predicted"] for e in events[:-1])
    last = events[-1]
    assert FINAL_FIELDS <= set(last) and TIMING_FIELDS <= set(last["timings"])
    assert last["stop_type"] == "limit" and last["tokens_predicted"] == 12
    assert last["generation_settings"]["stream"] is True

    events = stream(client, prompt=CODE_PROMPT, n_predict=24, temperature=0, stop=["return"])
    assert events[-1]["stop_type"] == "word" and events[-1]["stopping_word"] == "return"
    assert "return" not in "".join(e["content"] for e in events)


def test_token_probabilities(client):
    reply = complete(client, prompt=CODE_PROMPT, n_predict=6, temperature=0, n_probs=3)
    probs = reply["completion_probabilities"]
    assert len(probs) == reply["tokens_predicted"] == 6
    for entry in probs:
        assert set(entry) == {"id", "token", "bytes", "logprob", "top_logprobs"}
        assert entry["logprob"] <= 0 and bytes(entry["bytes"]).decode() == entry["token"]
        top = entry["top_logprobs"]
        assert len(top) == 3 and all(set(t) == {"id", "token", "bytes", "logprob"} for t in top)
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert (top[0]["id"], top[0]["logprob"]) == (entry["id"], entry["logprob"])   # greedy: the likeliest
    assert "".join(p["token"] for p in probs) == reply["content"]
    ids = [p["id"] for p in probs]
    assert client.post("/detokenize", json={"tokens": ids}).json()["content"] == reply["content"]
    # streamed: each event carries the probabilities of its own token
    events = stream(client, prompt=CODE_PROMPT, n_predict=6, temperature=0, n_probs=3)
    streamed = [p for e in events for p in e.get("completion_probabilities", [])]
    assert [p["id"] for p in streamed] == ids and "completion_probabilities" not in events[-1]


def test_prompt_evaluated_only(client):
    reply = complete(client, prompt=CODE_PROMPT, n_predict=0)
    assert reply["content"] == "" and reply["tokens_predicted"] == 0 and reply["stop_type"] == "limit"
    assert reply["tokens_cached"] == reply["tokens_evaluated"]


def test_tokenize_detokenize_round_trip(client, engine):
    text = "Hello world, <|im_end|> naïve café 🙂 x"
    tokens = client.post("/tokenize", json={"content": text}).json()["tokens"]
    assert tokens == engine.tokenize(text, add_bos=False, special=True)
    assert engine.tokenizer.token_id("<|im_end|>") in tokens
    assert client.post("/detokenize", json={"tokens": tokens}).json() == {"content": text}
    pieces = client.post("/tokenize", json={"content": text, "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == tokens
    raw = b"".join(p["piece"].encode() if isinstance(p["piece"], str) else bytes(p["piece"]) for p in pieces)
    assert raw.decode() == text
    # special tokens as plain text when parse_special is off; add_special adds a BOS only where the model wants one
    plain = client.post("/tokenize", json={"content": text, "parse_special": False}).json()["tokens"]
    assert engine.tokenizer.token_id("<|im_end|>") not in plain
    with_bos = client.post("/tokenize", json={"content": text, "add_special": True}).json()["tokens"]
    assert with_bos == engine.tokenize(text, add_bos=engine.tokenizer.add_bos, special=True)
    assert client.post("/detokenize", json={"tokens": []}).json() == {"content": ""}


def test_props(client, engine):
    props = client.get("/props").json()
    assert props["total_slots"] == 2 and props["model_path"] == "qwen"
    defaults = props["default_generation_settings"]
    assert defaults["n_ctx"] == 2048 and defaults["is_processing"] is False
    assert defaults["params"]["temperature"] == 0.8 and defaults["params"]["n_predict"] == -1
    assert "<|im_start|>" in props["chat_template"]   # the file's own Jinja template, as text
    assert props["build_info"].startswith("ggml_backend")
    assert engine.model_path not in json.dumps(props)   # no server paths


def test_slots_show_a_busy_slot(server, client):
    with httpx.Client(base_url=server, timeout=120) as other:
        idle = other.get("/slots").json()
        assert [s["id"] for s in idle] == [0, 1] and not any(s["is_processing"] for s in idle)
        with other.stream("POST", "/completion", json={"prompt": "Count from 1 to 50: 1, 2,", "n_predict": 24,
                                                       "temperature": 0, "stream": True, "ignore_eos": True}) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))   # generation under way
            busy = [s for s in client.get("/slots").json() if s["is_processing"]]
            assert len(busy) == 1
            slot = busy[0]
            assert slot["n_ctx"] == 2048 and slot["id_task"] >= 1 and slot["n_past"] >= slot["n_prompt_tokens"] > 0
            assert slot["params"]["n_predict"] == 24
            assert slot["next_token"]["has_next_token"] is True and 0 <= slot["next_token"]["n_remain"] <= 24
            now = metrics(client)
            assert now["llamacpp:requests_processing"] == 1
            assert now[f'ggml_backend:slot_busy{{slot="{slot["id"]}"}}'] == 1
            for _ in lines:   # to the end
                pass
        assert not any(s["is_processing"] for s in client.get("/slots").json())
        assert client.get("/slots", params={"fail_on_no_slot": 1}).status_code == 200


def test_metrics_are_prometheus_text(client):
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    declared = {}
    for line in r.text.splitlines():
        if line.startswith("# HELP "):
            assert len(line.split(" ", 3)) == 4, line
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            declared[name] = kind
        else:
            match = SAMPLE.match(line)
            assert match, f"not a sample line: {line!r}"
            assert match.group(1) in declared, f"{match.group(1)} has no # TYPE line"
    for name in ("llamacpp:prompt_tokens_total", "llamacpp:tokens_predicted_total", "llamacpp:n_decode_total",
                 "llamacpp:prompt_seconds_total", "llamacpp:tokens_predicted_seconds_total"):
        assert declared[name] == "counter"
    for name in ("llamacpp:prompt_tokens_seconds", "llamacpp:predicted_tokens_seconds",
                 "llamacpp:requests_processing", "llamacpp:requests_deferred", "ggml_backend:slot_busy"):
        assert declared[name] == "gauge"
    before = metrics(client)
    reply = complete(client, prompt="print(", n_predict=5, temperature=0)
    after = metrics(client)
    assert after["llamacpp:prompt_tokens_total"] == before["llamacpp:prompt_tokens_total"] + reply["tokens_evaluated"]
    assert after["llamacpp:tokens_predicted_total"] == \
        before["llamacpp:tokens_predicted_total"] + reply["tokens_predicted"]
    assert after["llamacpp:tokens_predicted_seconds_total"] > before["llamacpp:tokens_predicted_seconds_total"]
    assert after["llamacpp:requests_processing"] == 0


BAD_REQUESTS = [
    ("/completion", "{not json", 400, "not valid JSON"),
    ("/completion", "[1, 2]", 400, "must be a JSON object"),
    ("/completion", {"prompt": 5}, 400, "'prompt' must be"),
    ("/completion", {"prompt": ["one", "two"]}, 400, "several prompts"),
    ("/completion", {"prompt": [1, 10 ** 9]}, 400, "outside the vocabulary"),
    ("/completion", {"prompt": "x", "n_predict": "8"}, 400, "'n_predict' must be an integer"),
    ("/completion", {"prompt": "x", "n_predict": 2.5}, 400, "'n_predict' must be an integer"),
    ("/completion", {"prompt": "x", "n_predict": -2}, 400, "'n_predict' must be >= -1"),
    ("/completion", {"prompt": "x", "temperature": "hot"}, 400, "'temperature' must be a number"),
    ("/completion", {"prompt": "x", "stop": 5}, 400, "'stop'"),
    ("/completion", {"prompt": "x", "stream": "yes"}, 400, "'stream' must be true or false"),
    ("/completion", {"prompt": "x", "n_probs": 1000}, 400, "'n_probs'"),
    ("/completion", {"prompt": "x", "logit_bias": [[1, "big"]]}, 400, "logit_bias"),
    ("/completion", {"prompt": "x", "samplers": ["temperature", "top_k"]}, 400, "one order"),
    ("/completion", {"prompt": "x", "grammar": "root ::= nothing"}, 400, "grammar"),
    ("/completion", {"prompt": "x", "json_schema": {"type": "string", "pattern": "(?<=a)b"}}, 400, "JSON schema"),
    ("/completion", {"prompt": "word " * 2100}, 400, "context"),
    ("/completion", {"prompt": "x", "model": "gpt-4"}, 404, "does not exist"),
    ("/tokenize", {"text": "x"}, 400, "'content' is required"),
    ("/detokenize", {"tokens": ["a"]}, 400, "'tokens' must be a list of token ids"),
    ("/detokenize", {"tokens": [-1]}, 400, "outside the vocabulary"),
]


@pytest.mark.parametrize("path, body, status, message", BAD_REQUESTS,
                         ids=[f"{p}:{m}" for p, _, _, m in BAD_REQUESTS])
def test_bad_input_gets_llamacpp_errors(client, path, body, status, message):
    if isinstance(body, str):
        r = client.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"code", "message", "type"} and error["code"] == status
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert message in error["message"]


def test_api_key_small_context_and_several_models():
    """A server with a key, a 64-token context and a second model never asked for."""
    real_model("qwen")
    models = [ModelConfig(alias="tiny", n_ctx=64, n_parallel=1), ModelConfig(alias="spare", n_ctx=64, n_parallel=1)]
    with running_server(models=models, api_key="k") as (url, _), httpx.Client(base_url=url, timeout=120) as c:
        assert c.get("/health").json() == {"status": "ok"}   # open without the key
        r = c.post("/completion", json={"prompt": "x", "n_predict": 1})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert c.get("/metrics").status_code == 401
        key = {"Authorization": "Bearer k"}
        # n_predict -1 (and anything larger) runs to the end of the slot's context
        prompt = "Write a long story about a cat. " * 3
        for n_predict in (-1, 500):
            reply = c.post("/completion", headers=key, json={"prompt": prompt, "n_predict": n_predict,
                                                             "temperature": 0, "ignore_eos": True}).json()
            assert reply["stop_type"] == "limit" and reply["truncated"] is True
            assert reply["tokens_evaluated"] + reply["tokens_predicted"] == 64
        text = c.get("/metrics", headers=key).text
        assert 'llamacpp:tokens_predicted_total{model="tiny"}' in text
        assert 'llamacpp:tokens_predicted_total{model="spare"} 0' in text
        assert 'ggml_backend:model_loaded{model="spare"} 0' in text   # scraping loads nothing
        assert c.get("/metrics", headers=key, params={"model": "nope"}).status_code == 404


def test_json_schema_and_grammar_constrain_the_completion(client):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    r = complete(client, prompt="A JSON object with a number:", n_predict=32, temperature=1.0, seed=5,
                 json_schema=schema)
    assert set(json.loads(r["content"])) == {"n"} and r["stop"] is True
    r = complete(client, prompt="Yes or no?", n_predict=8, temperature=1.0, seed=5, grammar='root ::= "yes" | "no"')
    assert r["content"] in ("yes", "no")
