"""The web chat: a Gradio Blocks page laid out like text-generation-webui's chat tab (late 2023).

``build_app(model)`` returns the ``gr.Blocks`` (mount it with ``gr.mount_gradio_app`` or launch it); ``launch``
serves it on 127.0.0.1 unless asked otherwise. Every button is also a named API endpoint (``/generate``,
``/stop``, ``/continue``, ``/regenerate``, ``/remove_last``, ``/impersonate``, ``/show_prompt``...) whose
parameters are named after the settings (``message``, ``mode``, ``turn_template``, ``max_new_tokens``...), so
``gradio_client`` can drive it; each client, like each browser tab, has its own history.

Models are loaded only by name from the model directory's list; served beyond 127.0.0.1 (``listen``/``share``)
the page asks for a login; uploads are template and character files only (see ``security``).
"""
import os
import sys
import traceback
from functools import wraps

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from ggml_backend.templates import Character, DEFAULT_CHAT_INSTRUCT_COMMAND, TemplateError, TextgenTemplate  # noqa

from . import chat, template_store  # noqa: E402
from .model_manager import ModelManager  # noqa: E402
from .security import MAX_UPLOAD_BYTES, UPLOAD_SUFFIXES, UploadGuard, resolve_auth, short  # noqa: E402
from .settings import DEFAULT_PRESET, PRESET_FIELDS, PRESETS, GenerationSettings, preset_values  # noqa: E402

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


def _manager_for(model, n_ctx: int, n_threads, n_gpu_layers: int, model_dir) -> ModelManager:
    from ggml_backend import Llama
    if isinstance(model, ModelManager):
        manager = model
    elif isinstance(model, Llama):
        manager = ModelManager(model)
    else:
        manager = ModelManager()
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


def _initial_template(manager: ModelManager) -> tuple[str, TextgenTemplate]:
    if manager.model_template is not None:
        return template_store.FROM_MODEL_FILE, manager.model_template
    name = "textgen-chatml"
    return name, template_store.load_named_template(name)


def build_app(model=None, *, n_ctx: int = DEFAULT_N_CTX, n_threads=None, n_gpu_layers: int = 0,
              title: str = "ggml_backend chat", model_dir=None) -> gr.Blocks:
    """The chat page for ``model``: None (the default model), a GGUF/GGML path, a loaded ``Llama`` (or a
    ``ModelManager``). ``n_ctx``/``n_threads``/``n_gpu_layers`` apply when the model is loaded here.
    The Model tab loads only the GGUF/GGML files in ``model_dir`` (default: the starting model's folder)."""
    manager = _manager_for(model, n_ctx, n_threads, n_gpu_layers, model_dir)
    template_name, template = _initial_template(manager)
    defaults = GenerationSettings(**preset_values(DEFAULT_PRESET),
                                  add_bos_token=bool(manager.llama.tokenizer.add_bos))

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        history = gr.State([])
        settings_inputs = {}

        with gr.Tab("Chat", elem_id="chat-tab"):
            chatbot = gr.Chatbot(label="Chat", elem_id="chat", height=440, value=[], buttons=["copy", "copy_all"])
            textbox = gr.Textbox(label="Input", show_label=False, placeholder="Send a message", elem_id="chat-input",
                                 lines=1)
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
            with gr.Row():
                clear_button = gr.Button("Clear history", elem_id="Clear-history")
                clear_confirm = gr.Button("Confirm", variant="stop", visible=False, elem_id="Clear-history-confirm")
                clear_cancel = gr.Button("Cancel", visible=False, elem_id="Clear-history-cancel")
            settings_inputs["mode"] = gr.Radio(
                MODES, value="instruct", label="Mode", elem_id="chat-mode",
                info="Defines how the chat prompt is generated. In instruct and chat-instruct modes, the instruction "
                     "template selected under Parameters > Instruction template must match the current model.")
            with gr.Accordion("Show prompt", open=False, elem_id="show-prompt-accordion"):
                show_prompt_button = gr.Button("Show prompt", elem_id="show-prompt")
                prompt_view = gr.Textbox(label="Prompt (exactly what Generate sends, for the text in the input box)",
                                         lines=8, max_lines=30, interactive=False, elem_id="prompt-view")

        with gr.Tab("Parameters", elem_id="parameters"):
            with gr.Tab("Generation"):
                preset = gr.Dropdown(list(PRESETS), value=DEFAULT_PRESET, label="Preset", elem_id="preset")
                with gr.Row():
                    with gr.Column():
                        settings_inputs["max_new_tokens"] = gr.Slider(1, 4096, step=1, value=defaults.max_new_tokens,
                                                                      label="max_new_tokens")
                        settings_inputs["temperature"] = gr.Slider(0.0, 5.0, step=0.01, value=defaults.temperature,
                                                                   label="temperature")
                        settings_inputs["top_p"] = gr.Slider(0.0, 1.0, step=0.01, value=defaults.top_p,
                                                             label="top_p")
                        settings_inputs["min_p"] = gr.Slider(0.0, 1.0, step=0.01, value=defaults.min_p,
                                                             label="min_p")
                        settings_inputs["top_k"] = gr.Slider(0, 200, step=1, value=defaults.top_k, label="top_k")
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
                            info="A GBNF grammar (llama.cpp's syntax) that every reply must follow; empty: none.")

            with gr.Tab("Character"):
                settings_inputs["name1"] = gr.Textbox(value=Character().user_name, label="Your name")
                settings_inputs["name2"] = gr.Textbox(value=Character().name, label="Character's name")
                settings_inputs["character_context"] = gr.Textbox(value=Character().context, lines=4,
                                                                  label="Context", info="Used in chat and "
                                                                                        "chat-instruct modes.")
                upload_character_button = gr.UploadButton(
                    "📂 Load a character (text-generation-webui YAML/JSON)", file_types=list(UPLOAD_SUFFIXES),
                    elem_id="upload-character")

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
                    upload_template_button = gr.UploadButton("📂 Load file", file_types=list(UPLOAD_SUFFIXES),
                                                             scale=0, min_width=80, elem_id="upload-template")
                template_status = gr.Markdown("", elem_id="template-status")
                settings_inputs["user_string"] = gr.Textbox(value=template.user, lines=2, label="User string")
                settings_inputs["bot_string"] = gr.Textbox(value=template.bot, lines=1, label="Bot string")
                settings_inputs["context_instruct"] = gr.Textbox(value=template.context, lines=4, label="Context")
                settings_inputs["turn_template"] = gr.Textbox(
                    value=template.turn_template, lines=1, label="Turn template",
                    info="Used to precisely define the placement of spaces and new line characters in instruction "
                         "prompts.")
                settings_inputs["system_message"] = gr.Textbox(
                    value=template.system_message, lines=3, label="System message",
                    info="Replaces <|system-message|> in the context.")
                settings_inputs["custom_system_message"] = gr.Textbox(
                    value="", lines=2, label="Custom system message",
                    info="If not empty, will be used instead of the default one.")
                settings_inputs["chat_instruct_command"] = gr.Textbox(
                    value=DEFAULT_CHAT_INSTRUCT_COMMAND, lines=4, label="Command for chat-instruct mode",
                    info="<|character|> gets replaced by the bot name, and <|prompt|> gets replaced by the regular "
                         "chat prompt.")

        with gr.Tab("Model", elem_id="model-tab"):
            with gr.Row():
                # a list, never a path field: a client must not probe the server's files through load errors.
                # Custom values pass Gradio's own check (which echoes them back, and into the log) to load_model,
                # which refuses anything not in the list with one message.
                model_path = gr.Dropdown(manager.model_files(), value=manager.current_file(), allow_custom_value=True,
                                         label="Model file (GGUF or GGML)", scale=4, elem_id="model-file",
                                         info=f"The model files in {manager.model_dir}." if manager.model_dir
                                         else "Loading models is off (no model directory).")
                refresh_models = gr.Button("🔄", scale=0, min_width=40, elem_id="refresh-models")
                model_n_ctx = gr.Number(value=manager.llama.n_ctx() if manager.llama else DEFAULT_N_CTX,
                                        precision=0, label="n_ctx (context size)", minimum=16)
                model_threads = gr.Number(value=manager.llama.n_threads if manager.llama else 0, precision=0,
                                          label="threads", minimum=0)
                model_gpu_layers = gr.Number(value=0, precision=0, label="n-gpu-layers", minimum=0,
                                             info="Accepted for compatibility: this engine runs on the CPU.")
            load_button = gr.Button("Load", variant="primary", elem_id="load-model")
            model_status = gr.Markdown("", elem_id="model-status")
            model_info = gr.Markdown(manager.describe(), elem_id="model-info")

        # ---- turning the page's values into prompt and sampler settings --------------------------------------
        def prompt_settings(values: dict) -> chat.PromptSettings:
            if values.get("template_name") == template_store.FROM_MODEL_FILE and manager.model_template is None:
                if manager.model_jinja is None:
                    raise ValueError("the model file has no chat template; pick an instruction template")
                chosen = manager.model_jinja
            else:
                chosen = TextgenTemplate(user=values["user_string"] or "", bot=values["bot_string"] or "",
                                         turn_template=values["turn_template"] or "",
                                         context=values["context_instruct"] or "",
                                         system_message=values["system_message"] or "")
            character = Character(name=values["name2"] or "AI", user_name=values["name1"] or "You",
                                  context=(values["character_context"] or "").strip() + "\n", greeting="")
            return chat.PromptSettings(template=chosen, mode=values["mode"],
                                       custom_system_message=values["custom_system_message"] or "",
                                       character=character,
                                       chat_instruct_command=values["chat_instruct_command"] or "<|prompt|>")

        def make_prompt(llama, values, generation, history_value, message, **kwargs):
            spec = prompt_settings(values)
            count = lambda text: len(chat.prompt_tokens(llama, text, generation))  # noqa: E731
            prompt = spec.build_prompt(history_value, message, max_prompt_tokens=chat.prompt_budget(llama, generation),
                                       count_tokens=count, **kwargs)
            return spec, prompt

        def reply_stream(llama, request, spec, prompt, generation):
            flag = manager.stop_flag(getattr(request, "session_hash", None))
            flag.clear()
            yield from chat.stream_reply(llama, prompt, generation, spec.stop_strings(
                generation.custom_stopping_strings), should_stop=flag.is_set)

        # ---- event handlers ------------------------------------------------------------------------------------
        def run_reply(kind: str, message: str, history_value, request: gr.Request, values: dict):
            _check_lengths(values, message)
            llama = manager.require()
            generation = GenerationSettings.from_values(values)
            history_value = chat.copy_history(history_value)
            message = message or ""
            if kind == "regenerate":
                if not history_value:
                    raise ValueError("there is no reply to regenerate")
                message = history_value.pop()[0]
            if kind == "continue" and not history_value:
                raise ValueError("there is no reply to continue")
            if kind == "generate" and not message.strip():
                yield chat.history_to_messages(history_value), history_value, message
                return
            spec, prompt = make_prompt(llama, values, generation, history_value, message,
                                       continue_=kind == "continue")
            if kind == "continue":
                base = history_value[-1][1]
            else:
                history_value.append([message, ""])
                base = ""
            yield chat.history_to_messages(history_value), history_value, ""
            for text in reply_stream(llama, request, spec, prompt, generation):
                history_value[-1][1] = base + text
                yield chat.history_to_messages(history_value), history_value, ""

        @_user_errors
        def generate(message, history, request: gr.Request, **values):
            yield from run_reply("generate", message, history, request, values)

        @_user_errors
        def regenerate(history, request: gr.Request, **values):
            yield from run_reply("regenerate", "", history, request, values)

        @_user_errors
        def continue_reply(history, request: gr.Request, **values):
            yield from run_reply("continue", "", history, request, values)

        @_user_errors
        def impersonate(message, history, request: gr.Request, **values):
            _check_lengths(values, message)
            llama = manager.require()
            generation = GenerationSettings.from_values(values)
            message = message or ""
            spec, prompt = make_prompt(llama, values, generation, history, message, impersonate=True)
            yield message
            for text in reply_stream(llama, request, spec, prompt, generation):
                yield message + text

        @_user_errors
        def show_prompt(message, history, **values):
            _check_lengths(values, message)
            llama = manager.require()
            generation = GenerationSettings.from_values(values)
            return make_prompt(llama, values, generation, history, message or "")[1]

        def stop(request: gr.Request):
            manager.stop_flag(getattr(request, "session_hash", None)).set()

        def remove_last(history):
            message, history = chat.remove_last(history)
            return message, chat.history_to_messages(history), history

        def replace_last(message, history):
            history = chat.replace_last_reply(history, message or "")
            return "", chat.history_to_messages(history), history

        def clear_history():
            return [], [], gr.update(visible=False), gr.update(visible=True), gr.update(visible=False)

        @_user_errors
        def select_template(name):
            if name == template_store.FROM_MODEL_FILE and manager.model_template is None:
                note = ("The model file's Jinja chat template is used as is (instruct mode); the fields below "
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

        def _uploaded(file) -> str:
            path = file if isinstance(file, str) else getattr(file, "name", None) or getattr(file, "path", "")
            if not str(path).lower().endswith(UPLOAD_SUFFIXES):
                raise ValueError("only " + ", ".join(UPLOAD_SUFFIXES) + " files can be loaded")
            if os.path.getsize(path) > MAX_UPLOAD_BYTES:
                raise ValueError(f"the file is over {MAX_UPLOAD_BYTES:,} bytes")
            return str(path)

        @_user_errors
        def upload_template(file):
            loaded = TextgenTemplate.load(_uploaded(file))
            _check_lengths(dict(zip(TEMPLATE_FIELDS, (loaded.user, loaded.bot, loaded.context,
                                                      loaded.turn_template, loaded.system_message))))
            return (loaded.user, loaded.bot, loaded.context, loaded.turn_template, loaded.system_message,
                    "Loaded the file's fields: save them under a name to keep them.")

        @_user_errors
        def upload_character(file):
            loaded = Character.load(_uploaded(file))
            _check_lengths({"name2": loaded.name, "character_context": loaded.context})
            return loaded.name, loaded.context

        @_user_errors
        def delete_template(name):
            path = template_store.delete_template(name)
            fallback, _ = _initial_template(manager)
            return gr.update(choices=template_store.template_choices(), value=fallback), f"Deleted `{path.name}`."

        def apply_preset(name):
            values = preset_values(name)
            return tuple(values[f] for f in PRESET_FIELDS)

        def load_model(name, n_ctx_value, threads, gpu_layers):
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
        reply_outputs = [chatbot, history, textbox]
        generate_button.click(generate, inputs_kwargs={"message": textbox, "history": history, **settings_inputs},
                              outputs=reply_outputs, api_name="generate", **generation_event)
        textbox.submit(generate, inputs_kwargs={"message": textbox, "history": history, **settings_inputs},
                       outputs=reply_outputs, api_visibility="private", **generation_event)
        regenerate_button.click(regenerate, inputs_kwargs={"history": history, **settings_inputs},
                                outputs=reply_outputs, api_name="regenerate", **generation_event)
        continue_button.click(continue_reply, inputs_kwargs={"history": history, **settings_inputs},
                              outputs=reply_outputs, api_name="continue", **generation_event)
        impersonate_button.click(impersonate, inputs_kwargs={"message": textbox, "history": history,
                                                             **settings_inputs},
                                 outputs=[textbox], api_name="impersonate", **generation_event)
        stop_button.click(stop, None, None, queue=False, api_name="stop")
        show_prompt_button.click(show_prompt, inputs_kwargs={"message": textbox, "history": history,
                                                             **settings_inputs},
                                 outputs=[prompt_view], api_name="show_prompt")
        remove_button.click(remove_last, [history], [textbox, chatbot, history], api_name="remove_last")
        copy_button.click(chat.last_reply, [history], [textbox], api_name="copy_last_reply")
        replace_button.click(replace_last, [textbox, history], [textbox, chatbot, history],
                             api_name="replace_last_reply")
        clear_arr = [clear_confirm, clear_button, clear_cancel]
        clear_button.click(lambda: (gr.update(visible=True), gr.update(visible=False), gr.update(visible=True)),
                           None, clear_arr, api_visibility="private")
        clear_cancel.click(lambda: (gr.update(visible=False), gr.update(visible=True), gr.update(visible=False)),
                           None, clear_arr, api_visibility="private")
        # the Chatbot's own trash icon empties the session's history too, so the page never shows less than is sent
        chatbot.clear(lambda: [], None, [history], api_visibility="private")
        clear_confirm.click(clear_history, None, [chatbot, history] + clear_arr, api_name="clear_history")
        template_fields = [settings_inputs[name] for name in TEMPLATE_FIELDS]
        template_menu.change(select_template, [template_menu], template_fields + [template_status],
                             api_name="select_template")
        save_template_button.click(save_template, [save_name] + template_fields + [save_overwrite],
                                   [template_menu, template_status], api_name="save_template")
        upload_template_button.upload(upload_template, [upload_template_button], template_fields + [template_status],
                                      api_name="upload_template")
        upload_character_button.upload(upload_character, [upload_character_button],
                                       [settings_inputs["name2"], settings_inputs["character_context"]],
                                       api_name="upload_character")
        refresh_models.click(lambda: gr.update(choices=manager.model_files()), None, [model_path],
                             api_name="list_models")
        delete_template_button.click(delete_template, [template_menu], [template_menu, template_status],
                                     api_name="delete_template")
        preset.change(apply_preset, [preset], [settings_inputs[f] for f in PRESET_FIELDS], api_name="preset")
        load_button.click(load_model, [model_path, model_n_ctx, model_threads, model_gpu_layers],
                          [model_status, model_info, template_menu], api_name="load_model",
                          concurrency_limit=1, concurrency_id=GENERATION_QUEUE)
    demo.queue(default_concurrency_limit=4)
    demo.model_manager = manager   # for embedding code and tests
    return demo


def launch(model=None, *, port: int = 7860, listen: bool = False, share: bool = False, n_ctx: int = DEFAULT_N_CTX,
           n_threads=None, n_gpu_layers: int = 0, auth=None, model_dir=None, **launch_kwargs) -> gr.Blocks:
    """Build and serve the app: 127.0.0.1 unless ``listen`` (0.0.0.0); a public link only with ``share``.

    ``auth``: "user:password", a (user, password) pair or a list of them. With ``listen`` or ``share`` a login is
    always required: without ``auth`` one is made up and printed. Uploads are limited to template and character
    files of at most MAX_UPLOAD_BYTES."""
    from starlette.middleware import Middleware
    logins, generated = resolve_auth(auth, listen, share)
    demo = build_app(model, n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers, model_dir=model_dir)
    if generated is not None:
        print(f"ggml_webui: served beyond this machine, so a login is required: user {logins[0][0]!r}, password "
              f"{generated!r} (choose your own with --auth USER:PASSWORD)", file=sys.stderr, flush=True)
    app_kwargs = dict(launch_kwargs.pop("app_kwargs", None) or {})
    app_kwargs["middleware"] = [*app_kwargs.get("middleware", []), Middleware(UploadGuard)]
    launch_kwargs.setdefault("max_file_size", MAX_UPLOAD_BYTES)
    demo.launch(server_name="0.0.0.0" if listen else "127.0.0.1", server_port=port, share=share, auth=logins,
                app_kwargs=app_kwargs, **launch_kwargs)
    return demo
