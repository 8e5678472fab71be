"""The web chat: a Gradio Blocks page laid out like text-generation-webui's chat tab (late 2023).

``build_app(model)`` returns the ``gr.Blocks`` (mount it with ``gr.mount_gradio_app`` or launch it); ``launch``
serves it on 127.0.0.1 unless asked otherwise. Every button is also a named API endpoint (``/generate``,
``/stop``, ``/continue``, ``/regenerate``, ``/remove_last``, ``/impersonate``, ``/show_prompt``...) whose
parameters are named after the settings (``message``, ``mode``, ``turn_template``, ``max_new_tokens``...), so
``gradio_client`` can drive it; each client, like each browser tab, has its own history.

Models are loaded only by name from the model directory's list; served beyond 127.0.0.1 (``listen``/``share``)
the page asks for a login; uploads are template, character, picture and chat files only (see ``security``).

Beside the chat: characters (``characters``), past chats saved after every reply (``chat_logs``), preset files
(``presets``), the Default and Notebook tabs for raw prompts, and, with ``api_url``, a remote OpenAI-compatible
server in place of the model in this process (``backend``). All files live in the user data folder
(``user_data``).
"""
import hashlib
import json
import os
import sys
import traceback
from functools import wraps
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from ggml_backend.templates import TextgenTemplate  # noqa: E402

from . import chat, chat_logs, template_store, user_data  # noqa: E402
from .backend import LocalBackend, RemoteBackend  # noqa: E402
from .chat_modes import BEGIN_VISIBLE_CHAT, DEFAULT_CHAT_INSTRUCT_COMMAND, Character, replace_character_names  # noqa
from .characters import (CARD_SUFFIXES, MAX_CARD_PNG_BYTES, PICTURE_SUFFIXES, character_names,  # noqa: E402
                         check_picture, load_character, load_named)
from .characters import save_character as save_character_file  # noqa: E402
from .model_manager import ModelManager  # noqa: E402
from .presets import load_preset, preset_choices, preset_folder, save_preset  # noqa: E402
from .security import (MAX_PICTURE_UPLOAD_BYTES, MAX_UPLOAD_BYTES, TEXT_SUFFIXES, UploadGuard,  # noqa: E402
                       resolve_auth, short)
from .settings import DEFAULT_PRESET, PRESET_FIELDS, GenerationSettings, parse_stop_strings, preset_values  # noqa

GENERATION_QUEUE = "generation"   # one reply at a time across all sessions: the model computes one thing at once
DEFAULT_N_CTX = 2048
MODES = ["chat", "chat-instruct", "instruct"]
TEMPLATE_FIELDS = ("user_string", "bot_string", "context_instruct", "turn_template", "system_message")
#: the longest text a template or character field may hold (real ones are a few hundred characters)
MAX_FIELD_CHARS = 32_768
#: the longest chat message (the context holds a few thousand tokens at most)
MAX_MESSAGE_CHARS = 200_000
#: the largest context a client may ask the Model tab for
MAX_N_CTX = 131_072
#: the character menu's entry for no character (textgen's)
NO_CHARACTER = "None"
#: a YAML/JSON upload (templates, characters)
MAX_TEXT_UPLOAD_BYTES = MAX_UPLOAD_BYTES
_TEXT_FIELDS = TEMPLATE_FIELDS + ("custom_system_message", "chat_instruct_command", "character_context", "name1",
                                  "name2", "custom_stopping_strings")


def _as_page_error(exc: BaseException) -> gr.Error:
    """A message on the page, never longer than MAX_ERROR_CHARS: an error may quote a field of megabytes. Bad
    input (ValueError, OSError) is the user's to fix; anything else is a bug, logged (cut too) for the operator."""
    if isinstance(exc, (ValueError, OSError)):
        return gr.Error(short(str(exc)))
    stack = "".join(traceback.format_tb(exc.__traceback__))
    print(f"ggml_webui: unexpected error: {type(exc).__name__}: {short(str(exc))}\n{stack}", file=sys.stderr)
    return gr.Error(f"internal error ({type(exc).__name__}): {short(str(exc), 200)}")


def _user_errors(fn):
    """Show errors as a short message on the page instead of a crash or a traceback quoting the input."""
    if _is_generator(fn):
        @wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except gr.Error:
                raise
            except Exception as exc:  # noqa: BLE001 - each kind is reported by _as_page_error
                raise _as_page_error(exc) from None
        return gen_wrapper

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as exc:  # noqa: BLE001 - each kind is reported by _as_page_error
            raise _as_page_error(exc) from None
    return wrapper


def _check_lengths(values: dict, message: str = "") -> None:
    """Refuse oversized fields before any work (and before an error could quote them): API clients send what
    they like, whatever the page lets a browser type."""
    if len(message or "") > MAX_MESSAGE_CHARS:
        raise ValueError(f"the message is {len(message):,} characters; the limit is {MAX_MESSAGE_CHARS:,}")
    for name in _TEXT_FIELDS:
        value = values.get(name) or ""
        if len(value) > MAX_FIELD_CHARS:
            raise ValueError(f"the {name.replace('_', ' ')} field is {len(value):,} characters; the limit is "
                             f"{MAX_FIELD_CHARS:,}")


def _is_generator(fn) -> bool:
    import inspect
    return inspect.isgeneratorfunction(fn)


def _manager_for(model, n_ctx: int, n_threads, n_gpu_layers: int, model_dir, draft_max: int = 0) -> ModelManager:
    from ggml_backend import Llama
    if isinstance(model, ModelManager):
        manager = model
    elif isinstance(model, Llama):
        manager = ModelManager(model, draft_max=draft_max)
    else:
        manager = ModelManager(draft_max=draft_max)
        manager.load(None if model is None else os.fspath(model), n_ctx=n_ctx, n_threads=n_threads,
                     n_gpu_layers=n_gpu_layers)
    if model_dir is not None:
        if not os.path.isdir(model_dir):
            raise ValueError(f"the model directory {model_dir} is not a directory")
        manager.model_dir = os.path.abspath(model_dir)
    elif manager.model_dir is None and manager.llama is not None:
        # the folder of the model it starts with: its neighbours are what the operator has at hand
        manager.model_dir = os.path.dirname(os.path.abspath(manager.llama.model_path))
    return manager


def _uploaded(file, suffixes, limit: int) -> str:
    """The path of an uploaded file, refused unless it has one of ``suffixes`` and at most ``limit`` bytes."""
    path = file if isinstance(file, str) else getattr(file, "name", None) or getattr(file, "path", "")
    if not str(path).lower().endswith(tuple(suffixes)):
        raise ValueError("only " + ", ".join(suffixes) + " files can be loaded here")
    if os.path.getsize(path) > limit:
        raise ValueError(f"the file is over {limit:,} bytes")
    return str(path)


def _initial_template(manager: ModelManager) -> tuple[str, TextgenTemplate]:
    if manager.model_template is not None:
        return template_store.FROM_MODEL_FILE, manager.model_template
    name = "textgen-chatml"
    return name, template_store.load_named_template(name)


def build_app(model=None, *, n_ctx: int = DEFAULT_N_CTX, n_threads=None, n_gpu_layers: int = 0,
              title: str = "ggml_backend chat", model_dir=None, user_data_dir=None, api_url: str | None = None,
              api_key: str | None = None, api_model: str | None = None, draft_max: int = 0) -> gr.Blocks:
    """The chat page for ``model``: None (the default model), a GGUF/GGML path, a loaded ``Llama`` (or a
    ``ModelManager``). ``n_ctx``/``n_threads``/``n_gpu_layers`` apply when the model is loaded here, and
    ``draft_max`` (> 0: speculative decoding by prompt lookup, drafting up to that many tokens) to every model
    loaded here.
    The Model tab loads only the GGUF/GGML files in ``model_dir`` (default: the starting model's folder).

    ``user_data_dir`` holds characters, presets and past chats (default: ``user_data.default_dir()``).
    ``api_url`` runs the page against an OpenAI-compatible server instead of a model in this process (``model``
    must then be None); ``api_key`` is sent to it, ``api_model`` names its model (default: its first)."""
    if api_url is not None:
        if model is not None or model_dir is not None:
            raise ValueError("api_url runs the page against a remote server: pass no model and no model_dir")
        if draft_max:
            raise ValueError("draft_max applies to a model loaded here; with api_url the server drafts (ggml-backend "
                             "serve --lookup)")
        backend = RemoteBackend(api_url, api_key=api_key, model=api_model)
        manager = ModelManager()
    else:
        manager = _manager_for(model, n_ctx, n_threads, n_gpu_layers, model_dir, draft_max)
        backend = LocalBackend(manager)
    data_dir = Path(user_data_dir) if user_data_dir is not None else user_data.default_dir()
    characters_dir, presets_dir = data_dir / "characters", preset_folder(data_dir)
    pictures_dir = data_dir / "cache" / "pictures"
    exports_dir = data_dir / "cache" / "exports"
    for folder in (characters_dir, presets_dir, pictures_dir, exports_dir):
        folder.mkdir(parents=True, exist_ok=True)
    gr.set_static_paths([str(pictures_dir), str(exports_dir)])   # the chat's pictures and exported chats only
    template_name, template = _initial_template(manager)
    if backend.remote:   # the server's own template (chat API) in instruct mode; ChatML fields for raw prompts
        template_name = template_store.FROM_MODEL_FILE
    defaults = GenerationSettings(**preset_values(DEFAULT_PRESET),
                                  add_bos_token=bool(manager.llama.tokenizer.add_bos) if manager.llama else True)
    blank = Character()

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        history = gr.State([])
        chat_ref = gr.State(None)       # {"id", "folder"} of the saved chat this session is writing, or None
        last_stats = gr.State(None)     # the last reply's status line
        bot_picture = gr.State(None)    # the character's picture (a file in the pictures folder), or None
        user_picture = gr.State(None)
        settings_inputs = {}

        with gr.Tabs(elem_id="main-tabs") as tabs:
            with gr.Tab("Chat", id="chat", elem_id="chat-tab"):
                with gr.Row():
                    with gr.Column(scale=4):
                        chatbot = gr.Chatbot(label="Chat", elem_id="chat", height=440, value=[],
                                             buttons=["copy", "copy_all"])
                        reply_status = gr.Markdown("", elem_id="reply-status")
                        textbox = gr.Textbox(label="Input", show_label=False, placeholder="Send a message",
                                             elem_id="chat-input", lines=1)
                        with gr.Row():
                            stop_button = gr.Button("Stop", elem_id="stop")
                            generate_button = gr.Button("Generate", elem_id="Generate", variant="primary")
                            continue_button = gr.Button("Continue", elem_id="Continue")
                        with gr.Row():
                            impersonate_button = gr.Button("Impersonate", elem_id="Impersonate")
                            regenerate_button = gr.Button("Regenerate", elem_id="Regenerate")
                            remove_button = gr.Button("Remove last", elem_id="Remove-last")
                        with gr.Row():
                            copy_button = gr.Button("Copy last reply", elem_id="Copy-last-reply")
                            replace_button = gr.Button("Replace last reply", elem_id="Replace-last-reply")
                            dummy_message_button = gr.Button("Send dummy message", elem_id="Send-dummy-message")
                            dummy_reply_button = gr.Button("Send dummy reply", elem_id="Send-dummy-reply")
                        with gr.Row():
                            notebook_send_button = gr.Button("Send to notebook", elem_id="Send-to-notebook")
                            clear_button = gr.Button("Clear history", elem_id="Clear-history")
                            clear_confirm = gr.Button("Confirm", variant="stop", visible=False,
                                                      elem_id="Clear-history-confirm")
                            clear_cancel = gr.Button("Cancel", visible=False, elem_id="Clear-history-cancel")
                        start_with = gr.Textbox(value="", label="Start reply with", placeholder="Sure thing!",
                                                elem_id="start-with", max_length=MAX_FIELD_CHARS)
                        settings_inputs["mode"] = gr.Radio(
                            MODES, value="instruct", label="Mode", elem_id="chat-mode",
                            info="Defines how the chat prompt is generated. In instruct and chat-instruct modes, the "
                                 "instruction template selected under Parameters > Instruction template must match "
                                 "the current model.")
                        with gr.Accordion("Show prompt", open=False, elem_id="show-prompt-accordion"):
                            show_prompt_button = gr.Button("Show prompt", elem_id="show-prompt")
                            prompt_view = gr.Textbox(
                                label="Prompt (exactly what Generate sends, for the text in the input box)",
                                lines=8, max_lines=30, interactive=False, elem_id="prompt-view")
                    with gr.Column(scale=1, min_width=220, elem_id="past-chats-column"):
                        new_chat_button = gr.Button("New chat", elem_id="new-chat", variant="primary")
                        past_chats = gr.Dropdown([], value=None, allow_custom_value=True, label="Past chats",
                                                 elem_id="past-chats",
                                                 info="Saved after every reply, for the character (or instruct "
                                                      "mode) in use.")
                        with gr.Row():
                            rename_button = gr.Button("Rename", elem_id="rename-chat", size="sm")
                            delete_button = gr.Button("Delete", elem_id="delete-chat", size="sm")
                        rename_text = gr.Textbox(value="", label="New name", visible=False, elem_id="rename-text",
                                                 max_length=64)
                        with gr.Row():
                            rename_confirm = gr.Button("Confirm", visible=False, elem_id="rename-confirm",
                                                       size="sm")
                            rename_cancel = gr.Button("Cancel", visible=False, elem_id="rename-cancel", size="sm")
                        with gr.Row():
                            delete_confirm = gr.Button("Confirm delete", variant="stop", visible=False,
                                                       elem_id="delete-confirm", size="sm")
                            delete_cancel = gr.Button("Cancel", visible=False, elem_id="delete-cancel", size="sm")
                        with gr.Row():
                            export_button = gr.Button("Export", elem_id="export-chat", size="sm")
                            import_button = gr.UploadButton("Import", file_types=[".json"], elem_id="import-chat",
                                                            size="sm")
                        export_file = gr.File(label="Exported chat", visible=False, elem_id="export-file",
                                              interactive=False)
                        chats_status = gr.Markdown("", elem_id="chats-status")

            with gr.Tab("Default", id="default", elem_id="default-tab"):
                with gr.Row():
                    with gr.Column():
                        default_input = gr.Textbox(value="", label="Input", lines=16, elem_id="default-input",
                                                   max_length=MAX_MESSAGE_CHARS)
                        with gr.Row():
                            default_generate = gr.Button("Generate", variant="primary", elem_id="default-generate")
                            default_stop = gr.Button("Stop", elem_id="default-stop")
                            default_continue = gr.Button("Continue", elem_id="default-continue")
                        with gr.Row():
                            default_from_template = gr.Button("Start from the instruction template",
                                                              elem_id="default-from-template")
                            default_count = gr.Button("Count tokens", elem_id="default-count")
                        default_tokens = gr.Markdown("", elem_id="default-tokens")
                    with gr.Column():
                        default_output = gr.Textbox(value="", label="Output", lines=16, elem_id="default-output",
                                                    max_length=MAX_MESSAGE_CHARS)
                        default_status = gr.Markdown("", elem_id="default-status")

            with gr.Tab("Notebook", id="notebook", elem_id="notebook-tab"):
                notebook_text = gr.Textbox(value="", label="Notebook", lines=20, elem_id="notebook-text",
                                           max_length=MAX_MESSAGE_CHARS)
                notebook_undo_state = gr.State("")
                with gr.Row():
                    notebook_generate = gr.Button("Generate", variant="primary", elem_id="notebook-generate")
                    notebook_stop = gr.Button("Stop", elem_id="notebook-stop")
                    notebook_undo = gr.Button("Undo", elem_id="notebook-undo")
                    notebook_regenerate = gr.Button("Regenerate", elem_id="notebook-regenerate")
                    notebook_count = gr.Button("Count tokens", elem_id="notebook-count")
                notebook_status = gr.Markdown("", elem_id="notebook-status")

            with gr.Tab("Parameters", id="parameters", elem_id="parameters"):
                with gr.Tab("Generation"):
                    with gr.Row():
                        preset = gr.Dropdown(preset_choices(presets_dir), value=DEFAULT_PRESET,
                                             allow_custom_value=True, label="Preset",
                                             elem_id="preset", scale=3,
                                             info=f"text-generation-webui's presets: the built-in ones, then the "
                                                  f"YAML files in {presets_dir}.")
                        refresh_presets = gr.Button("🔄", scale=0, min_width=40, elem_id="refresh-presets")
                        preset_save_name = gr.Textbox(value="", label="Save as", placeholder="My preset", scale=2,
                                                      max_length=64, elem_id="preset-save-name")
                        preset_overwrite = gr.Checkbox(False, label="Overwrite", scale=0, min_width=80)
                        preset_save_button = gr.Button("💾 Save", scale=0, min_width=80, elem_id="preset-save")
                    preset_status = gr.Markdown("", elem_id="preset-status")
                    with gr.Row():
                        with gr.Column():
                            settings_inputs["max_new_tokens"] = gr.Slider(
                                1, 4096, step=1, value=defaults.max_new_tokens, label="max_new_tokens")
                            settings_inputs["temperature"] = gr.Slider(0.0, 5.0, step=0.01,
                                                                       value=defaults.temperature,
                                                                       label="temperature")
                            settings_inputs["top_p"] = gr.Slider(0.0, 1.0, step=0.01, value=defaults.top_p,
                                                                 label="top_p")
                            settings_inputs["min_p"] = gr.Slider(0.0, 1.0, step=0.01, value=defaults.min_p,
                                                                 label="min_p")
                            settings_inputs["top_k"] = gr.Slider(0, 200, step=1, value=defaults.top_k,
                                                                 label="top_k")
                            settings_inputs["repetition_penalty"] = gr.Slider(
                                1.0, 1.5, step=0.01, value=defaults.repetition_penalty, label="repetition_penalty")
                            settings_inputs["repetition_penalty_range"] = gr.Slider(
                                0, 4096, step=64, value=defaults.repetition_penalty_range,
                                label="repetition_penalty_range")
                        with gr.Column():
                            settings_inputs["seed"] = gr.Number(value=-1, precision=0, label="Seed (-1 for random)")
                            settings_inputs["truncation_length"] = gr.Number(
                                value=0, precision=0, label="Truncate the prompt up to this length",
                                info="In tokens; 0 means the context size. The oldest messages are dropped first.")
                            settings_inputs["custom_stopping_strings"] = gr.Textbox(
                                lines=1, value="", label="Custom stopping strings", placeholder='"\\n", "\\nYou:"',
                                info='In addition to the defaults. Written between "" and separated by commas.')
                            settings_inputs["add_bos_token"] = gr.Checkbox(
                                value=defaults.add_bos_token, label="Add the bos_token to the beginning of prompts")
                            settings_inputs["ban_eos_token"] = gr.Checkbox(
                                value=False, label="Ban the eos_token",
                                info="Forces the model to never end the generation prematurely.")
                            settings_inputs["skip_special_tokens"] = gr.Checkbox(
                                value=True, label="Skip special tokens",
                                info="Some specific models need this unset.")
                            settings_inputs["grammar_string"] = gr.Textbox(
                                lines=4, value="", label="Grammar", max_length=MAX_FIELD_CHARS,
                                placeholder='root ::= "yes" | "no"',
                                info="A GBNF grammar (llama.cpp's syntax) that every reply must follow; empty: "
                                     "none.")

                with gr.Tab("Character", elem_id="character-tab"):
                    with gr.Row():
                        character_menu = gr.Dropdown(
                            [NO_CHARACTER] + character_names(characters_dir), value=NO_CHARACTER,
                            allow_custom_value=True, scale=3,
                            label="Character", elem_id="character-menu",
                            info=f"The characters in {characters_dir} (YAML, JSON, PNG cards).")
                        refresh_characters = gr.Button("🔄", scale=0, min_width=40, elem_id="refresh-characters")
                        upload_character_button = gr.UploadButton(
                            "📂 Load a character (YAML, JSON, PNG card)", file_types=list(CARD_SUFFIXES), scale=1,
                            elem_id="upload-character")
                    settings_inputs["name1"] = gr.Textbox(value=blank.user_name, label="Your name",
                                                          elem_id="your-name")
                    settings_inputs["name2"] = gr.Textbox(value=blank.name, label="Character's name",
                                                          elem_id="character-name")
                    settings_inputs["character_context"] = gr.Textbox(
                        value=blank.context, lines=4, label="Context", elem_id="character-context",
                        info="Used in chat and chat-instruct modes.")
                    greeting = gr.Textbox(value="", lines=2, label="Greeting", elem_id="character-greeting",
                                          max_length=MAX_FIELD_CHARS,
                                          info="The character's first message: it starts every new chat.")
                    with gr.Row():
                        save_character_overwrite = gr.Checkbox(False, label="Overwrite", scale=0, min_width=80,
                                                               info="replace a character of that name")
                        save_character_button = gr.Button("💾 Save the character", scale=1,
                                                          elem_id="save-character")
                        user_picture_button = gr.UploadButton("🖼️ Your picture (PNG/JPEG)",
                                                              file_types=list(PICTURE_SUFFIXES), scale=1,
                                                              elem_id="upload-your-picture")
                    character_status = gr.Markdown("", elem_id="character-status")
                    pending_card = gr.State(None)

                with gr.Tab("Instruction template"):
                    with gr.Row():
                        settings_inputs["template_name"] = template_menu = gr.Dropdown(
                            template_store.template_choices(), value=template_name, label="Instruction template",
                            elem_id="instruction-template",
                            info="Change this according to the model that you are using. Used in instruct and "
                                 "chat-instruct modes.")
                        save_name = gr.Textbox(label="Save as", placeholder="My template", scale=1, max_length=64)
                        save_overwrite = gr.Checkbox(False, label="Overwrite", scale=0, min_width=80,
                                                     info="replace a saved template of that name")
                        save_template_button = gr.Button("💾 Save", scale=0, min_width=80)
                        delete_template_button = gr.Button("🗑️ Delete", scale=0, min_width=80)
                        upload_template_button = gr.UploadButton("📂 Load file", file_types=list(TEXT_SUFFIXES),
                                                                 scale=0, min_width=80, elem_id="upload-template")
                    template_status = gr.Markdown("", elem_id="template-status")
                    settings_inputs["user_string"] = gr.Textbox(value=template.user, lines=2, label="User string")
                    settings_inputs["bot_string"] = gr.Textbox(value=template.bot, lines=1, label="Bot string")
                    settings_inputs["context_instruct"] = gr.Textbox(value=template.context, lines=4,
                                                                     label="Context")
                    settings_inputs["turn_template"] = gr.Textbox(
                        value=template.turn_template, lines=1, label="Turn template",
                        info="Used to precisely define the placement of spaces and new line characters in "
                             "instruction prompts.")
                    settings_inputs["system_message"] = gr.Textbox(
                        value=template.system_message, lines=3, label="System message",
                        info="Replaces <|system-message|> in the context.")
                    settings_inputs["custom_system_message"] = gr.Textbox(
                        value="", lines=2, label="Custom system message",
                        info="If not empty, will be used instead of the default one.")
                    settings_inputs["chat_instruct_command"] = gr.Textbox(
                        value=DEFAULT_CHAT_INSTRUCT_COMMAND, lines=4, label="Command for chat-instruct mode",
                        info="<|character|> gets replaced by the bot name, and <|prompt|> gets replaced by the "
                             "regular chat prompt.")

            with gr.Tab("Model", id="model", elem_id="model-tab"):
                with gr.Row():
                    # a list, never a path field: a client must not probe the server's files through load errors.
                    # Custom values pass Gradio's own check (which echoes them back, and into the log) to
                    # load_model, which refuses anything not in the list with one message.
                    model_path = gr.Dropdown(
                        manager.model_files(), value=manager.current_file(), allow_custom_value=True,
                        label="Model file (GGUF or GGML)", scale=4, elem_id="model-file",
                        info=f"The model files in {manager.model_dir}." if manager.model_dir
                        else "Models are loaded on the remote server." if backend.remote
                        else "Loading models is off (no model directory).")
                    refresh_models = gr.Button("🔄", scale=0, min_width=40, elem_id="refresh-models")
                    model_n_ctx = gr.Number(value=manager.llama.n_ctx() if manager.llama else DEFAULT_N_CTX,
                                            precision=0, label="n_ctx (context size)", minimum=16)
                    model_threads = gr.Number(value=manager.llama.n_threads if manager.llama else 0, precision=0,
                                              label="threads", minimum=0)
                    model_gpu_layers = gr.Number(value=0, precision=0, label="n-gpu-layers", minimum=-1,
                                                 info="Layers offloaded to an NVIDIA GPU (-1: all); needs the "
                                                      "cuda extra, else the model runs on the CPU.")
                load_button = gr.Button("Load", variant="primary", elem_id="load-model")
                model_status = gr.Markdown("", elem_id="model-status")
                model_info = gr.Markdown(backend.describe(), elem_id="model-info")

        # (the menus of past chats, presets and characters change while the page is open, so they take values
        # outside their first list; the stores check every name: safe_name, and inside the user data folder)

        # ---- turning the page's values into prompt and sampler settings --------------------------------------
        def prompt_settings(values: dict) -> chat.PromptSettings:
            fields_template = TextgenTemplate(user=values["user_string"] or "", bot=values["bot_string"] or "",
                                              turn_template=values["turn_template"] or "",
                                              context=values["context_instruct"] or "",
                                              system_message=values["system_message"] or "")
            if values.get("template_name") == template_store.FROM_MODEL_FILE and manager.model_template is None \
                    and not backend.remote:
                if manager.model_jinja is None:
                    raise ValueError("the model file has no chat template; pick an instruction template")
                chosen = manager.model_jinja
            else:
                # remote: the server's template is used where the chat API writes the prompt; raw prompts (chat
                # modes, Continue, Start reply with) are written with the template fields
                chosen = fields_template
            character = Character(name=values["name2"] or "AI", user_name=values["name1"] or "You",
                                  context=(values["character_context"] or "").strip() + "\n", greeting="")
            return chat.PromptSettings(template=chosen, mode=values["mode"],
                                       custom_system_message=values["custom_system_message"] or "",
                                       character=character,
                                       chat_instruct_command=values["chat_instruct_command"] or "<|prompt|>")

        def make_prompt(values, generation, history_value, message, **kwargs):
            spec = prompt_settings(values)
            budget = backend.prompt_budget(generation)
            count = (lambda text: backend.count_tokens(text, generation)) if budget is not None else None
            prompt = spec.build_prompt(history_value, message, max_prompt_tokens=budget, count_tokens=count,
                                       **kwargs)
            return spec, prompt

        def uses_chat_api(values, kind: str, start: str) -> bool:
            """Remote, instruct mode, the server's own template, a plain new reply: OpenAI's chat API."""
            return backend.remote and values.get("mode") == "instruct" and kind in ("generate", "regenerate") \
                and values.get("template_name") == template_store.FROM_MODEL_FILE and not start

        def chat_messages_for(values, history_value, message) -> list[dict]:
            system = values.get("custom_system_message") or ""
            out = [{"role": "system", "content": system}] if system else []
            for user, bot in history_value:
                if user and user != BEGIN_VISIBLE_CHAT:
                    out.append({"role": "user", "content": user})
                if bot:
                    out.append({"role": "assistant", "content": bot})
            out.append({"role": "user", "content": message})
            return out

        def session_flag(request):
            flag = manager.stop_flag(getattr(request, "session_hash", None))
            flag.clear()
            return flag

        def reply_stream(request, spec, prompt, generation, stats):
            flag = session_flag(request)
            yield from backend.stream_prompt(prompt, generation, spec.stop_strings(
                generation.custom_stopping_strings), flag.is_set, stats)

        # ---- past chats ----------------------------------------------------------------------------------------
        def chat_folder_for(values) -> Path:
            return chat_logs.chat_folder(data_dir, values.get("mode") or "instruct", values.get("name2") or "AI")

        def chat_list_update(folder: Path, value=None):
            choices = chat_logs.list_chats(folder)
            return gr.update(choices=choices, value=value if value in choices else None)

        def save_session_chat(ref, history_value) -> None:
            if ref and history_value:
                chat_logs.save_chat(Path(ref["folder"]), ref["id"], history_value)

        def ensure_ref(ref, values) -> dict:
            folder = chat_folder_for(values)
            if ref and ref.get("folder") == str(folder):
                return ref
            return {"id": chat_logs.new_chat_id(folder), "folder": str(folder)}

        # ---- event handlers ------------------------------------------------------------------------------------
        def run_reply(kind: str, message: str, history_value, request: gr.Request, values: dict, ref, start: str):
            _check_lengths(values, message)
            if len(start or "") > MAX_FIELD_CHARS:
                raise ValueError(f"\"Start reply with\" is {len(start):,} characters; the limit is "
                                 f"{MAX_FIELD_CHARS:,}")
            start = "" if kind == "continue" else (start or "")
            if not backend.remote:
                manager.require()
            generation = GenerationSettings.from_values(values)
            history_value = chat.copy_history(history_value)
            message = message or ""
            if kind == "regenerate":
                if not history_value or history_value[-1][0] == BEGIN_VISIBLE_CHAT:
                    raise ValueError("there is no reply to regenerate")
                message = history_value.pop()[0]
            if kind == "continue" and not history_value:
                raise ValueError("there is no reply to continue")
            if kind == "generate" and not message.strip():
                yield chat.history_to_messages(history_value), history_value, message, ref, None
                return
            stats = chat.ReplyStats()
            if uses_chat_api(values, kind, start):
                stops = parse_stop_strings(generation.custom_stopping_strings)
                stream = backend.stream_chat(chat_messages_for(values, history_value, message), generation, stops,
                                             session_flag(request).is_set, stats)
            else:
                spec, prompt = make_prompt(values, generation, history_value, message, continue_=kind == "continue")
                stream = reply_stream(request, spec, prompt + start, generation, stats)
            ref = ensure_ref(ref, values)
            if kind == "continue":
                base = history_value[-1][1]
            else:
                history_value.append([message, start])
                base = start
            yield chat.history_to_messages(history_value), history_value, "", ref, None
            try:
                for text in stream:
                    history_value[-1][1] = base + text
                    yield chat.history_to_messages(history_value), history_value, "", ref, None
            finally:   # saved whatever ends the reply: its end, Stop, an error, the page closing
                save_session_chat(ref, history_value)
            yield chat.history_to_messages(history_value), history_value, "", ref, stats.line()

        @_user_errors
        def generate(message, history, chat_state=None, start_with="", request: gr.Request = None, **values):
            yield from run_reply("generate", message, history, request, values, chat_state, start_with)

        @_user_errors
        def regenerate(history, chat_state=None, start_with="", request: gr.Request = None, **values):
            yield from run_reply("regenerate", "", history, request, values, chat_state, start_with)

        @_user_errors
        def continue_reply(history, chat_state=None, request: gr.Request = None, **values):
            yield from run_reply("continue", "", history, request, values, chat_state, "")

        @_user_errors
        def impersonate(message, history, request: gr.Request, **values):
            _check_lengths(values, message)
            if not backend.remote:
                manager.require()
            generation = GenerationSettings.from_values(values)
            message = message or ""
            spec, prompt = make_prompt(values, generation, history, message, impersonate=True)
            yield message
            for text in reply_stream(request, spec, prompt, generation, chat.ReplyStats()):
                yield message + text

        @_user_errors
        def show_prompt(message, history, **values):
            _check_lengths(values, message)
            if not backend.remote:
                manager.require()
            generation = GenerationSettings.from_values(values)
            if uses_chat_api(values, "generate", ""):
                return ("(the remote server writes this prompt with its own chat template from these messages)\n"
                        + json.dumps(chat_messages_for(values, chat.copy_history(history), message or ""),
                                     indent=2, ensure_ascii=False))
            return make_prompt(values, generation, history, message or "")[1]

        def stop(request: gr.Request):
            manager.stop_flag(getattr(request, "session_hash", None)).set()

        def remove_last(history, chat_state):
            message, history = chat.remove_last(history)
            save_session_chat(chat_state, history)
            return message, chat.history_to_messages(history), history

        def replace_last(message, history, chat_state):
            history = chat.replace_last_reply(history, message or "")
            save_session_chat(chat_state, history)
            return "", chat.history_to_messages(history), history

        def clear_history():
            return [], [], None, gr.update(visible=False), gr.update(visible=True), gr.update(visible=False)

        @_user_errors
        def send_dummy(kind, message, history, chat_state, mode, name2):
            """textgen's "Send dummy message" (a user message, no reply) and "Send dummy reply" (a reply, filling
            the last exchange when it has none)."""
            if len(message or "") > MAX_MESSAGE_CHARS:
                raise ValueError(f"the message is {len(message):,} characters; the limit is {MAX_MESSAGE_CHARS:,}")
            history = chat.copy_history(history)
            if not (message or "").strip():
                return message, chat.history_to_messages(history), history, chat_state, gr.update()
            if kind == "message":
                history.append([message, ""])
            elif history and not history[-1][1]:
                history[-1][1] = message
            else:
                history.append(["", message])
            chat_state = ensure_ref(chat_state, {"mode": mode, "name2": name2})
            save_session_chat(chat_state, history)
            return ("", chat.history_to_messages(history), history, chat_state,
                    chat_list_update(Path(chat_state["folder"]), chat_state["id"]))

        @_user_errors
        def send_to_notebook(message, history, **values):
            prompt = show_prompt(message, history, **values)
            return prompt, gr.Tabs(selected="notebook")

        def start_new_chat(greeting_text, mode, name1, name2):
            """A new chat: empty, or the character's greeting (its {{user}}/{{char}} filled in)."""
            history = []
            if (greeting_text or "").strip() and mode != "instruct":
                history = [[BEGIN_VISIBLE_CHAT, replace_character_names(greeting_text, name1 or "You",
                                                                        name2 or "AI")]]
            ref = None
            if history:   # a greeting alone is a chat worth keeping, as in textgen
                ref = ensure_ref(None, {"mode": mode, "name2": name2})
                save_session_chat(ref, history)
            folder = chat_folder_for({"mode": mode, "name2": name2})
            return (chat.history_to_messages(history), history, ref,
                    chat_list_update(folder, ref["id"] if ref else None), "")

        @_user_errors
        def load_past_chat(chat_id, mode, name2):
            folder = chat_folder_for({"mode": mode, "name2": name2})
            if not chat_id:
                return gr.update(), gr.update(), gr.update(), ""
            history = chat_logs.load_chat(folder, chat_id)
            return (chat.history_to_messages(history), history, {"id": chat_id, "folder": str(folder)},
                    f"Loaded `{chat_id}`.")

        def refresh_chat_list(mode, name2, chat_state):
            return chat_list_update(chat_folder_for({"mode": mode, "name2": name2}),
                                    chat_state["id"] if chat_state else None)

        @_user_errors
        def rename_chat(chat_id, new_name, mode, name2, chat_state):
            folder = chat_folder_for({"mode": mode, "name2": name2})
            if not chat_id:
                raise ValueError("choose a past chat to rename")
            new_id = chat_logs.rename_chat(folder, chat_id, new_name)
            if chat_state and chat_state.get("id") == chat_id and chat_state.get("folder") == str(folder):
                chat_state = {"id": new_id, "folder": str(folder)}
            return (chat_list_update(folder, new_id), chat_state, f"Renamed to `{new_id}`.",
                    *_hide(rename_text, rename_confirm, rename_cancel))

        @_user_errors
        def delete_chat(chat_id, mode, name2, chat_state, history):
            folder = chat_folder_for({"mode": mode, "name2": name2})
            if not chat_id:
                raise ValueError("choose a past chat to delete")
            chat_logs.delete_chat(folder, chat_id)
            if chat_state and chat_state.get("id") == chat_id and chat_state.get("folder") == str(folder):
                chat_state, history = None, []   # the chat on the page was the one deleted
            return (chat_list_update(folder), chat_state, chat.history_to_messages(history), history,
                    f"Deleted `{chat_id}`.", gr.update(visible=False), gr.update(visible=False),
                    gr.update(visible=True))

        @_user_errors
        def export_chat(history, chat_state):
            history = chat.copy_history(history)
            if not history:
                raise ValueError("the chat is empty: nothing to export")
            name = chat_state["id"] if chat_state else "chat"
            path = exports_dir / f"{user_data.safe_name(name, 'chat name')}.json"
            user_data.atomic_write(path, json.dumps(chat_logs.to_file_data(history), indent=4,
                                                    ensure_ascii=False).encode("utf-8"))
            return gr.update(value=str(path), visible=True), f"Exported `{path.name}`."

        @_user_errors
        def import_chat(file, mode, name2):
            path = _uploaded(file, (".json",), chat_logs.MAX_CHAT_FILE_BYTES)
            history = chat_logs.parse_chat(user_data.read_bounded(path, chat_logs.MAX_CHAT_FILE_BYTES,
                                                                  "chat file"), "the imported file")
            ref = ensure_ref(None, {"mode": mode, "name2": name2})
            chat_logs.save_chat(Path(ref["folder"]), ref["id"], history)
            return (chat.history_to_messages(history), history, ref,
                    chat_list_update(Path(ref["folder"]), ref["id"]), f"Imported as `{ref['id']}`.")

        # ---- characters ----------------------------------------------------------------------------------------
        def picture_file(data: bytes | None) -> str | None:
            """The picture in the pictures folder (named by its hash), for the chat to show."""
            if not data:
                return None
            data = check_picture(data)
            suffix = ".png" if data.startswith(b"\x89PNG") else ".jpg"
            path = pictures_dir / f"{hashlib.sha256(data).hexdigest()[:32]}{suffix}"
            if not path.exists():
                user_data.atomic_write(path, data)
            return str(path)

        def chatbot_with_pictures(history, user_pic, bot_pic):
            return gr.Chatbot(value=chat.history_to_messages(history), avatar_images=(user_pic, bot_pic))

        def card_outputs(card: Character, picture: bytes | None, mode, name1, note: str):
            """The page after choosing a character: its fields, its picture, and a new chat with its greeting."""
            bot_pic = picture_file(picture)
            messages, history, ref, chats, _ = start_new_chat(card.greeting, mode, name1, card.name)
            return (card.name, card.context, card.greeting, bot_pic, history, ref, chats, note)

        @_user_errors
        def upload_character(file):
            """The uploaded card's name and context (this endpoint's answer); its greeting and picture follow in
            the pending state, for the step that starts the new chat."""
            card = load_character(_uploaded(file, CARD_SUFFIXES, MAX_CARD_PNG_BYTES))
            _check_lengths({"name2": card.name, "character_context": card.context})
            return card.name, card.context, {"name": card.name, "context": card.context,
                                             "greeting": card.greeting, "picture": card.picture}

        @_user_errors
        def apply_pending_card(pending, mode, name1, user_pic):
            if not pending:
                return (*[gr.update()] * 6, gr.update(), "")
            card = Character(name=pending["name"], context=pending["context"], greeting=pending["greeting"])
            _name, _context, greet, bot_pic, history, ref, chats, _ = card_outputs(
                card, pending["picture"], mode, name1, "")
            return (greet, bot_pic, history, ref, chats, chatbot_with_pictures(history, user_pic, bot_pic), None,
                    f"Loaded the character `{card.name}`: a new chat" + (
                        " starts with its greeting." if mode != "instruct" else " (greetings show in the chat modes)."))

        @_user_errors
        def choose_character(name, mode, name1, user_pic):
            if not name or name == NO_CHARACTER:
                card, picture = Character(greeting=""), None
            else:
                card = load_named(characters_dir, name)
                picture = card.picture
            _check_lengths({"name2": card.name, "character_context": card.context})
            name2, context, greet, bot_pic, history, ref, chats, _ = card_outputs(card, picture, mode, name1, "")
            return (name2, context, greet, bot_pic, history, ref, chats,
                    chatbot_with_pictures(history, user_pic, bot_pic),
                    f"Character `{name2}`." if name != NO_CHARACTER else "")

        @_user_errors
        def save_character(name2, context, greeting_text, bot_pic, overwrite, pending):
            _check_lengths({"name2": name2, "character_context": context})
            picture = Path(bot_pic).read_bytes() if bot_pic else None
            if pending and pending["name"] == (name2 or "").strip():
                # Saved right after an upload, before the step that applies the card's greeting and picture ran:
                # take them from the card itself, or the saved character would lose them.
                picture, greeting_text = pending["picture"], pending["greeting"]
            path = save_character_file(characters_dir, Character(name=(name2 or "").strip(), context=context or "",
                                                                 greeting=greeting_text or ""),
                                       picture=picture, overwrite=bool(overwrite))
            return (gr.update(choices=[NO_CHARACTER] + character_names(characters_dir), value=path.stem),
                    f"Saved `{path.name}`" + (" and its picture." if picture else "."))

        @_user_errors
        def upload_user_picture(file, history, bot_pic):
            path = _uploaded(file, PICTURE_SUFFIXES, MAX_CARD_PNG_BYTES)
            user_pic = picture_file(check_picture(user_data.read_bounded(path, MAX_CARD_PNG_BYTES, "picture"),
                                                  "the picture"))
            return user_pic, chatbot_with_pictures(history, user_pic, bot_pic), "Your picture is set."

        # ---- Default and Notebook tabs -------------------------------------------------------------------------
        def raw_generation(prompt: str, request, values: dict, stats: chat.ReplyStats):
            _check_lengths(values, prompt)
            if not backend.remote:
                manager.require()
            generation = GenerationSettings.from_values(values)
            flag = session_flag(request)
            return backend.stream_prompt(prompt, generation, parse_stop_strings(generation.custom_stopping_strings),
                                         flag.is_set, stats)

        def default_run(prompt, output, continuing, request: gr.Request, values):
            """The Default tab: the output of the raw prompt (Continue: of the prompt and the output so far)."""
            prompt, output = prompt or "", output or ""
            base = output if continuing else ""
            stats = chat.ReplyStats()
            yield base, ""
            reply = ""
            for reply in raw_generation(prompt + base, request, values, stats):
                yield base + reply, ""
            yield base + reply, stats.line()

        def default_generate_fn(prompt, output, request: gr.Request, **values):
            yield from default_run(prompt, output, False, request, values)

        def default_continue_fn(prompt, output, request: gr.Request, **values):
            yield from default_run(prompt, output, True, request, values)

        @_user_errors
        def notebook_run(text, request: gr.Request, **values):
            text = text or ""
            stats = chat.ReplyStats()
            yield text, text, ""
            reply = ""
            for reply in raw_generation(text, request, values, stats):
                yield text + reply, text, ""
            yield text + reply, text, stats.line()

        @_user_errors
        def count_tokens(text, **values):
            _check_lengths(values, text)
            if not backend.remote:
                manager.require()
            n = backend.count_tokens(text or "", GenerationSettings.from_values(values))
            if n is None:
                return "The server does not count tokens (it has no /tokenize)."
            n_ctx = backend.n_ctx()
            return f"{n:,} tokens" + (f" of a {n_ctx:,}-token context" if n_ctx else "")

        @_user_errors
        def template_start(**values):
            spec = prompt_settings({**values, "mode": "instruct"})
            if not isinstance(spec.template, TextgenTemplate):
                return spec.template.render([{"role": "user", "content": "Input"}], add_generation_prompt=True)
            return spec.build_prompt([], "Input")

        # ---- templates, presets, models ------------------------------------------------------------------------
        @_user_errors
        def select_template(name):
            if name == template_store.FROM_MODEL_FILE and manager.model_template is None:
                note = ("The remote server's chat template is used in instruct mode; these fields write the raw "
                        "prompts (chat modes, Continue, Start reply with)." if backend.remote else
                        "The model file's Jinja chat template is used as is (instruct mode); the fields below "
                        "are ignored." if manager.model_jinja is not None else
                        "The model file has no chat template: pick another.")
                return (*[gr.update()] * len(TEMPLATE_FIELDS), note)
            chosen = template_store.load_named_template(name, manager.model_template)
            note = "" if name != template_store.FROM_MODEL_FILE else "Written from the model file's chat template."
            return (chosen.user, chosen.bot, chosen.context, chosen.turn_template, chosen.system_message, note)

        @_user_errors
        def save_template(name, user_string, bot_string, context_instruct, turn_template, system_message,
                          overwrite=False):
            fields = dict(zip(TEMPLATE_FIELDS, (user_string, bot_string, context_instruct, turn_template,
                                                system_message)))
            _check_lengths(fields)
            current = TextgenTemplate(user=user_string or "", bot=bot_string or "", context=context_instruct or "",
                                      turn_template=turn_template or "", system_message=system_message or "")
            path = template_store.save_template(name, current, overwrite=bool(overwrite))
            return (gr.update(choices=template_store.template_choices(), value=path.stem),
                    f"Saved `{path.name}`.")

        @_user_errors
        def upload_template(file):
            loaded = TextgenTemplate.load(_uploaded(file, TEXT_SUFFIXES, MAX_TEXT_UPLOAD_BYTES))
            _check_lengths(dict(zip(TEMPLATE_FIELDS, (loaded.user, loaded.bot, loaded.context,
                                                      loaded.turn_template, loaded.system_message))))
            return (loaded.user, loaded.bot, loaded.context, loaded.turn_template, loaded.system_message,
                    "Loaded the file's fields: save them under a name to keep them.")

        @_user_errors
        def delete_template(name):
            path = template_store.delete_template(name)
            fallback, _ = _initial_template(manager)
            return gr.update(choices=template_store.template_choices(), value=fallback), f"Deleted `{path.name}`."

        @_user_errors
        def apply_preset(name):
            values, ignored = load_preset(presets_dir, name)
            return (*(values[f] for f in PRESET_FIELDS),
                    f"Left out (not samplers this engine has): {', '.join(ignored)}." if ignored else "")

        @_user_errors
        def save_preset_file(name, overwrite, *numbers):
            path = save_preset(presets_dir, name, dict(zip(PRESET_FIELDS, numbers)), overwrite=bool(overwrite))
            return gr.update(choices=preset_choices(presets_dir), value=path.stem), f"Saved `{path.name}`."

        def load_model(name, n_ctx_value, threads, gpu_layers):
            if backend.remote:
                yield ("**Error:** the page runs against a remote API: models are loaded on that server",
                       gr.update(), gr.update())
                return
            if not isinstance(name, str) or name not in manager.model_files():
                # one message whatever the value is: no hint whether such a path exists on the server
                yield ("**Error:** choose a model file from the list (the GGUF/GGML files in the model "
                       "directory)", gr.update(), gr.update())
                return
            yield f"Loading `{name}`...", gr.update(), gr.update()
            try:
                n_ctx_value = int(n_ctx_value or DEFAULT_N_CTX)
                if not 16 <= n_ctx_value <= MAX_N_CTX:
                    # a client's number becomes an allocation of n_ctx x layers x heads: bound it here
                    raise ValueError(f"n_ctx must be in 16..{MAX_N_CTX:,}, got {n_ctx_value:,}")
                manager.load_named(name, n_ctx=n_ctx_value, n_threads=min(int(threads or 0), os.cpu_count() or 1)
                                   or None, n_gpu_layers=int(gpu_layers or 0))
            except (ValueError, OSError, OverflowError) as exc:
                yield f"**Error:** {short(str(exc))}", gr.update(), gr.update()
                return
            name, _ = _initial_template(manager)
            yield (f"Loaded `{name}` in {manager.llama.load_time_s:.1f} s.", manager.describe(),
                   gr.update(choices=template_store.template_choices(), value=name))

        # ---- wiring ------------------------------------------------------------------------------------------------
        generation_event = dict(concurrency_limit=1, concurrency_id=GENERATION_QUEUE, show_progress="hidden")
        private = dict(api_visibility="private")
        mode_input, name1_input, name2_input = (settings_inputs["mode"], settings_inputs["name1"],
                                                settings_inputs["name2"])
        reply_outputs = [chatbot, history, textbox, chat_ref, last_stats]
        after_reply = dict(fn=lambda line, mode, name2, ref: (line or "", refresh_chat_list(mode, name2, ref)),
                           inputs=[last_stats, mode_input, name2_input, chat_ref], outputs=[reply_status, past_chats],
                           **private)
        chat_inputs = {"history": history, "chat_state": chat_ref, **settings_inputs}
        generate_button.click(generate, inputs_kwargs={"message": textbox, "start_with": start_with, **chat_inputs},
                              outputs=reply_outputs, api_name="generate", **generation_event).then(**after_reply)
        textbox.submit(generate, inputs_kwargs={"message": textbox, "start_with": start_with, **chat_inputs},
                       outputs=reply_outputs, **private, **generation_event).then(**after_reply)
        regenerate_button.click(regenerate, inputs_kwargs={"start_with": start_with, **chat_inputs},
                                outputs=reply_outputs, api_name="regenerate", **generation_event).then(**after_reply)
        continue_button.click(continue_reply, inputs_kwargs=chat_inputs,
                              outputs=reply_outputs, api_name="continue", **generation_event).then(**after_reply)
        impersonate_button.click(impersonate, inputs_kwargs={"message": textbox, "history": history,
                                                             **settings_inputs},
                                 outputs=[textbox], api_name="impersonate", **generation_event)
        for button in (stop_button, default_stop, notebook_stop):
            button.click(stop, None, None, queue=False, api_name="stop" if button is stop_button else None,
                         **({} if button is stop_button else private))
        show_prompt_button.click(show_prompt, inputs_kwargs={"message": textbox, "history": history,
                                                             **settings_inputs},
                                 outputs=[prompt_view], api_name="show_prompt")
        remove_button.click(remove_last, [history, chat_ref], [textbox, chatbot, history], api_name="remove_last")
        copy_button.click(chat.last_reply, [history], [textbox], api_name="copy_last_reply")
        replace_button.click(replace_last, [textbox, history, chat_ref], [textbox, chatbot, history],
                             api_name="replace_last_reply")
        dummy_outputs = [textbox, chatbot, history, chat_ref, past_chats]
        dummy_message_button.click(lambda *a: send_dummy("message", *a),
                                   [textbox, history, chat_ref, mode_input, name2_input], dummy_outputs,
                                   api_name="send_dummy_message")
        dummy_reply_button.click(lambda *a: send_dummy("reply", *a),
                                 [textbox, history, chat_ref, mode_input, name2_input], dummy_outputs,
                                 api_name="send_dummy_reply")
        notebook_send_button.click(send_to_notebook, inputs_kwargs={"message": textbox, "history": history,
                                                                    **settings_inputs},
                                   outputs=[notebook_text, tabs], api_name="send_to_notebook")
        clear_arr = [clear_confirm, clear_button, clear_cancel]
        clear_button.click(lambda: (gr.update(visible=True), gr.update(visible=False), gr.update(visible=True)),
                           None, clear_arr, **private)
        clear_cancel.click(lambda: (gr.update(visible=False), gr.update(visible=True), gr.update(visible=False)),
                           None, clear_arr, **private)
        # the Chatbot's own trash icon empties the session's history too, so the page never shows less than is sent
        chatbot.clear(lambda: ([], None), None, [history, chat_ref], **private)
        clear_confirm.click(clear_history, None, [chatbot, history, chat_ref] + clear_arr, api_name="clear_history")

        # past chats
        new_chat_button.click(start_new_chat, [greeting, mode_input, name1_input, name2_input],
                              [chatbot, history, chat_ref, past_chats, chats_status], api_name="new_chat")
        past_chats.input(load_past_chat, [past_chats, mode_input, name2_input],
                         [chatbot, history, chat_ref, chats_status], api_name="load_chat")
        rename_arr = [rename_text, rename_confirm, rename_cancel]
        rename_button.click(lambda chat_id: (gr.update(visible=True, value=chat_id or ""), gr.update(visible=True),
                                             gr.update(visible=True)), [past_chats], rename_arr, **private)
        rename_cancel.click(lambda: _hide(*rename_arr), None, rename_arr, **private)
        rename_confirm.click(rename_chat, [past_chats, rename_text, mode_input, name2_input, chat_ref],
                             [past_chats, chat_ref, chats_status] + rename_arr, api_name="rename_chat")
        delete_arr = [delete_confirm, delete_cancel, delete_button]
        delete_button.click(lambda: (gr.update(visible=True), gr.update(visible=True), gr.update(visible=False)),
                            None, delete_arr, **private)
        delete_cancel.click(lambda: (gr.update(visible=False), gr.update(visible=False), gr.update(visible=True)),
                            None, delete_arr, **private)
        delete_confirm.click(delete_chat, [past_chats, mode_input, name2_input, chat_ref, history],
                             [past_chats, chat_ref, chatbot, history, chats_status] + delete_arr,
                             api_name="delete_chat")
        export_button.click(export_chat, [history, chat_ref], [export_file, chats_status], api_name="export_chat")
        import_button.upload(import_chat, [import_button, mode_input, name2_input],
                             [chatbot, history, chat_ref, past_chats, chats_status], api_name="import_chat")
        mode_input.change(refresh_chat_list, [mode_input, name2_input, chat_ref], [past_chats], **private)
        # a page (re)opened lists what was saved since the app started: past chats, characters, presets
        demo.load(lambda mode, name2, ref: (refresh_chat_list(mode, name2, ref),
                                            gr.update(choices=[NO_CHARACTER] + character_names(characters_dir)),
                                            gr.update(choices=preset_choices(presets_dir))),
                  [mode_input, name2_input, chat_ref], [past_chats, character_menu, preset], **private)

        # characters
        character_fields = [name2_input, settings_inputs["character_context"], greeting, bot_picture, history,
                            chat_ref, past_chats, chatbot, character_status]
        character_menu.input(choose_character, [character_menu, mode_input, name1_input, user_picture],
                             character_fields, api_name="choose_character")
        refresh_characters.click(lambda: gr.update(choices=[NO_CHARACTER] + character_names(characters_dir)),
                                 None, [character_menu], api_name="list_characters")
        upload_character_button.upload(
            upload_character, [upload_character_button],
            [name2_input, settings_inputs["character_context"], pending_card], api_name="upload_character"
        ).then(apply_pending_card, [pending_card, mode_input, name1_input, user_picture],
               [greeting, bot_picture, history, chat_ref, past_chats, chatbot, pending_card, character_status],
               **private)
        save_character_button.click(save_character, [name2_input, settings_inputs["character_context"], greeting,
                                                     bot_picture, save_character_overwrite, pending_card],
                                    [character_menu, character_status], api_name="save_character")
        user_picture_button.upload(upload_user_picture, [user_picture_button, history, bot_picture],
                                   [user_picture, chatbot, character_status], api_name="upload_user_picture")

        # Default and Notebook
        raw_inputs = {k: settings_inputs[k] for k in GenerationSettings.__dataclass_fields__ if k in settings_inputs}
        default_generate.click(_user_errors(default_generate_fn),
                               inputs_kwargs={"prompt": default_input, "output": default_output, **raw_inputs},
                               outputs=[default_output, default_status], api_name="default_generate",
                               **generation_event)
        default_continue.click(_user_errors(default_continue_fn),
                               inputs_kwargs={"prompt": default_input, "output": default_output, **raw_inputs},
                               outputs=[default_output, default_status], api_name="default_continue",
                               **generation_event)
        default_count.click(count_tokens, inputs_kwargs={"text": default_input, **raw_inputs},
                            outputs=[default_tokens], api_name="count_tokens")
        default_from_template.click(template_start, inputs_kwargs=settings_inputs, outputs=[default_input],
                                    api_name="template_prompt")
        notebook_generate.click(notebook_run, inputs_kwargs={"text": notebook_text, **raw_inputs},
                                outputs=[notebook_text, notebook_undo_state, notebook_status],
                                api_name="notebook_generate", **generation_event)
        notebook_undo.click(lambda before: before, [notebook_undo_state], [notebook_text], **private)
        notebook_regenerate.click(lambda before: before, [notebook_undo_state], [notebook_text], **private).then(
            notebook_run, inputs_kwargs={"text": notebook_text, **raw_inputs},
            outputs=[notebook_text, notebook_undo_state, notebook_status], **private, **generation_event)
        notebook_count.click(count_tokens, inputs_kwargs={"text": notebook_text, **raw_inputs},
                             outputs=[notebook_status], **private)

        # templates, presets, models
        template_fields = [settings_inputs[name] for name in TEMPLATE_FIELDS]
        template_menu.change(select_template, [template_menu], template_fields + [template_status],
                             api_name="select_template")
        save_template_button.click(save_template, [save_name] + template_fields + [save_overwrite],
                                   [template_menu, template_status], api_name="save_template")
        upload_template_button.upload(upload_template, [upload_template_button], template_fields + [template_status],
                                      api_name="upload_template")
        refresh_models.click(lambda: gr.update(choices=manager.model_files()), None, [model_path],
                             api_name="list_models")
        delete_template_button.click(delete_template, [template_menu], [template_menu, template_status],
                                     api_name="delete_template")
        preset_numbers = [settings_inputs[f] for f in PRESET_FIELDS]
        preset.change(apply_preset, [preset], preset_numbers + [preset_status], api_name="preset")
        refresh_presets.click(lambda: gr.update(choices=preset_choices(presets_dir)), None, [preset],
                              api_name="list_presets")
        preset_save_button.click(save_preset_file, [preset_save_name, preset_overwrite] + preset_numbers,
                                 [preset, preset_status], api_name="save_preset")
        load_button.click(load_model, [model_path, model_n_ctx, model_threads, model_gpu_layers],
                          [model_status, model_info, template_menu], api_name="load_model",
                          concurrency_limit=1, concurrency_id=GENERATION_QUEUE)
    demo.queue(default_concurrency_limit=4)
    demo.model_manager = manager   # for embedding code and tests
    demo.backend = backend
    demo.user_data_dir = data_dir
    return demo


def _hide(*components):
    return tuple(gr.update(visible=False) for _ in components)


def launch(model=None, *, port: int = 7860, listen: bool = False, share: bool = False, n_ctx: int = DEFAULT_N_CTX,
           n_threads=None, n_gpu_layers: int = 0, auth=None, model_dir=None, user_data_dir=None,
           api_url: str | None = None, api_key: str | None = None, api_model: str | None = None,
           draft_max: int = 0, **launch_kwargs) -> gr.Blocks:
    """Build and serve the app: 127.0.0.1 unless ``listen`` (0.0.0.0); a public link only with ``share``.

    ``auth``: "user:password", a (user, password) pair or a list of them. With ``listen`` or ``share`` a login is
    always required: without ``auth`` one is made up and printed. Uploads are limited to template, character and
    chat files (YAML/JSON, at most MAX_UPLOAD_BYTES) and pictures (PNG cards, JPEG; MAX_PICTURE_UPLOAD_BYTES).
    ``user_data_dir``, ``api_url``, ``api_key``, ``api_model``, ``draft_max``: as for ``build_app``."""
    from starlette.middleware import Middleware
    logins, generated = resolve_auth(auth, listen, share)
    demo = build_app(model, n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers, model_dir=model_dir,
                     user_data_dir=user_data_dir, api_url=api_url, api_key=api_key, api_model=api_model,
                     draft_max=draft_max)
    if generated is not None:
        print(f"ggml_webui: served beyond this machine, so a login is required: user {logins[0][0]!r}, password "
              f"{generated!r} (choose your own with --auth USER:PASSWORD)", file=sys.stderr, flush=True)
    app_kwargs = dict(launch_kwargs.pop("app_kwargs", None) or {})
    app_kwargs["middleware"] = [*app_kwargs.get("middleware", []), Middleware(UploadGuard)]
    launch_kwargs.setdefault("max_file_size", MAX_PICTURE_UPLOAD_BYTES)
    demo.launch(server_name="0.0.0.0" if listen else "127.0.0.1", server_port=port, share=share, auth=logins,
                app_kwargs=app_kwargs, **launch_kwargs)
    return demo
