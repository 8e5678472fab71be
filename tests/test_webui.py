"""The Gradio web chat driven through gradio_client on the real default model (short replies, greedy decoding)."""
import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio", reason="the web UI needs gradio (pip install 'ggml-backend[gradio]')")
gradio_client = pytest.importorskip("gradio_client", reason="gradio_client (a dev dependency) drives the running web UI")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations" / "gradio"))

from ggml_backend import Llama  # noqa: E402
from ggml_backend.default_model import default_model_path  # noqa: E402
from ggml_backend.templates import JinjaTemplate, TextgenTemplate  # noqa: E402
from ggml_webui import build_app, launch  # noqa: E402
from ggml_webui import chat, template_store  # noqa: E402
from ggml_webui.settings import GenerationSettings, parse_stop_strings, preset_values  # noqa: E402

GREEDY = dict(temperature=0.0, top_k=1, top_p=1.0, min_p=0.0, repetition_penalty=1.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llama():
    return Llama(default_model_path(), n_ctx=1024, verbose=False)


@pytest.fixture(scope="module")
def templates_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("instruction-templates")
    old = os.environ.get(template_store.ENV_VAR)
    os.environ[template_store.ENV_VAR] = str(folder)
    yield folder
    if old is None:
        os.environ.pop(template_store.ENV_VAR, None)
    else:
        os.environ[template_store.ENV_VAR] = old


@pytest.fixture(autouse=True, scope="module")
def user_data_dir(tmp_path_factory):
    """Past chats, characters and presets go to a folder of the test's, never the user's (subprocesses too)."""
    from ggml_webui import user_data
    folder = tmp_path_factory.mktemp("webui-user-data")
    old = os.environ.get(user_data.ENV_VAR)
    os.environ[user_data.ENV_VAR] = str(folder)
    yield folder
    if old is None:
        os.environ.pop(user_data.ENV_VAR, None)
    else:
        os.environ[user_data.ENV_VAR] = old


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """The server's model directory: a corrupt model file, and a file of another kind that is never offered."""
    folder = tmp_path_factory.mktemp("models")
    (folder / "broken.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    (folder / "notes.txt").write_text("not a model")
    return folder


@pytest.fixture(scope="module")
def server(llama, templates_dir, models_dir):
    port = free_port()
    demo = launch(llama, port=port, model_dir=models_dir, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def client(url):
    return gradio_client.Client(url, verbose=False, httpx_kwargs={"timeout": 120})   # see test_webui_features


def messages(chatbot_value) -> list[tuple[str, str]]:
    """(role, text) pairs from the Chatbot value gradio_client returns."""
    out = []
    for message in chatbot_value:
        content = message["content"]
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content)
        out.append((message["role"], content))
    return out


def generate(c, message, n, **kwargs):
    job = c.submit(message=message, max_new_tokens=n, **GREEDY, **kwargs, api_name="/generate")
    chatbot_value, textbox = job.result(timeout=240)
    return job, messages(chatbot_value), textbox


# ---- pieces without a server ----------------------------------------------------------------------------------------

def test_presets_and_stop_strings():
    assert preset_values("simple-1") == {"temperature": 0.7, "top_p": 0.9, "top_k": 20, "min_p": 0.0,
                                         "repetition_penalty": 1.15}
    assert preset_values("Debug-deterministic")["temperature"] == 0.0
    assert parse_stop_strings(r'"\n", "\nYou:"') == ["\n", "\nYou:"]
    assert parse_stop_strings("###") == ["###"]
    assert parse_stop_strings("") == []
    with pytest.raises(ValueError):
        preset_values("nope")
    settings = GenerationSettings.from_values({"max_new_tokens": 8.0, "seed": -1.0, "ban_eos_token": True,
                                               "unknown": 1})
    assert settings.max_new_tokens == 8 and settings.seed == -1
    params = settings.sampling_params({151645, 151643})
    assert params.logit_bias == {151645: float("-inf"), 151643: float("-inf")} and params.seed is None


def test_model_template_as_textgen_fields(llama):
    jinja = JinjaTemplate.from_gguf_metadata(llama.model_file.metadata)
    derived = template_store.textgen_from_jinja(jinja)
    assert derived.fields() == {
        "user": "<|im_start|>user", "bot": "<|im_start|>assistant",
        "turn_template": r"<|user|>\n<|user-message|><|im_end|>\n<|bot|>\n<|bot-message|><|im_end|>\n",
        "context": "<|im_start|>system\n<|system-message|><|im_end|>\n",
        "system_message": "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."}
    conversation = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"}]
    assert derived.render(conversation) == jinja.render(conversation, add_generation_prompt=True)


def test_template_files_round_trip(templates_dir):
    mine = TextgenTemplate(user="Q:", bot="A:", turn_template="<|user|> <|user-message|>\n<|bot|> <|bot-message|>\n",
                           context="<|system-message|>\n", system_message="Be terse.")
    path = template_store.save_template("terse qa", mine)
    assert path == templates_dir / "terse qa.yaml" and path.read_text() == mine.to_yaml()
    assert "terse qa" in template_store.template_choices()
    assert template_store.load_named_template("terse qa") == mine
    with pytest.raises(ValueError):
        template_store.save_template("alpaca", mine)       # built-ins are not overwritten
    with pytest.raises(ValueError):
        template_store.save_template("../escape", mine)
    template_store.delete_template("terse qa")
    assert not path.exists() and "terse qa" not in template_store.template_choices()


def test_stream_never_shows_a_partial_stop_string(llama):
    spec = chat.PromptSettings(template=template_store.load_named_template("textgen-chatml"))
    prompt = spec.build_prompt([], "Say hello")
    settings = GenerationSettings(max_new_tokens=8, **GREEDY)
    full = list(chat.stream_reply(llama, prompt, settings, []))[-1]
    assert len(full) > 8
    stop = full[4:8]
    cut = full[:full.index(stop)]
    updates = list(chat.stream_reply(llama, prompt, settings, [stop]))
    assert updates[-1] == cut
    assert all(cut.startswith(u) for u in updates)           # no update ever shows part of the stop string
    # a stop string that starts matching but never completes is held back, then released at the end
    updates = list(chat.stream_reply(llama, prompt, settings, [full[4:8] + "\x00"]))
    assert updates[-1] == full and all(full.startswith(u) for u in updates)


def test_the_grammar_box_constrains_the_reply(llama):
    spec = chat.PromptSettings(template=template_store.load_named_template("textgen-chatml"))
    prompt = spec.build_prompt([], "Is the sky blue?")
    for seed in (1, 2):
        settings = GenerationSettings(max_new_tokens=16, temperature=1.0, seed=seed,
                                      grammar_string='root ::= "Yes." | "No."')
        assert list(chat.stream_reply(llama, prompt, settings, []))[-1] in ("Yes.", "No.")
    with pytest.raises(ValueError, match="undefined_rule"):
        list(chat.stream_reply(llama, prompt, GenerationSettings(grammar_string="root ::= undefined_rule"), []))


# ---- the running app ----------------------------------------------------------------------------------------------

def test_api_endpoints_are_named(server):
    api = client(server).view_api(return_format="dict", print_info=False)["named_endpoints"]
    for name in ("/generate", "/stop", "/continue", "/regenerate", "/remove_last", "/impersonate", "/show_prompt",
                 "/copy_last_reply", "/replace_last_reply", "/clear_history", "/load_model", "/save_template"):
        assert name in api
    names = [p["parameter_name"] for p in api["/generate"]["parameters"]]
    assert names[0] == "message" and {"turn_template", "max_new_tokens", "mode", "ban_eos_token",
                                      "grammar_string"} <= set(names)


def test_generate_streams_then_regenerate_and_remove(server):
    c = client(server)
    job, chat_messages, textbox = generate(c, "Say hello", 8)
    assert textbox == ""
    assert [role for role, _ in chat_messages] == ["user", "assistant"] and chat_messages[0][1] == "Say hello"
    reply = chat_messages[1][1]
    assert reply
    replies = [messages(out[0])[-1][1] for out in job.outputs() if len(out[0]) == 2]
    assert len(replies) >= 3 and replies[-1] == reply                   # streamed: several growing updates
    assert all(reply.startswith(r) for r in replies)
    # greedy: regenerating gives the same reply again, replacing (not adding) the exchange
    regenerated = messages(c.predict(max_new_tokens=8, **GREEDY, api_name="/regenerate")[0])
    assert regenerated == chat_messages
    assert c.predict(api_name="/copy_last_reply") == reply
    textbox, chatbot_value = c.predict(api_name="/remove_last")
    assert textbox == "Say hello" and chatbot_value == []


def test_stop_keeps_partial_reply(server):
    c = client(server)
    job = c.submit(message="Say hello", max_new_tokens=16, **GREEDY, api_name="/generate")
    deadline = time.time() + 120
    while time.time() < deadline:
        outputs = job.outputs()
        if outputs and len(outputs[-1][0]) == 2 and messages(outputs[-1][0])[1][1]:
            break
        time.sleep(0.2)
    c.predict(api_name="/stop")
    stopped = messages(job.result(timeout=120)[0])
    partial = stopped[1][1]
    assert partial
    assert len(llama_tokens(partial)) < 12                    # far fewer than the 16 asked for
    assert c.predict(api_name="/copy_last_reply") == partial  # kept in the session's history
    # the same greedy reply, only shorter: a prefix of an 8-token unstopped run in a fresh session
    _, full, _ = generate(client(server), "Say hello", 8)
    assert full[1][1].startswith(partial) or partial.startswith(full[1][1])


_TOKENIZER = {}


def llama_tokens(text):
    return _TOKENIZER["llama"].tokenize(text, add_bos=False)


@pytest.fixture(autouse=True, scope="module")
def _keep_tokenizer(llama):
    _TOKENIZER["llama"] = llama


def test_continue_extends_reply(server):
    c = client(server)
    _, first, _ = generate(c, "Name three colors.", 4)
    continued = messages(c.predict(max_new_tokens=4, **GREEDY, api_name="/continue")[0])
    assert len(continued) == 2 and continued[0] == first[0]
    assert continued[1][1].startswith(first[1][1]) and len(continued[1][1]) > len(first[1][1])
    cleared = c.predict(api_name="/clear_history")
    assert (cleared[0] if isinstance(cleared, tuple) else cleared) == []
    assert c.predict(api_name="/copy_last_reply") == ""                 # the history is empty too


def test_impersonate_writes_the_user_turn(server):
    c = client(server)
    text = c.predict(message="I would like", max_new_tokens=4, **GREEDY, api_name="/impersonate")
    assert text.startswith("I would like") and len(text) > len("I would like")


def test_turn_template_field_changes_the_prompt(server):
    c = client(server)
    default_prompt = c.predict(message="Hello", api_name="/show_prompt")
    assert default_prompt.endswith("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")
    custom = c.predict(message="Hello", user_string="Q:", bot_string="A:",
                       turn_template=r"<|user|> <|user-message|>\n<|bot|> <|bot-message|>\n",
                       context_instruct="<|system-message|>\n\n", system_message="Be brief.",
                       api_name="/show_prompt")
    assert custom == "Be brief.\n\nQ: Hello\nA:"
    custom_system = c.predict(message="Hello", custom_system_message="Answer in French.", api_name="/show_prompt")
    assert custom_system.startswith("<|im_start|>system\nAnswer in French.<|im_end|>\n")
    chat_mode = c.predict(message="Hello", mode="chat", name1="Ann", name2="Bot", character_context="A chat.",
                          api_name="/show_prompt")
    assert chat_mode == "A chat.\nAnn: Hello\nBot:"


def test_template_menu_and_save(server, templates_dir):
    c = client(server)
    fields = c.predict("alpaca", api_name="/select_template")
    assert fields[0] == "### Instruction:" and fields[1] == "### Response:"
    c.predict("my alpaca", *fields[:5], api_name="/save_template")
    saved = templates_dir / "my alpaca.yaml"
    assert TextgenTemplate.load(saved).fields()["user"] == "### Instruction:"
    c.predict("my alpaca", api_name="/delete_template")
    assert not saved.exists()


def test_corrupt_model_file_is_reported(server, models_dir):
    bad = models_dir / "broken.gguf"
    c = client(server)
    status, _info, _menu = c.predict("broken.gguf", 1024, 0, 0, api_name="/load_model")
    with pytest.raises(ValueError) as loader_error:
        Llama(str(bad), verbose=False)
    assert status == f"**Error:** {loader_error.value}"      # the loader's own message
    # the app keeps its model and keeps working
    assert c.predict(message="Hi", api_name="/show_prompt").endswith("<|im_start|>assistant\n")


def test_two_sessions_are_separate(server):
    a, b = client(server), client(server)
    results = {}

    def run(name, c, message):
        results[name] = generate(c, message, 4)[1]

    threads = [threading.Thread(target=run, args=("a", a, "Say red")),
               threading.Thread(target=run, args=("b", b, "Say blue"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert results["a"][0] == ("user", "Say red") and results["b"][0] == ("user", "Say blue")
    assert len(results["a"]) == 2 and len(results["b"]) == 2
    # each session's history holds only its own exchange
    assert a.predict(api_name="/remove_last")[0] == "Say red"
    assert b.predict(api_name="/remove_last")[0] == "Say blue"


def test_cli_rejects_bad_options(capsys):
    from ggml_backend.cli.main import main
    assert main(["webui", "--port", "70000"]) == 1
    assert "--port must be in 1..65535" in capsys.readouterr().err
    assert main(["webui", "--draft-max", "4"]) == 1
    assert "--draft-max needs --lookup" in capsys.readouterr().err
    assert main(["webui", "--lookup", "--api", "http://127.0.0.1:9"]) == 1
    assert "with --api the server drafts" in capsys.readouterr().err


def test_lookup_applies_to_every_model_loaded_here(tiny_path):
    """``webui --lookup --draft-max N``: the models the page loads draft by prompt lookup (the replies are plain
    decoding's: tests/test_speculative.py)."""
    from ggml_webui.model_manager import ModelManager
    manager = ModelManager(draft_max=6)
    llama = manager.load(str(tiny_path), n_ctx=64)
    assert llama.draft_model.num_pred_tokens == 6
    assert ModelManager().load(str(tiny_path), n_ctx=64).draft_model is None


def test_cli_serves_the_page_on_localhost():
    import subprocess
    import urllib.request
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[1] / "integrations" / "gradio"), os.environ.get("PYTHONPATH", "")]))
    process = subprocess.Popen([sys.executable, "-m", "ggml_backend", "webui", "-c", "256", "-t", "1",
                                "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        page = None
        while time.time() < deadline and process.poll() is None:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read().decode()
                break
            except OSError:
                time.sleep(0.5)
        assert page is not None, process.stdout.read().decode() if process.poll() is not None else "no page"
        assert "ggml_backend chat" in page
    finally:
        process.terminate()
        process.wait(timeout=30)


# ---- hardening (issue 19): login, model directory, uploads, template names, bounded errors ---------------------------

def _load_status(url, name):
    """What /load_model answers for ``name``: its status line, or the error the client raises."""
    try:
        return client(url).predict(name, 1024, 0, 0, api_name="/load_model")[0]
    except Exception as exc:  # noqa: BLE001 - gradio_client raises its AppError for refused values
        return f"refused: {exc}"


def test_models_are_chosen_from_the_model_directory_only(server, models_dir, tmp_path):
    c = client(server)
    c.predict(api_name="/list_models")   # the refresh button's endpoint answers
    from ggml_webui.model_manager import ModelManager
    manager = ModelManager(model_dir=models_dir)
    assert manager.model_files() == ["broken.gguf"]            # not notes.txt, not hidden files, not folders
    (tmp_path / "real.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    probes = ["/etc/passwd", "/etc", "/nonexistent/x.gguf", str(tmp_path / "real.gguf"), "../models/broken.gguf",
              str(models_dir / "notes.txt"), str(models_dir / "broken.gguf")]
    answers = {probe: _load_status(server, probe) for probe in probes}
    # one answer, whatever the path is and whether it exists: nothing about the server's files comes back
    assert len(set(answers.values())) == 1, answers
    (answer,) = set(answers.values())
    assert answer == "**Error:** choose a model file from the list (the GGUF/GGML files in the model directory)"
    for probe in probes:
        with pytest.raises(ValueError, match="choose a model file from the list"):
            manager.load_named(probe)
    # a listed file with a context size that would allocate terabytes is refused before loading
    status = c.predict("broken.gguf", 10**9, 0, 0, api_name="/load_model")[0]
    assert status.startswith("**Error:** n_ctx must be in 16..")


def test_listen_requires_a_login(llama, capfd):
    port = free_port()
    demo = launch(llama, port=port, listen=True, prevent_thread_lock=True, quiet=True)
    try:
        err = capfd.readouterr().err
        assert "login is required" in err
        password = err.split("password '")[1].split("'")[0]
        import urllib.error
        import urllib.request
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=30)
        assert refused.value.code == 401
        with pytest.raises(Exception):
            gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False, auth=("ggml", "wrong"))
        c = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False, auth=("ggml", password))
        assert c.predict(message="Hi", api_name="/show_prompt").endswith("<|im_start|>assistant\n")
    finally:
        demo.close()
    from ggml_webui.security import parse_auth, resolve_auth
    assert resolve_auth(None, listen=False, share=False) == (None, None)
    assert resolve_auth("ann:s3:cr3t", listen=True, share=False) == ([("ann", "s3:cr3t")], None)
    for bad in ("ann", ":pw", "ann:"):
        with pytest.raises(ValueError, match="USER:PASSWORD"):
            parse_auth(bad)
    from ggml_backend.cli.main import main
    assert main(["webui", "--listen", "--auth", "nopassword"]) == 1


def test_uploads_are_template_files_of_bounded_size(server):
    import urllib.error
    import urllib.request

    def upload(filename, data):
        boundary = "----ggmltest"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{filename}\"\r\n"
                f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
        request = urllib.request.Request(f"{server}gradio_api/upload", data=body, method="POST",
                                         headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code
    assert upload("page.html", b"<script>alert(1)</script>") == 415
    assert upload("tool.exe", b"MZ") == 415
    assert upload("big.yaml", b"x" * (300 * 1024)) == 413
    assert upload("mine.yaml", b"user: 'Q:'\nbot: 'A:'\n") == 200
    # the upload buttons: a template file fills the fields; a character card the character's fields
    template = Path(tempfile_dir()) / "uploaded.yaml"
    template.write_text("user: 'Q:'\nbot: 'A:'\nturn_template: '<|user|> <|user-message|>\\n<|bot|> <|bot-message|>\\n'\n")
    fields = client(server).predict(gradio_client.handle_file(str(template)), api_name="/upload_template")
    assert fields[0] == "Q:" and fields[1] == "A:"
    card = Path(tempfile_dir()) / "card.json"
    card.write_text('{"name": "Ada", "context": "Ada is a mathematician."}')
    name, context = client(server).predict(gradio_client.handle_file(str(card)), api_name="/upload_character")
    assert name == "Ada" and context.startswith("Ada is a mathematician.")


def tempfile_dir():
    import tempfile
    return tempfile.mkdtemp(prefix="webui-upload-")


def test_template_names_are_normalised(templates_dir):
    mine = TextgenTemplate(user="Q:", bot="A:", turn_template="<|user|> <|user-message|>\n<|bot|> <|bot-message|>\n")
    other = TextgenTemplate(user="U:", bot="B:", turn_template="<|user|> <|user-message|>\n<|bot|> <|bot-message|>\n")
    path = template_store.save_template("  my  qa ", mine)
    assert path.name == "my qa.yaml"
    # the same name up to whitespace and case is the same template: replaced only when asked
    for variant in ("my qa", "my qa  ", "\tmy\u00a0qa", "MY QA"):
        with pytest.raises(ValueError, match="exists already"):
            template_store.save_template(variant, other)
    assert template_store.load_named_template(" my qa") == mine
    assert template_store.save_template("My  QA", other, overwrite=True) == path
    assert template_store.load_named_template("my qa").user == "U:"
    assert sorted(p.name for p in templates_dir.iterdir()) == ["my qa.yaml"]
    for bad in ("../up", "a/b", "a\\b", ".hidden", "", "   ", "x" * 65, "bell\x07", "a:b"):
        with pytest.raises(ValueError, match="template names"):
            template_store.save_template(bad, mine)
    with pytest.raises(ValueError, match="built-in"):
        template_store.save_template(" Alpaca ", mine)
    template_store.delete_template(" my   qa ")
    assert not path.exists()


def test_error_messages_are_cut(server):
    from ggml_webui.security import MAX_ERROR_CHARS
    huge = "<|user|>" + "x" * 1_000_000
    c = client(server)
    with pytest.raises(Exception) as error:
        c.predict(message="Hi", turn_template=huge, api_name="/show_prompt")
    text = str(error.value)
    assert "limit is" in text and len(text) < MAX_ERROR_CHARS + 200
    with pytest.raises(Exception) as error:
        c.predict("x" * 100_000, "U", "B", "", "<|user|>", "", api_name="/save_template")
    assert len(str(error.value)) < MAX_ERROR_CHARS + 200
    from ggml_webui.app import _as_page_error
    message = _as_page_error(ValueError("bad template: " + "y" * 1_000_000)).message
    assert len(message) < MAX_ERROR_CHARS + 100 and message.endswith("characters, cut]")
