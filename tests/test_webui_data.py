"""The web chat's files (issue 16), without a browser: characters (text-generation-webui YAML, TavernAI V1/V2 JSON,
PNG cards) and hostile ones, past chats saved atomically, preset files, and the --api mode against our own
server on loopback (the tiny synthetic model, so it is quick)."""
import base64
import json
import os
import struct
import sys
import zlib
from pathlib import Path

import pytest

pytest.importorskip("gradio", reason="the web UI package imports gradio")
yaml = pytest.importorskip("yaml", reason="character and preset files are YAML")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "integrations" / "gradio"))

from ggml_backend.templates import TemplateError, get_template  # noqa: E402
from ggml_webui import CardError, load_character  # noqa: E402
from ggml_webui import chat_logs, characters, presets, user_data  # noqa: E402
from ggml_webui.chat_modes import BEGIN_VISIBLE_CHAT, Character, build_prompt, stopping_strings  # noqa: E402

GPT4ALL_SYSTEM = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                  "the request.")

TINY = REPO / "tests" / "data" / "synthetic" / "tiny-llama-q4_0.gguf"


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_card(card=None, *, chara: bytes | None = None, kind=b"tEXt", extra=b"", size: int = 1) -> bytes:
    """A ``size`` x ``size`` PNG (a green-blue gradient) with the card (a dict, as base64 JSON) in its 'chara' text
    chunk."""
    if chara is None and card is not None:
        chara = base64.b64encode(json.dumps(card).encode())
    ihdr = png_chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0))
    rows = b"".join(b"\x00" + b"".join(bytes((40, 90 + 160 * y // size, 120 + 130 * x // size)) for x in range(size))
                    for y in range(size))
    idat = png_chunk(b"IDAT", zlib.compress(rows))
    text = b""
    if chara is not None:
        if kind == b"tEXt":
            text = png_chunk(b"tEXt", b"chara\0" + chara)
        elif kind == b"zTXt":
            text = png_chunk(b"zTXt", b"chara\0\0" + zlib.compress(chara))
        else:
            text = png_chunk(b"iTXt", b"chara\0\0\0\0\0" + chara)
    return characters.PNG_SIGNATURE + ihdr + text + extra + idat + png_chunk(b"IEND", b"")


V2 = {"spec": "chara_card_v2", "spec_version": "2.0",
      "data": {"name": "Seraphina", "description": "A guardian of the forest glade.", "personality": "kind",
               "scenario": "{{user}} wakes up in the glade.", "first_mes": "*She smiles.* Hello, {{user}}.",
               "mes_example": "<START>\n{{user}}: Who are you?\n{{char}}: I am Seraphina.",
               "system_prompt": "", "tags": ["fantasy"], "extensions": {}}}
V2_CONTEXT = ("Seraphina's Persona: A guardian of the forest glade.\nScenario: {{user}} wakes up in the glade.\n"
              "<START>\n{{user}}: Who are you?\n{{char}}: I am Seraphina.\n")


# ---- characters ----------------------------------------------------------------------------------------------------

def test_chat_and_chat_instruct_modes():
    alpaca = get_template("alpaca")
    aria = Character(name="Aria", user_name="Bob", context="{{char}} is a pirate who talks to {{user}}.")
    history = [(BEGIN_VISIBLE_CHAT, "Ahoy!"), ("Hi", "Arr.")]
    assert build_prompt(alpaca, history, "Where to?", mode="chat", character=aria) == (
        "Aria is a pirate who talks to Bob.\nAria: Ahoy!\nBob: Hi\nAria: Arr.\nBob: Where to?\nAria:")
    assert build_prompt(alpaca, history, "Where to?", mode="chat-instruct", character=aria) == (
        GPT4ALL_SYSTEM + "\n\n### Instruction:\n"
        'Continue the chat dialogue below. Write a single reply for the character "Aria".\n\n'
        "Aria is a pirate who talks to Bob.\nAria: Ahoy!\nBob: Hi\nAria: Arr.\nBob: Where to?\n"
        "\n\n### Response:\nAria:")
    assert build_prompt(alpaca, history, "", mode="chat", character=aria, impersonate=True).endswith(
        "Aria: Arr.\nBob:")
    assert build_prompt(alpaca, history, "", mode="chat", character=aria, continue_=True).endswith(
        "Bob: Hi\nAria: Arr.")
    assert build_prompt(alpaca, history, "", mode="chat-instruct", character=aria, continue_=True).endswith(
        "Bob: Hi\n\n\n### Response:\nAria: Arr.")
    # instruct mode is the engine template's own prompt; the greeting marker is an empty user side there
    assert build_prompt(alpaca, history, "Where to?") == alpaca.build_prompt([("", "Ahoy!"), ("Hi", "Arr.")],
                                                                               "Where to?")
    assert stopping_strings(alpaca, "chat", Character(name="Aria", user_name="Bob")) == ["\nBob:", "\nAria:"]
    assert stopping_strings(alpaca, "chat-instruct", aria)[:2] == alpaca.stopping_strings()
    with pytest.raises(TemplateError, match="mode"):
        build_prompt(alpaca, history, "x", mode="story")
    with pytest.raises(TemplateError, match="always ends"):
        build_prompt(alpaca, history, "x", mode="chat-instruct", add_generation_prompt=False)
    with pytest.raises(TypeError):
        alpaca.build_prompt(history, "x", mode="chat")   # the engine's template renders instruct mode only


def test_textgen_yaml_character_with_its_picture(tmp_path):
    (tmp_path / "Chiharu.yaml").write_text(
        "name: Chiharu\ngreeting: |-\n  *Chiharu waves* Hi!\ncontext: |-\n  Chiharu is a cheerful girl.\n\n"
        "  {{user}}: Hey\n  {{char}}: Hello!\n", encoding="utf-8")
    picture = png_card(None)
    (tmp_path / "Chiharu.png").write_bytes(picture)
    card = load_character(tmp_path / "Chiharu.yaml")
    assert (card.name, card.greeting) == ("Chiharu", "*Chiharu waves* Hi!")
    assert card.context == "Chiharu is a cheerful girl.\n\n{{user}}: Hey\n{{char}}: Hello!\n"
    assert card.picture == picture
    assert characters.character_names(tmp_path) == ["Chiharu"]      # the picture is not a character of its own


def test_tavern_cards_v1_v2_json_and_png(tmp_path):
    v1 = {key: V2["data"][key] for key in ("name", "description", "personality", "scenario", "first_mes",
                                           "mes_example")}
    (tmp_path / "v1.json").write_text(json.dumps(v1), encoding="utf-8")
    (tmp_path / "v2.json").write_text(json.dumps(V2), encoding="utf-8")
    for kind in (b"tEXt", b"zTXt", b"iTXt"):
        (tmp_path / f"card-{kind.decode()}.png").write_bytes(png_card(V2, kind=kind))
    for name in ("v1.json", "v2.json", "card-tEXt.png", "card-zTXt.png", "card-iTXt.png"):
        card = load_character(tmp_path / name)
        # textgen's import: persona, scenario, examples in the context; first_mes the greeting
        assert (card.name, card.context, card.greeting) == ("Seraphina", V2_CONTEXT, V2["data"]["first_mes"]), name
        assert (card.picture is not None) == name.endswith(".png")
    # saved back as textgen's YAML with the picture beside it, and read again the same
    card = load_character(tmp_path / "card-tEXt.png")
    saved = characters.save_character(tmp_path / "saved", card)
    assert saved.name == "Seraphina.yaml" and (tmp_path / "saved" / "Seraphina.png").read_bytes() == card.picture
    again = load_character(saved)
    assert (again.name, again.context, again.greeting, again.picture) == (card.name, card.context, card.greeting,
                                                                          card.picture)
    assert set(yaml.safe_load(saved.read_text(encoding="utf-8"))) == {"name", "greeting", "context"}
    with pytest.raises(CardError, match="exists already"):
        characters.save_character(tmp_path / "saved", card)
    characters.save_character(tmp_path / "saved", card, overwrite=True)


HOSTILE = [
    ("notpng.png", b"GIF89a" + b"\0" * 40, "not a PNG"),
    ("plain.png", png_card(None), "without a character card"),
    ("badb64.png", png_card(chara=b"!!!not base64!!!"), "not valid base64"),
    ("latin1.png", png_card(chara=base64.b64encode(b'{"name": "caf\xe9"}')), "not UTF-8"),
    ("notjson.png", png_card(chara=base64.b64encode(b"{name: x")), "not valid JSON"),
    ("cut.png", png_card(V2)[:120], "past the end"),
    ("crc.png", png_card(V2).replace(b"IDAT", b"IDAX"), "wrong CRC"),
    ("bomb.png", None, "inflates to over"),
    ("huge.json", json.dumps({"name": "X", "context": "y" * 40_000}).encode(), "limit is"),
    ("list.json", b"[1, 2]", "expected a JSON object"),
    ("deep.json", b"[" * 100_000 + b"]" * 100_000, "nests too deep"),
    ("nested.yaml", b"name: X\ncontext: [1, 2]\n", "must be text"),
    ("nonutf8.yaml", b"name: caf\xe9\n", "not UTF-8"),
    ("noname.json", b'{"context": "x"}', "has no name"),
    ("big.yaml", b"name: x\ncontext: " + b"y" * (300 * 1024), "over 262,144 bytes"),
    ("card.txt", b"name: x", ".yaml, .yml, .json or .png"),
]


@pytest.mark.parametrize("name, data, words", [pytest.param(*case, id=case[0]) for case in HOSTILE])
def test_hostile_cards_get_a_clear_message(tmp_path, name, data, words):
    if name == "bomb.png":   # a small zTXt chunk inflating to 64 MiB: stopped at the cap
        chara = zlib.compress(b"A" * (64 * 1024 * 1024), 9)
        data = characters.PNG_SIGNATURE + png_chunk(b"zTXt", b"chara\0\0" + chara) + png_chunk(b"IEND", b"")
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(CardError, match=words) as error:
        load_character(path)
    assert len(str(error.value)) < 600 and name in str(error.value)


def test_saved_names_stay_in_the_folder(tmp_path):
    card = characters.CharacterCard(name="../../etc/passwd", context="x\n", greeting="")
    path = characters.save_character(tmp_path, card)
    assert path == tmp_path / "_.._etc_passwd.yaml"       # separators replaced, no leading dot
    for bad in ("", "   ", "///", ".."):
        with pytest.raises(ValueError, match="no usable characters"):
            user_data.safe_name(bad)
    with pytest.raises(ValueError):
        characters.load_named(tmp_path, "../x")


# ---- past chats ----------------------------------------------------------------------------------------------------

def test_past_chats_in_textgens_layout(tmp_path):
    folder = chat_logs.chat_folder(tmp_path, "chat", "Seraphina")
    assert folder == tmp_path / "logs" / "chat" / "Seraphina"
    assert chat_logs.chat_folder(tmp_path, "instruct", "Seraphina") == tmp_path / "logs" / "instruct"
    history = [[BEGIN_VISIBLE_CHAT, "Hello <you>"], ["Hi & bye", "Bye"]]
    first = chat_logs.new_chat_id(folder)
    path = chat_logs.save_chat(folder, first, history)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data == {"internal": history, "visible": [["", "Hello &lt;you&gt;"], ["Hi &amp; bye", "Bye"]]}
    assert len(first) == len("20260101-12-00-00")
    second = chat_logs.new_chat_id(folder)   # the same second: a suffix, never the same file
    assert second != first
    chat_logs.save_chat(folder, second, [["x", "y"]])
    assert chat_logs.load_chat(folder, first) == history
    renamed = chat_logs.rename_chat(folder, first, "  my chat/../x ")
    assert renamed == "my chat_.._x" and (folder / "my chat_.._x.json").is_file()
    with pytest.raises(ValueError, match="exists already"):
        chat_logs.rename_chat(folder, second, renamed)
    assert sorted(chat_logs.list_chats(folder)) == sorted([renamed, second])
    chat_logs.delete_chat(folder, second)
    assert chat_logs.list_chats(folder) == [renamed]
    with pytest.raises(ValueError, match="no saved chat"):
        chat_logs.load_chat(folder, "nope")
    # textgen's older files ({"data": ...}) import too; anything else is refused by name
    assert chat_logs.parse_chat(b'{"data": [["a", "b"]], "data_visible": [["a", "b"]]}') == [["a", "b"]]
    for bad, words in ((b"[]", "expected a JSON object"), (b'{"internal": [["a"]]}', "pair of strings"),
                       (b'{"internal": [[1, 2]]}', "pair of strings"), (b"\xff\xfe", "not UTF-8"),
                       (b"{", "not valid JSON")):
        with pytest.raises(ValueError, match=words):
            chat_logs.parse_chat(bad)


def test_a_crash_mid_save_keeps_the_chat(tmp_path, monkeypatch):
    folder = tmp_path / "logs" / "chat" / "AI"
    chat_logs.save_chat(folder, "20260101-00-00-00", [["one", "two"]])

    def crash(*_args):
        raise OSError("disk gone mid-write")
    monkeypatch.setattr(os, "replace", crash)   # the crash between writing the new file and putting it in place
    with pytest.raises(OSError, match="disk gone"):
        chat_logs.save_chat(folder, "20260101-00-00-00", [["one", "two"], ["three", "four" * 1000]])
    monkeypatch.undo()
    assert chat_logs.load_chat(folder, "20260101-00-00-00") == [["one", "two"]]
    assert [p.name for p in folder.iterdir()] == ["20260101-00-00-00.json"]   # no temporary file left behind
    # a killed process's temporary file is never listed as a chat
    (folder / ".20260101-00-00-00.json.abc.tmp").write_text("{")
    assert chat_logs.list_chats(folder) == ["20260101-00-00-00"]


# ---- presets -------------------------------------------------------------------------------------------------------

def test_preset_files(tmp_path):
    folder = presets.preset_folder(tmp_path)
    assert presets.preset_choices(folder)[:3] == ["simple-1", "Divine Intellect", "Debug-deterministic"]
    folder.mkdir()
    # a textgen preset file: known samplers kept, the others named, do_sample false = greedy
    (folder / "Mine.yaml").write_text("temperature: 0.5\ntop_p: 0.8\ntypical_p: 0.9\nmirostat_mode: 0\n")
    (folder / "Greedy.yaml").write_text("do_sample: false\n")
    values, ignored = presets.load_preset(folder, "Mine")
    assert values == {"temperature": 0.5, "top_p": 0.8, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}
    assert ignored == ["typical_p", "mirostat_mode"]
    assert presets.load_preset(folder, "Greedy")[0]["temperature"] == 0.0
    path = presets.save_preset(folder, "Saved one", {**values, "top_k": 40})
    assert yaml.safe_load(path.read_text())["top_k"] == 40
    assert presets.load_preset(folder, "Saved one")[0]["top_k"] == 40
    assert "Saved one" in presets.preset_choices(folder)
    with pytest.raises(ValueError, match="exists already"):
        presets.save_preset(folder, "Saved one", values)
    for text, words in (("temperature: hot\n", "must be a number"), ("top_p: 7\n", "must be in"),
                        ("- 1\n", "expected a mapping"), ("temperature: .nan\n", "must be a number")):
        (folder / "Bad.yaml").write_text(text)
        with pytest.raises(ValueError, match=words):
            presets.load_preset(folder, "Bad")


# ---- --api: the page's backend against our own server on loopback --------------------------------------------------

@pytest.fixture(scope="module")
def tiny_server():
    pytest.importorskip("fastapi", reason="the server extra (fastapi, uvicorn) runs the remote end")
    sys.path.insert(0, str(REPO / "tests"))
    from server_fixtures import running_server
    from ggml_backend.server import ModelConfig
    with running_server(models=[ModelConfig(alias="tiny", path=str(TINY), n_ctx=512, n_parallel=1)]) as (url, _):
        yield url


def test_remote_backend_streams_what_the_engine_gives(tiny_server):
    from ggml_backend import Llama
    from ggml_webui import chat
    from ggml_webui.backend import RemoteBackend
    from ggml_webui.settings import GenerationSettings
    greedy = GenerationSettings(max_new_tokens=12, temperature=0.0, top_k=1, top_p=1.0, repetition_penalty=1.0)
    remote = RemoteBackend(tiny_server + "/v1")
    assert remote.model == "tiny" and remote.n_ctx() == 512
    stats = chat.ReplyStats()
    pieces = list(remote.stream_prompt("Once upon a time", greedy, [], lambda: False, stats))
    llama = Llama(str(TINY), n_ctx=512, verbose=False)
    local = list(chat.stream_reply(llama, "Once upon a time", greedy, []))
    assert pieces[-1] == local[-1] and len(pieces) > 2                  # streamed, and the engine's own reply
    assert stats.tokens == 12 and stats.prompt_tokens == len(llama.tokenize("Once upon a time"))
    assert "tokens/s" in stats.line() and "/ 512 tokens" in stats.line()
    assert remote.count_tokens("Once upon a time", greedy) == stats.prompt_tokens
    # the chat API: the server's template writes the prompt
    chat_stats = chat.ReplyStats()
    reply = list(remote.stream_chat([{"role": "user", "content": "Hi"}], greedy, [], lambda: False, chat_stats))
    assert reply and chat_stats.tokens >= 1
    # Stop after the first piece: the stream is closed there
    stopped = list(remote.stream_prompt("Once upon a time", greedy.__class__(max_new_tokens=64, temperature=0.0),
                                        [], lambda: True, chat.ReplyStats()))
    assert len(stopped[-1]) < len(local[-1])
    # a stop string never shows, not even its start
    cut = list(remote.stream_prompt("Once upon a time", greedy, [local[-1][3:6]], lambda: False, chat.ReplyStats()))
    assert cut[-1] == local[-1][:3]
    remote.close()


def test_remote_errors_are_one_clear_line(tiny_server):
    from ggml_webui.backend import RemoteBackend
    from ggml_webui.settings import GenerationSettings
    with pytest.raises(ValueError, match="cannot reach the API"):
        RemoteBackend("http://127.0.0.1:9")
    with pytest.raises(ValueError, match="http:// or https://"):
        RemoteBackend("ftp://example")
    remote = RemoteBackend(tiny_server, model="no-such-model")
    with pytest.raises(ValueError, match="answered 4"):
        list(remote.stream_prompt("x", GenerationSettings(max_new_tokens=2), [], lambda: False,
                                  __import__("ggml_webui.chat", fromlist=["ReplyStats"]).ReplyStats()))
    remote.close()
