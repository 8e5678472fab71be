"""Scale-out on Ray, on one local Ray cluster this module starts and stops (4 logical CPUs on the 2 cores: the
Serve replicas and the batch actors may then exist at once, whatever order the tests run in).

* ``ggml-backend batch --ray``: on the real model, the records of 2 Ray Data actors are those of one process; a run
  resumed after an interruption (Parquet in) finishes the job without running a line twice.
* ``ggml-backend serve --ray``: two replicas of the tiny synthetic model, one slot and one thread each: the
  `openai` client through Ray's proxy, the API key, the errors (status and JSON those of the one-process app) and a
  replica killed in the middle of a stream.
"""
from __future__ import annotations

import json
import os
import threading
import time

import pytest

ray = pytest.importorskip("ray", reason="the scale-out tests need Ray (pip install 'ggml-backend[ray]')")
serve = pytest.importorskip("ray.serve", reason="the Serve tests need Ray Serve (pip install 'ggml-backend[ray]')")
pytest.importorskip("ray.data", reason="the batch --ray tests need Ray Data (pip install 'ggml-backend[ray]')")
openai = pytest.importorskip("openai", reason="the clients' side of the Serve tests is the openai package")
httpx = pytest.importorskip("httpx", reason="the raw requests of the Serve tests use httpx")

from fastapi.testclient import TestClient  # noqa: E402

from ggml_backend.batch import read_journal, run_local  # noqa: E402
from ggml_backend.batch_ray import check_cpus, run_ray  # noqa: E402
from ggml_backend.server import ModelConfig, ServerConfig, create_app  # noqa: E402
from ggml_backend.server.ray_serve import APP_NAME, application, build_app, deployment_options, parse_autoscale  # noqa: E402,E501
from refdata import real_model  # noqa: E402
from server_fixtures import free_port  # noqa: E402

MODEL = os.path.join(os.path.dirname(__file__), "data", "synthetic", "tiny-llama-q4_0.gguf")
SYNTHETIC = MODEL


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


# ------------------------------------------------------------------------------------------------ batch --ray
REAL_LINES = [
    {"id": "rev", "messages": [{"role": "user", "content": "Reverse a string in Python. Code only."}],
     "max_tokens": 8, "temperature": 0, "stop": ["\n\n"]},
    {"id": "fib", "prompt": "def fib(n):", "max_tokens": 8, "temperature": 0},
    {"id": "json", "messages": [{"role": "user", "content": "Give a JSON object with a key 'x'."}],
     "max_tokens": 8, "temperature": 0, "response_format": {"type": "json_object"}},
    {"id": "rev", "prompt": "a repeated id"},
]


def write_jsonl(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def by_key(path):
    return {(r["id"], r["line"]): r for r in read_journal(str(path))}


def test_two_actors_give_the_one_process_records_on_the_real_model(tmp_path, cluster):
    model = str(real_model("qwen"))
    src, local, spread = tmp_path / "in.jsonl", tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    write_jsonl(src, REAL_LINES)
    one = run_local(str(src), str(local), model_path=model, n_ctx=512, n_threads=1, progress=False)
    two = run_ray(str(src), str(spread), model_path=model, n_ctx=512, n_threads=1, workers=2, progress=False)
    assert (one.written, two.written, one.errors, two.errors) == (4, 4, 1, 1)
    assert by_key(spread) == by_key(local)
    records = by_key(local)
    assert records[("fib", 2)]["usage"]["completion_tokens"] == 8 and records[("fib", 2)]["text"]
    assert records[(None, 4)]["error"].startswith("line 4: duplicate id \"rev\"")
    assert records[("json", 3)]["text"].lstrip().startswith("{")   # constrained by response_format


def test_resume_on_ray_after_a_partial_output(tmp_path, cluster):
    pa = pytest.importorskip("pyarrow", reason="Ray Data brings pyarrow; the input here is Parquet")
    import pyarrow.parquet as pq
    rows = [{"id": i, "prompt": f"Line {i}", "max_tokens": 4, "temperature": 0.0} for i in range(6)]
    src, ref, out = tmp_path / "in.parquet", tmp_path / "ref.jsonl", tmp_path / "out.jsonl"
    pq.write_table(pa.Table.from_pylist(rows), src)
    run_local(str(src), str(ref), model_path=SYNTHETIC, n_ctx=256, n_threads=1, progress=False)
    done = ref.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(done[:2]) + done[2][:11])   # interrupted while writing the third record
    summary = run_ray(str(src), str(out), model_path=SYNTHETIC, n_ctx=256, n_threads=1, workers=1, progress=False)
    assert (summary.skipped, summary.written, summary.errors) == (2, 4, 0)
    lines = out.read_bytes().splitlines()
    assert len(lines) == 6 and sorted(lines) == sorted(ref.read_bytes().splitlines())


# ------------------------------------------------------------------------------------------------ serve --ray

KEY = "ray-test-key"
EOS = 2   # the synthetic model's end of text, banned where a stream must stay in flight


def make_config() -> ServerConfig:
    return ServerConfig(models=[ModelConfig(alias="tiny", path=MODEL, n_ctx=1024, n_parallel=1, n_threads=1)],
                        api_key=KEY, max_body_bytes=64 * 1024)


@pytest.fixture(scope="module")
def ray_app(cluster):
    """(base URL, the same app in this process) with 2 replicas; Serve is shut down at the end."""
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(application(make_config(), replicas=2, cpus_per_replica=1), name=APP_NAME, route_prefix="/")
        with TestClient(create_app(make_config())) as local:
            yield f"http://127.0.0.1:{port}", local
    finally:
        serve.shutdown()


def running_replicas() -> int:
    status = serve.status().applications[APP_NAME].deployments["GGMLServer"]
    return status.replica_states.get("RUNNING", 0)


def client(base: str, key: str = KEY):
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)


def test_openai_client_through_two_replicas(ray_app):
    base, local = ray_app
    assert running_replicas() == 2
    api = client(base)
    out = api.completions.create(model="tiny", prompt="Hello", max_tokens=8, temperature=0)
    expected = local.post("/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": "tiny", "prompt": "Hello", "max_tokens": 8, "temperature": 0}).json()
    assert out.choices[0].text == expected["choices"][0]["text"]
    assert out.usage.completion_tokens == 8
    parts = [c.choices[0].delta.content or "" for c in api.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0, stream=True)
        if c.choices]
    chat = api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                       temperature=0)
    assert "".join(parts) == chat.choices[0].message.content and chat.usage.completion_tokens == 6
    assert [m.id for m in api.models.list().data] == ["tiny"]


@pytest.mark.parametrize("case", ["no key", "wrong key", "bad field", "body too large", "no route", "no model"])
def test_errors_are_the_single_process_ones(ray_app, case):
    base, local = ray_app
    headers = {"Authorization": f"Bearer {KEY}"}
    path, body = "/v1/completions", {"model": "tiny", "prompt": "Hello", "max_tokens": 4}
    if case == "no key":
        headers = {}
    elif case == "wrong key":
        headers = {"X-API-Key": "not-it"}
    elif case == "bad field":
        body["temperature"] = "hot"
    elif case == "body too large":
        body["prompt"] = "x" * (70 * 1024)
    elif case == "no route":
        path = "/v1/nothing-here"
    else:
        body["model"] = "gpt-4"
    remote = httpx.post(base + path, json=body, headers=headers, timeout=60)
    expected = local.post(path, json=body, headers=headers)
    assert remote.status_code == expected.status_code >= 400
    assert remote.json() == expected.json()
    if case == "no key":
        assert remote.status_code == 401 and remote.headers["www-authenticate"] == "Bearer"
        assert httpx.get(base + "/health", timeout=30).status_code == 200   # the open route stays open


def test_wrong_key_through_the_openai_client(ray_app):
    base, _ = ray_app
    with pytest.raises(openai.AuthenticationError):
        client(base, key="wrong").completions.create(model="tiny", prompt="Hi", max_tokens=2)


def _stream(base: str, result: dict, first_chunk: threading.Event):
    """A long stream (end of text banned): result["done"] says whether it ended with [DONE]."""
    body = {"model": "tiny", "prompt": "Once", "max_tokens": 400, "temperature": 0, "stream": True,
            "logit_bias": {str(EOS): -100}, "stream_options": {"include_usage": True}}
    result["done"], result["chunks"] = False, 0
    try:
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120,
                          headers={"Authorization": f"Bearer {KEY}"}) as response:
            result["status"] = response.status_code
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        break
                    result["chunks"] += 1
                    result["usage"] = chunk.get("usage") or result.get("usage")
                    first_chunk.set()
                elif line == "data: [DONE]":
                    result["done"] = True
    except httpx.HTTPError as exc:
        result["error"] = repr(exc)
    finally:
        first_chunk.set()


def test_a_killed_replica_loses_only_its_request_and_is_replaced(ray_app):
    base, _ = ray_app
    assert running_replicas() == 2
    # each replica takes one request at a time (one slot): two streams hold both, two more wait in Ray's router
    streams = [({}, threading.Event()) for _ in range(2)]
    threads = [threading.Thread(target=_stream, args=(base, r, e)) for r, e in streams]
    for t in threads:
        t.start()
    for _, event in streams:
        assert event.wait(120)
    queued = [{} for _ in range(2)]

    def complete(result):
        try:
            out = client(base).completions.create(model="tiny", prompt="Hello", max_tokens=8, temperature=0)
            result["text"] = out.choices[0].text
        except openai.OpenAIError as exc:
            result["error"] = repr(exc)
    waiting = [threading.Thread(target=complete, args=(r,)) for r in queued]
    for t in waiting:
        t.start()
    names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                   if a["name"].startswith(f"SERVE_REPLICA::{APP_NAME}#GGMLServer"))
    assert len(names) == 2
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    for t in threads + waiting:
        t.join(180)
    lost = [r for r, _ in streams if not r["done"]]
    assert len(lost) == 1, streams   # the stream on the killed replica, and only it
    assert [r for r, _ in streams if r["done"]][0]["usage"]["completion_tokens"] == 400
    assert all("text" in r for r in queued), queued   # the waiting requests went to a live replica
    deadline = time.monotonic() + 120
    while running_replicas() < 2 or names[0] in {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}:
        assert time.monotonic() < deadline, "the killed replica was not replaced"
        time.sleep(1)
    assert client(base).completions.create(model="tiny", prompt="Hello", max_tokens=8,
                                           temperature=0).choices[0].text == queued[0]["text"]


def test_options_and_builder_checks():
    config = make_config()
    options = deployment_options(config, autoscale=(1, 3))
    assert options["autoscaling_config"]["min_replicas"] == 1 and options["autoscaling_config"]["max_replicas"] == 3
    assert options["max_ongoing_requests"] == 1 and "num_replicas" not in options
    assert deployment_options(config, replicas=2)["num_replicas"] == 2
    assert parse_autoscale("0:4") == (0, 4)
    for bad in ("4", "3:1", "a:b", "-1:2"):
        with pytest.raises(ValueError, match="autoscale"):
            parse_autoscale(bad)
    with pytest.raises(ValueError, match="not both"):
        deployment_options(config, replicas=2, autoscale=(1, 2))
    with pytest.raises(TypeError, match="unknown ggml-backend application args: replica"):
        build_app({"model": MODEL, "replica": 2})


def test_the_serve_yaml_example_is_valid():
    """examples/ray/serve.yaml is accepted by Ray Serve's own schema, and its args by build_app."""
    import yaml
    from ray.serve.schema import ServeDeploySchema
    path = os.path.join(os.path.dirname(__file__), "..", "examples", "ray", "serve.yaml")
    with open(path) as f:
        data = yaml.safe_load(f)
    schema = ServeDeploySchema.model_validate(data) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(data)
    app = schema.applications[0]
    assert app.import_path == "ggml_backend.server.ray_serve:build_app"
    args = dict(app.args, model=MODEL)   # the example's path exists on a cluster, not here
    bound = build_app(args)
    deployment = bound._bound_deployment
    assert deployment._deployment_config.autoscaling_config.max_replicas == 4
    assert deployment._deployment_config.max_ongoing_requests == 4
    assert deployment.ray_actor_options["num_cpus"] == 2


def test_serve_command_line_errors(capsys):
    """Mistakes in the Ray options are one line and exit status 1, before any cluster is started."""
    from ggml_backend.cli.main import main
    for argv, message in [(["serve", "--replicas", "2", "-m", MODEL], "--replicas, --autoscale and --ray-address "
                                                                       "need --ray"),
                          (["serve", "--ray", "--autoscale", "3:1", "-m", MODEL], "need 0 <= MIN <= MAX"),
                          (["serve", "--ray", "--replicas", "2", "--autoscale", "1:2", "-m", MODEL], "not both"),
                          (["serve", "--ray", "--replicas", "0", "-m", MODEL], "--replicas must be a positive"),
                          (["serve", "--ray", "-m", MODEL + ".missing"], "model file not found")]:
        assert main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_more_workers_than_the_cluster_has_cpus(capsys):
    """A cluster started for the run never grows: asking more CPUs than it has is an error, not a wait forever;
    a cluster joined with --ray-address may grow, so there it is a warning."""
    check_cpus(2, 1, 2.0, own_cluster=True)
    with pytest.raises(ValueError, match="4 workers of 2 thread.s. need 8 CPUs; the Ray cluster has 2: lower"):
        check_cpus(4, 2, 2.0, own_cluster=True)
    check_cpus(4, 2, 2.0, own_cluster=False)
    assert "warning: 4 workers of 2 thread(s) need 8 CPUs" in capsys.readouterr().err
