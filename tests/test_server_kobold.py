"""``ggml-backend serve``'s KoboldAI / KoboldCpp dialect, called over HTTP the way KoboldAI Lite and SillyTavern call
it: the info routes, generation (plain, streamed, polled with ``genkey``, aborted), KoboldCpp's cut to
``max_context_length``, tokens, perf, bad input and the API key. Replies at temperature 0 are compared with the
engine's own. Everything talks to 127.0.0.1 only."""
from __future__ import annotations

import json
import threading
import time

import pytest

httpx = pytest.importorskip("httpx", reason="httpx (a dev dependency: pip install -e '.[dev]') is the HTTP client these server tests speak through")
pytest.importorskip("fastapi", reason="the server extra (fastapi, uvicorn, sse-starlette: pip install -e '.[server]') is not installed")
pytest.importorskip("sse_starlette", reason="the server extra (fastapi, uvicorn, sse-starlette: pip install -e '.[server]') is not installed")


from server_fixtures import running_server  # noqa: E402

PROMPT = "Once upon a time"
#: what KoboldAI Lite sends besides the prompt (its defaults: rep_pen 1.07 over 360 tokens with slope 0.7)
LITE_FIELDS = {"n": 1, "max_context_length": 2048, "rep_pen": 1.07, "temperature": 0, "top_p": 0.92, "top_k": 100,
               "top_a": 0, "typical": 1, "tfs": 1, "rep_pen_range": 360, "rep_pen_slope": 0.7,
               "sampler_order": [6, 0, 1, 3, 4, 2, 5], "memory": "", "trim_stop": True, "genkey": "KCPP1234",
               "min_p": 0, "dynatemp_range": 0, "dynatemp_exponent": 1, "smoothing_factor": 0, "banned_tokens": [],
               "render_special": False, "presence_penalty": 0, "logit_bias": {}, "quiet": True,
               "use_default_badwordsids": False, "bypass_eos": False, "dry_multiplier": 0, "dry_base": 1.75,
               "dry_allowed_length": 2, "dry_penalty_last_n": 360, "dry_sequence_breakers": ["\n", ":", "\"", "*"],
               "xtc_threshold": 0.2, "xtc_probability": 0, "stop_sequence": []}


@pytest.fixture(scope="module")
def server(default_server):
    return default_server   # conftest.py: one default server for every dialect's tests


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server[0], timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def engine(qwen_engine):
    """The engine alone, for the replies the server must equal."""
    return qwen_engine


def generate(client, **fields) -> dict:
    reply = client.post("/api/v1/generate", json=fields)
    assert reply.status_code == 200, reply.text
    results = reply.json()["results"]
    assert len(results) == 1
    return results[0]


def alone(engine, prompt, **kwargs) -> dict:
    out = engine.create_completion(prompt, **{"temperature": 0, **kwargs})
    return {"text": out["choices"][0]["text"], "finish_reason": out["choices"][0]["finish_reason"],
            "prompt_tokens": out["usage"]["prompt_tokens"], "completion_tokens": out["usage"]["completion_tokens"]}


def stream_events(client, **fields) -> list[tuple[str, dict]]:
    events, name = [], None
    with client.stream("POST", "/api/extra/generate/stream", json=fields) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        for line in reply.iter_lines():
            if line.startswith("event:"):
                name = line[len("event:"):].strip()
            elif line.startswith("data:"):
                events.append((name, json.loads(line[len("data:"):].strip())))
    return events


def assert_kobold_error(reply, status: int, words: str) -> None:
    assert reply.status_code == status, reply.text
    detail = reply.json()["detail"]
    assert set(detail) == {"msg", "type"} and words in detail["msg"], detail


# --- what the server is -------------------------------------------------------------------------------------
def test_info_routes(client):
    assert client.get("/api/v1/model").json() == {"result": "koboldcpp/qwen"}
    assert client.get("/api/latest/model").json() == {"result": "koboldcpp/qwen"}
    assert client.get("/api/v1/info/version").json() == {"result": "1.2.5"}
    version = client.get("/api/extra/version").json()
    assert version["result"] == "KoboldCpp" and isinstance(version["version"], str)
    assert version["protected"] is False and version["llm"] is True
    assert not any(version[k] for k in ("txt2img", "vision", "audio", "transcribe", "tts", "embeddings",
                                        "websearch", "multiplayer"))
    assert version["server"] == "ggml_backend"
    assert client.get("/api/v1/config/max_length").json() == {"value": 200}
    assert client.get("/api/v1/config/max_context_length").json() == {"value": 2048}   # 4096 over 2 slots
    assert client.get("/api/extra/true_max_context_length").json() == {"value": 2048}
    assert client.get("/api/extra/preloadstory").json() == {}


# --- generation ---------------------------------------------------------------------------------------------
def test_generate_is_the_engines(client, engine):
    result = generate(client, prompt=PROMPT, max_length=16, temperature=0)
    ref = alone(engine, PROMPT, max_tokens=16)
    assert result == dict(ref, logprobs=None)
    assert result["finish_reason"] == "length" and result["completion_tokens"] == 16


def test_generate_maps_the_repetition_penalty(client, engine):
    result = generate(client, prompt="one two one two one two", max_length=12, temperature=0, rep_pen=1.5,
                      rep_pen_range=8, presence_penalty=0.3)
    ref = alone(engine, "one two one two one two", max_tokens=12, repeat_penalty=1.5, repeat_last_n=8,
                presence_penalty=0.3)
    assert result["text"] == ref["text"]
    plain = alone(engine, "one two one two one two", max_tokens=12)
    assert result["text"] != plain["text"]   # the penalty did something


def test_a_lite_request_is_served(client, engine):
    result = generate(client, prompt=PROMPT, max_length=8, **LITE_FIELDS)
    ref = alone(engine, PROMPT, max_tokens=8, repeat_penalty=1.07, repeat_last_n=360, repeat_penalty_slope=0.7)
    assert result["text"] == ref["text"]


def test_top_a_and_the_penalty_slope_are_honoured(client, engine):
    """KoboldCpp's Top-A and rep_pen_slope (SillyTavern and Lite send them): the same seed gives the engine's
    text with the same settings, and the settings change the text."""
    prompt = "one two three one two three one two three"
    settings = dict(max_length=16, temperature=1.5, top_k=0, top_p=1, min_p=0, sampler_seed=7, rep_pen=1.3,
                    rep_pen_range=16)
    engine_settings = dict(max_tokens=16, temperature=1.5, top_k=0, top_p=1, min_p=0, seed=7,
                           repeat_penalty=1.3, repeat_last_n=16)
    for top_a, slope in ((0.2, 0.5), (0.0, 0.0)):
        result = generate(client, prompt=prompt, top_a=top_a, rep_pen_slope=slope, **settings)
        ref = alone(engine, prompt, top_a=top_a, repeat_penalty_slope=slope if slope > 0 else 1.0,
                    **engine_settings)
        assert result["text"] == ref["text"]
    plain = alone(engine, prompt, **engine_settings)
    cut = alone(engine, prompt, top_a=0.2, repeat_penalty_slope=0.5, **engine_settings)
    assert cut["text"] != plain["text"]


def test_stop_sequence(client, engine):
    ref = alone(engine, PROMPT, max_tokens=24, stop=["Lily"])
    assert ref["finish_reason"] == "stop"
    trimmed = generate(client, prompt=PROMPT, max_length=24, temperature=0, stop_sequence=["Lily"])
    assert trimmed["text"] == ref["text"] and trimmed["finish_reason"] == "stop"
    assert trimmed["completion_tokens"] == ref["completion_tokens"]
    kept = generate(client, prompt=PROMPT, max_length=24, temperature=0, stop_sequence=["Lily"], trim_stop=False)
    assert kept["text"] == ref["text"] + "Lily" and kept["finish_reason"] == "stop"


def test_end_token_and_its_ban(client, engine):
    prompt = "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"
    ended = generate(client, prompt=prompt, max_length=24, temperature=0)
    assert ended == dict(alone(engine, prompt, max_tokens=24), logprobs=None)
    assert ended["finish_reason"] == "stop" and ended["completion_tokens"] < 24
    banned = generate(client, prompt=prompt, max_length=ended["completion_tokens"] + 4, temperature=0,
                      use_default_badwordsids=True)
    bias = {t: float("-inf") for t in engine.tokenizer.eog_ids}
    ref = alone(engine, prompt, max_tokens=ended["completion_tokens"] + 4, logit_bias=bias)
    assert banned["text"] == ref["text"] and banned["finish_reason"] == "length"


def test_stream_concatenates_to_the_reply(client):
    fields = {"prompt": PROMPT, "max_length": 16, "temperature": 0, "stop_sequence": ["named"]}
    whole = generate(client, **fields)
    events = stream_events(client, **fields)
    assert all(name == "message" for name, _ in events)
    assert all(set(data) == {"token", "finish_reason"} for _, data in events)
    assert all(data["finish_reason"] is None for _, data in events[:-1])
    assert events[-1][1]["finish_reason"] == whole["finish_reason"] == "stop"
    assert "".join(data["token"] for _, data in events) == whole["text"]
    assert len(events) > 3   # it came in pieces


def test_max_context_length_cuts_the_prompt_front(client, engine):
    long_prompt = " ".join(f"item{i}" for i in range(600))
    tokens = engine.tokenize(long_prompt, add_bos=False, special=True)
    assert len(tokens) > 2048
    # with no budget given, a prompt the slot cannot hold is an error, not a silent cut
    reply = client.post("/api/v1/generate", json={"prompt": long_prompt, "max_length": 8})
    assert_kobold_error(reply, 400, "context")
    # with max_context_length, KoboldCpp keeps the prompt's tail: max_context_length - max_length tokens
    result = generate(client, prompt=long_prompt, max_length=8, max_context_length=128, temperature=0)
    assert result["prompt_tokens"] == 120
    assert result["text"] == alone(engine, tokens[-120:], max_tokens=8)["text"]
    # a memory stays whole in front of the prompt's tail
    memory = "Memory: a list of items.\n"
    memory_tokens = engine.tokenize(memory, add_bos=False, special=True)
    result = generate(client, prompt=long_prompt, memory=memory, max_length=8, max_context_length=128,
                      temperature=0)
    assert result["prompt_tokens"] == 120
    kept = memory_tokens + tokens[-(120 - len(memory_tokens)):]
    assert result["text"] == alone(engine, kept, max_tokens=8)["text"]


def test_check_and_abort_by_genkey(client):
    """A long generation polled with its genkey, then aborted: it stops within a token and its request answers
    with the text so far."""
    fields = {"prompt": "Write a very long story about a dragon.", "max_length": 400, "temperature": 0,
              "genkey": "KCPP-test-1", "use_default_badwordsids": True}
    out = {}

    def run():
        out["reply"] = client.post("/api/v1/generate", json=fields)
        out["ended"] = time.monotonic()
    worker = threading.Thread(target=run)
    worker.start()
    try:
        deadline = time.monotonic() + 60
        polled = ""
        while len(polled) < 10:
            assert time.monotonic() < deadline, "no text came"
            time.sleep(0.05)
            reply = client.post("/api/extra/generate/check", json={"genkey": "KCPP-test-1"})
            polled = reply.json()["results"][0]["text"]
        # another client's key, or none, touches nothing
        assert client.post("/api/extra/generate/check", json={"genkey": "other"}).json() == {"results": [{"text": ""}]}
        assert client.post("/api/extra/abort", json={"genkey": "other"}).json() == {"success": "false",
                                                                                   "done": "false"}
        assert client.post("/api/extra/abort").json()["success"] == "false"
        aborted = time.monotonic()
        assert client.post("/api/extra/abort", json={"genkey": "KCPP-test-1"}).json() == {"success": "true",
                                                                                         "done": "true"}
    finally:
        worker.join(120)
    assert out["ended"] - aborted < 5, "the generation went on after the abort"
    result = out["reply"].json()["results"][0]
    assert result["text"].startswith(polled) and result["finish_reason"] == "length"
    assert 0 < result["completion_tokens"] < 400
    # it is over: nothing to poll, nothing to abort
    assert client.post("/api/extra/generate/check", json={"genkey": "KCPP-test-1"}).json()["results"][0]["text"] == ""
    assert client.post("/api/extra/abort", json={"genkey": "KCPP-test-1"}).json()["success"] == "false"


def test_abort_without_a_key_stops_a_generation_without_one(client):
    """SillyTavern aborts with an empty body."""
    out = {}
    worker = threading.Thread(target=lambda: out.update(reply=client.post("/api/v1/generate", json={
        "prompt": "Count to one thousand:", "max_length": 400, "temperature": 0, "use_default_badwordsids": True})))
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while not client.get("/api/extra/generate/check").json()["results"][0]["text"]:
            assert time.monotonic() < deadline, "no text came"
            time.sleep(0.05)
        assert client.post("/api/extra/abort").json() == {"success": "true", "done": "true"}
    finally:
        worker.join(120)
    assert out["reply"].json()["results"][0]["completion_tokens"] < 400


def test_abort_of_a_request_waiting_in_line(client):
    """Both slots busy: a third request waits; aborting it by its genkey takes it out of the line at once."""
    out = {}

    def run(key):
        out[key] = client.post("/api/v1/generate", json={
            "prompt": "Write a very long story about a dragon.", "max_length": 400, "temperature": 0, "genkey": key,
            "use_default_badwordsids": True})
    busy = [threading.Thread(target=run, args=(key,)) for key in ("busy-1", "busy-2")]
    for worker in busy:
        worker.start()
    waiting = threading.Thread(target=run, args=("waiting",))
    try:
        deadline = time.monotonic() + 60
        for key in ("busy-1", "busy-2"):
            while not client.post("/api/extra/generate/check", json={"genkey": key}).json()["results"][0]["text"]:
                assert time.monotonic() < deadline, "no text came"
                time.sleep(0.05)
        waiting.start()
        while client.get("/api/extra/perf").json()["queue"] != 1:
            assert time.monotonic() < deadline, "the third request did not queue"
            time.sleep(0.05)
        assert client.post("/api/extra/abort", json={"genkey": "waiting"}).json()["success"] == "true"
        waiting.join(10)
        assert not waiting.is_alive(), "the aborted request still waits"
        result = out["waiting"].json()["results"][0]
        assert (result["text"], result["finish_reason"], result["completion_tokens"]) == ("", "length", 0)
    finally:
        for key in ("busy-1", "busy-2"):
            client.post("/api/extra/abort", json={"genkey": key})
        for worker in busy:
            worker.join(120)
    assert all(out[key].json()["results"][0]["completion_tokens"] < 400 for key in ("busy-1", "busy-2"))


def test_perf_reports_the_last_generation(client):
    result = generate(client, prompt=PROMPT, max_length=8, temperature=0.7, sampler_seed=4242)
    perf = client.get("/api/extra/perf").json()
    assert perf["last_seed"] == 4242 and perf["stop_reason"] == 0
    assert perf["last_token_count"] == result["completion_tokens"] == 8
    assert perf["last_input_count"] == result["prompt_tokens"]
    assert perf["total_gens"] >= 1 and perf["queue"] == 0 and perf["idle"] == 1
    assert perf["last_eval"] > 0 and perf["uptime"] > 0 and perf["hordeexitcounter"] == 0
    # the same seed gives the same text
    assert generate(client, prompt=PROMPT, max_length=8, temperature=0.7, sampler_seed=4242)["text"] == result["text"]


# --- tokens ---------------------------------------------------------------------------------------------------
def test_tokenize_detokenize_round_trip(client, engine):
    text = "Hello, world! ünïcödé 🙂 <|im_end|>"
    counted = client.post("/api/extra/tokencount", json={"prompt": text}).json()
    assert counted["ids"] == engine.tokenize(text, add_bos=False, special=True)
    assert counted["value"] == len(counted["ids"])
    assert client.post("/api/extra/tokenize", json={"prompt": text}).json() == counted
    back = client.post("/api/extra/detokenize", json={"ids": counted["ids"]}).json()
    assert back == {"result": text, "success": True}
    chat = client.post("/api/extra/tokencount", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["value"] == len(engine.render_chat_prompt([{"role": "user", "content": "hi"}])[0])


# --- bad input --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (b"", 400, "empty"),
    (json.dumps({"prompt": PROMPT, "max_length": "ten"}).encode(), 400, "'max_length' must be an integer"),
    (json.dumps({"prompt": PROMPT, "max_length": -5}).encode(), 400, "'max_length' must be >= 1"),
    (json.dumps({"prompt": PROMPT, "temperature": "hot"}).encode(), 400, "'temperature' must be a number"),
    (json.dumps({"prompt": 42}).encode(), 400, "'prompt' must be a string"),
    (json.dumps({"prompt": PROMPT, "top_p": 2}).encode(), 400, "'top_p' must be from 0.0 to 1.0"),
    (json.dumps({"prompt": PROMPT, "stop_sequence": [1]}).encode(), 400, "'stop_sequence'"),
    (json.dumps({"prompt": PROMPT, "top_a": -0.5}).encode(), 400, "top_a"),
    (json.dumps({"prompt": PROMPT, "sampler_order": [5, 6, 0, 1, 3, 4, 2], "temperature": 0.7,
                 "rep_pen": 1.1}).encode(), 400, "sampler_order"),
    (json.dumps({"prompt": PROMPT, "grammar": "root ::= undefined"}).encode(), 400, "grammar"),
    (json.dumps({"prompt": PROMPT, "banned_tokens": ["dragon"]}).encode(), 400, "banned_tokens"),
    (json.dumps({"prompt": PROMPT, "logit_bias": {"999999999": -5}}).encode(), 400, "outside the vocabulary"),
    (json.dumps({"prompt": PROMPT, "model": "gpt-4"}).encode(), 404, "does not exist"),
])
def test_bad_generate_requests(client, body, status, words):
    reply = client.post("/api/v1/generate", content=body, headers={"Content-Type": "application/json"})
    assert_kobold_error(reply, status, words)


def test_bad_token_requests(client):
    assert_kobold_error(client.post("/api/extra/detokenize", json={"ids": ["a"]}), 400, "'ids'")
    assert_kobold_error(client.post("/api/extra/detokenize", json={"ids": [-1]}), 400, "outside the vocabulary")
    assert_kobold_error(client.post("/api/extra/tokencount", json={"prompt": ["x"]}), 400, "'prompt'")
    assert_kobold_error(client.post("/api/extra/abort", content=b"{oops"), 400, "not valid JSON")
    assert_kobold_error(client.get("/api/extra/nothing"), 404, "no route")


# --- the API key ----------------------------------------------------------------------------------------------
def test_api_key():
    with running_server(api_key="k") as (url, _):
        with httpx.Client(base_url=url, timeout=60) as c:
            assert c.get("/api/v1/model", headers={"X-API-Key": "k"}).json() == {"result": "koboldcpp/qwen"}
            assert c.get("/api/v1/model", headers={"Authorization": "Bearer k"}).status_code == 200
            assert c.get("/api/extra/version", headers={"X-API-Key": "k"}).json()["protected"] is True
            assert_kobold_error(c.get("/api/v1/model"), 401, "API key")
            assert_kobold_error(c.post("/api/v1/generate", json={"prompt": "x"}, headers={"X-API-Key": "no"}),
                                401, "API key")


def test_a_gbnf_grammar_constrains_the_story(client):
    result = generate(client, prompt="The answer is", max_length=16, temperature=1.0, sampler_seed=3,
                      grammar='root ::= " " ("yes" | "no") "."')
    assert result["text"] in (" yes.", " no.") and result["finish_reason"] == "stop"
