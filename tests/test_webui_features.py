"""The web chat's issue-16 endpoints through gradio_client: characters, past chats, Start reply with, dummy
messages, Send to notebook, the Default and Notebook tabs, preset files, the status line's numbers, and the
page run against a remote server (--api). The tiny synthetic model keeps it quick; the browser test and
test_webui.py run the real model."""
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("gradio", reason="the web UI needs gradio (pip install 'ggml-backend[gradio]')")
gradio_client = pytest.importorskip("gradio_client", reason="gradio_client (a dev dependency) drives the web UI")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "integrations" / "gradio"))
sys.path.insert(0, str(REPO / "tests"))

from ggml_backend import Llama  # noqa: E402
from ggml_webui import chat_logs, launch  # noqa: E402
from ggml_webui.chat_modes import BEGIN_VISIBLE_CHAT  # noqa: E402
from test_webui_data import V2, png_card  # noqa: E402

TINY = REPO / "tests" / "data" / "synthetic" / "tiny-llama-q4_0.gguf"
GREEDY = dict(temperature=0.0, top_k=1, top_p=1.0, min_p=0.0, repetition_penalty=1.0)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("webui-data")
    (folder / "characters").mkdir()
    (folder / "characters" / "Seraphina.png").write_bytes(png_card(V2))
    return folder


@pytest.fixture(scope="module")
def app(data_dir):
    port = free_port()
    demo = launch(Llama(str(TINY), n_ctx=512, verbose=False), port=port, user_data_dir=data_dir,
                  prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def client(url):
    # a generous timeout: the page behind a remote server answers its first request slowly on a loaded 2-core
    # machine (a fresh-clone suite run hit httpx's default 5 s there; alone the test takes seconds)
    return gradio_client.Client(url, verbose=False, httpx_kwargs={"timeout": 120})


def texts(chatbot_value):
    out = []
    for message in chatbot_value:
        content = message["content"]
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content)
        out.append((message["role"], content))
    return out


def test_character_greeting_chat_saved_and_loaded_again(app, data_dir):
    c = client(app)
    chosen = c.predict("Seraphina", "chat", "Ann", api_name="/choose_character")
    name2, context, greeting = chosen[0], chosen[1], chosen[2]
    assert (name2, greeting) == ("Seraphina", V2["data"]["first_mes"])
    assert context.startswith("Seraphina's Persona: A guardian")
    # the greeting starts the chat, {{user}} filled in, and the chat is saved in textgen's layout
    folder = data_dir / "logs" / "chat" / "Seraphina"
    (saved,) = folder.glob("*.json")
    data = json.loads(saved.read_text(encoding="utf-8"))
    assert data["internal"] == [[BEGIN_VISIBLE_CHAT, "*She smiles.* Hello, Ann."]]
    assert data["visible"] == [["", "*She smiles.* Hello, Ann."]]
    # a reply that must start with the given words; saved after the reply
    chatbot_value, box = c.predict(message="Hello there", start_with="Well,", mode="chat", name1="Ann",
                                   name2="Seraphina", character_context=context, max_new_tokens=6, **GREEDY,
                                   api_name="/generate")
    shown = texts(chatbot_value)
    assert shown[0] == ("assistant", "*She smiles.* Hello, Ann.") and shown[1] == ("user", "Hello there")
    assert shown[2][0] == "assistant" and shown[2][1].startswith("Well,") and len(shown[2][1]) > len("Well,")
    history = chat_logs.load_chat(folder, saved.stem)
    assert history[-1] == ["Hello there", shown[2][1]]
    # dummy message and reply, saved too
    c.predict("A note to self", "chat", "Seraphina", api_name="/send_dummy_message")
    c.predict("An answer I wrote", "chat", "Seraphina", api_name="/send_dummy_reply")
    assert chat_logs.load_chat(folder, saved.stem)[-1] == ["A note to self", "An answer I wrote"]
    # another session (a reloaded page) loads the past chat and goes on from it
    other = client(app)
    loaded = other.predict(saved.stem, "chat", "Seraphina", api_name="/load_chat")
    assert texts(loaded[0])[-1] == ("assistant", "An answer I wrote")
    assert other.predict(api_name="/copy_last_reply") == "An answer I wrote"
    # rename, export, delete
    renamed = other.predict(saved.stem, "first talk", "chat", "Seraphina", api_name="/rename_chat")
    assert (folder / "first talk.json").is_file() and not saved.exists() and renamed[0]["value"] == "first talk"
    exported = other.predict(api_name="/export_chat")
    exported_path = exported[0]["value"] if isinstance(exported[0], dict) else exported[0]
    assert chat_logs.parse_chat(Path(exported_path).read_bytes()) == chat_logs.load_chat(folder, "first talk")
    other.predict("first talk", "chat", "Seraphina", api_name="/delete_chat")
    assert not (folder / "first talk.json").exists()
    # the exported file imports as a new chat
    imported = other.predict(gradio_client.handle_file(exported_path), "chat", "Seraphina", api_name="/import_chat")
    assert texts(imported[0])[-1] == ("assistant", "An answer I wrote") and len(list(folder.glob("*.json"))) == 1


def test_bad_card_upload_changes_nothing(app, data_dir, tmp_path):
    c = client(app)
    c.predict("Kept reply", "chat", "AI", api_name="/send_dummy_reply")
    files_before = sorted(p.relative_to(data_dir) for p in data_dir.rglob("*") if p.is_file())
    for name, data, words in (("bad.png", png_card(chara=b"%%%"), "not valid base64"),
                              ("fake.png", b"<html>not a picture</html>", "not a PNG picture"),
                              ("text.json", b"{\"name\": \"caf\xe9\"}", "not UTF-8")):
        bad = tmp_path / name
        bad.write_bytes(data)
        with pytest.raises(Exception, match=words):
            c.predict(gradio_client.handle_file(str(bad)), api_name="/upload_character")
    assert sorted(p.relative_to(data_dir) for p in data_dir.rglob("*") if p.is_file()) == files_before
    assert c.predict(api_name="/copy_last_reply") == "Kept reply"   # the session's chat is as it was
    good = tmp_path / "good.png"
    good.write_bytes(png_card(V2))
    name, context = c.predict(gradio_client.handle_file(str(good)), api_name="/upload_character")
    assert name == "Seraphina" and context.startswith("Seraphina's Persona")


def test_cli_checks_the_new_options(capsys):
    from ggml_backend.cli.main import main
    for argv, words in ((["--api", "ftp://x"], "http:// or https://"), (["--api", "http://x", "-m", "f.gguf"],
                        "-m and --model-dir do not apply"), (["--api-key", "k"], "go with --api URL")):
        assert main(["webui", *argv]) == 1
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_save_character_and_presets(app, data_dir):
    c = client(app)
    menu, status = c.predict("Ada", "Ada is a mathematician.", "Hello, {{user}}.", None, False,
                             api_name="/save_character")
    assert "Ada.yaml" in status and (data_dir / "characters" / "Ada.yaml").is_file()
    with pytest.raises(Exception, match="exists already"):
        c.predict("Ada", "x", "", None, False, api_name="/save_character")
    # saved right after uploading a card, before the page's follow-up step set its greeting and picture (the
    # client runs no follow-up steps; a quick click in a browser on a loaded machine did the same): both are kept
    quick = data_dir.parent / "Quick.png"
    quick.write_bytes(png_card(dict(V2, data=dict(V2["data"], name="Quick", first_mes="Hi, I am quick."))))
    name, _context = c.predict(gradio_client.handle_file(str(quick)), api_name="/upload_character")
    c.predict(name, _context, "", None, False, api_name="/save_character")
    assert (data_dir / "characters" / "Quick.png").read_bytes() == quick.read_bytes()
    assert "Hi, I am quick." in (data_dir / "characters" / "Quick.yaml").read_text(encoding="utf-8")
    preset_menu, note = c.predict("Calm", False, 0.3, 0.5, 10, 0.05, 1.1, api_name="/save_preset")
    assert (data_dir / "presets" / "Calm.yaml").is_file()
    values = c.predict("Calm", api_name="/preset")
    assert list(values[:5]) == [0.3, 0.5, 10, 0.05, 1.1]


def test_default_and_notebook_tabs(app):
    c = client(app)
    output, status = c.predict(prompt="Once upon a time", output="", max_new_tokens=8, **GREEDY,
                               api_name="/default_generate")
    assert output and "8 tokens" in status and "tokens/s" in status and "first token after" in status
    continued, _ = c.predict(prompt="Once upon a time", output=output, max_new_tokens=4, **GREEDY,
                             api_name="/default_continue")
    assert continued.startswith(output) and len(continued) > len(output)
    text, status = c.predict(text="Once upon a time", max_new_tokens=8, **GREEDY, api_name="/notebook_generate")
    assert text == "Once upon a time" + output                       # the same greedy continuation
    count = c.predict(text="Once upon a time", api_name="/count_tokens")
    tokens = Llama(str(TINY), n_ctx=64, verbose=False).tokenize("Once upon a time")
    assert count == f"{len(tokens):,} tokens of a 512-token context"
    template = c.predict(api_name="/template_prompt")
    assert template.endswith("<|im_start|>user\nInput<|im_end|>\n<|im_start|>assistant\n")
    notebook = c.predict(message="Hi", api_name="/send_to_notebook")   # (and the Notebook tab selected)
    assert notebook.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def remote_app(tmp_path_factory):
    pytest.importorskip("fastapi", reason="the server extra (fastapi, uvicorn) runs the remote end")
    from server_fixtures import running_server
    from ggml_backend.server import ModelConfig
    with running_server(models=[ModelConfig(alias="tiny", path=str(TINY), n_ctx=512, n_parallel=1)],
                        api_key="sekrit") as (url, _):
        port = free_port()
        demo = launch(None, port=port, api_url=url, api_key="sekrit", user_data_dir=tmp_path_factory.mktemp("r"),
                      prevent_thread_lock=True, quiet=True)
        yield f"http://127.0.0.1:{port}/", url
        demo.close()


def test_the_page_against_a_remote_server(remote_app):
    page, server = remote_app
    c = client(page)
    # instruct mode with the model file's template: the server's chat API
    shown = c.predict(message="Hi", api_name="/show_prompt")
    assert "remote server writes this prompt" in shown and '"content": "Hi"' in shown
    chatbot_value, _ = c.predict(message="Hi", max_new_tokens=6, **GREEDY, api_name="/generate")
    assert texts(chatbot_value)[0] == ("user", "Hi") and texts(chatbot_value)[1][1]
    # chat mode: the page writes the prompt, the completions API runs it; Start reply with holds
    chatbot_value, _ = c.predict(message="Hi", mode="chat", start_with="Sure", max_new_tokens=4, **GREEDY,
                                 api_name="/generate")
    assert texts(chatbot_value)[-1][1].startswith("Sure")
    # the notebook: the same greedy text the engine gives for the prompt
    text, status = c.predict(text="Once upon a time", max_new_tokens=8, **GREEDY, api_name="/notebook_generate")
    from ggml_webui import chat
    from ggml_webui.settings import GenerationSettings
    local = list(chat.stream_reply(Llama(str(TINY), n_ctx=512, verbose=False), "Once upon a time",
                                   GenerationSettings(max_new_tokens=8, **GREEDY), []))[-1]
    assert text == "Once upon a time" + local and "context" in status and "/ 512 tokens" in status
    status = c.predict("x.gguf", 256, 0, 0, api_name="/load_model")
    assert "runs against a remote API" in status[0]
    # a wrong key is one clear line at start
    from ggml_webui.backend import RemoteBackend
    with pytest.raises(ValueError, match="refused the key"):
        RemoteBackend(server, api_key="wrong")


def test_your_picture(app, data_dir, tmp_path):
    c = client(app)
    picture = tmp_path / "me.png"
    picture.write_bytes(png_card(None))
    _chatbot, status = c.predict(gradio_client.handle_file(str(picture)), api_name="/upload_user_picture")
    assert status == "Your picture is set."
    assert picture.read_bytes() in [p.read_bytes() for p in (data_dir / "cache" / "pictures").iterdir()]
    fake = tmp_path / "me.jpg"
    fake.write_bytes(b"GIF89a not a jpeg")
    with pytest.raises(Exception, match="not a PNG or JPEG"):
        c.predict(gradio_client.handle_file(str(fake)), api_name="/upload_user_picture")
