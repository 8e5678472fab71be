"""Instruction templates for the UI: the built-in text-generation-webui ones, the user's saved YAML files, and one
written from the model file's own chat template.

Saved templates live in ``$GGML_BACKEND_TEMPLATES_DIR`` or ``~/.config/ggml_backend/instruction-templates/``, one
``<name>.yaml`` each, in text-generation-webui's format (``TextgenTemplate.to_yaml``), so the two can share files.
"""
from __future__ import annotations

import os
import re
import unicodedata
from pathlib import Path

from ggml_backend.templates import TEXTGEN_TEMPLATE_FIELDS, JinjaTemplate, TemplateError, TextgenTemplate

FROM_MODEL_FILE = "(from the model file)"
ENV_VAR = "GGML_BACKEND_TEMPLATES_DIR"
_SAFE_NAME = re.compile(r"^[\w][\w .+-]{0,63}$")


def templates_dir() -> Path:
    return Path(os.environ.get(ENV_VAR) or Path.home() / ".config" / "ggml_backend" / "instruction-templates")


def saved_template_names() -> list[str]:
    folder = templates_dir()
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.iterdir() if p.suffix.lower() in (".yaml", ".yml") and p.is_file())


def template_choices() -> list[str]:
    """Dropdown entries: the model file's template first, then the built-ins, then saved ones not shadowing them."""
    builtin = list(TEXTGEN_TEMPLATE_FIELDS)
    return [FROM_MODEL_FILE] + builtin + [n for n in saved_template_names() if n not in builtin]


def normalise_name(name: str) -> str:
    """A template name as stored: Unicode NFC, surrounding whitespace stripped, inner runs of whitespace one
    space. Names that differ only in whitespace are one name (and one file), never two that overwrite each other
    unseen. Path separators, control characters and leading dots are refused."""
    name = " ".join(unicodedata.normalize("NFC", str(name or "")).split())
    if not _SAFE_NAME.match(name) or name.startswith("."):
        from .security import short
        raise ValueError("template names are letters, digits, spaces and . + - _ (1 to 64 characters, no path "
                         f"separators), got {short(repr(name), 80)}")
    return name



def _saved_path(name: str) -> Path | None:
    """The saved file for ``name``, matched case-insensitively (as Windows and macOS file systems would)."""
    folder = templates_dir()
    if not folder.is_dir():
        return None
    wanted = name.casefold()
    for path in folder.iterdir():
        if path.suffix.lower() in (".yaml", ".yml") and path.is_file() and \
                normalise_stem(path.stem).casefold() == wanted:
            return path
    return None


def normalise_stem(stem: str) -> str:
    return " ".join(unicodedata.normalize("NFC", stem).split())


def save_template(name: str, template: TextgenTemplate, overwrite: bool = False) -> Path:
    """Write ``<name>.yaml`` in the user templates directory (creating it); returns the path. A saved template
    of the same (normalised, case-insensitive) name is replaced only with ``overwrite``."""
    name = normalise_name(name)
    if name == FROM_MODEL_FILE or name.casefold() in {n.casefold() for n in TEXTGEN_TEMPLATE_FIELDS}:
        raise ValueError(f"{name!r} is a built-in template; save under another name")
    existing = _saved_path(name)
    if existing is not None and not overwrite:
        raise ValueError(f"a template named {existing.stem!r} exists already: tick Overwrite to replace it, or "
                         "save under another name")
    folder = templates_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = existing if existing is not None else folder / f"{name}.yaml"
    template.save(path)
    return path


def delete_template(name: str) -> Path:
    name = normalise_name(name)
    path = _saved_path(name)
    if path is None:
        raise ValueError(f"no saved template named {name!r} (built-ins cannot be deleted)")
    path.unlink()
    return path


def load_named_template(name: str, model_template: TextgenTemplate | None = None) -> TextgenTemplate:
    """A dropdown entry as a TextgenTemplate (``model_template`` answers for FROM_MODEL_FILE)."""
    if name == FROM_MODEL_FILE:
        if model_template is None:
            raise ValueError("the model file's chat template cannot be written as a text-generation-webui template")
        return model_template
    if name in TEXTGEN_TEMPLATE_FIELDS:
        return TextgenTemplate(**TEXTGEN_TEMPLATE_FIELDS[name], name=name)
    path = _saved_path(normalise_name(name))
    if path is None:
        raise ValueError(f"no template named {name!r}")
    return TextgenTemplate.load(path)


# ---- the model file's Jinja template as textgen fields -------------------------------------------------------------

_SYS, _U1, _B1, _U2 = "\x01SYSTEM\x01", "\x01USER1\x01", "\x01BOT1\x01", "\x01USER2\x01"


def _split_turn_gap(gap: str) -> tuple[str, str]:
    """(end of a bot turn, start of a user turn) from the text between a reply and the next user message: cut after
    the first newline (``<|im_end|>\\n`` | ``<|im_start|>user\\n``), else keep it all as the user turn's start."""
    cut = gap.find("\n")
    return (gap[:cut + 1], gap[cut + 1:]) if 0 <= cut < len(gap) - 1 else ("", gap)


def _strip_parts(text: str) -> tuple[str, str, str]:
    core = text.strip()
    lead = text[:len(text) - len(text.lstrip())]
    return lead, core, text[len(lead) + len(core):]


def textgen_from_jinja(jinja: JinjaTemplate) -> TextgenTemplate | None:
    """The model's chat template written as textgen fields, or None when that is impossible.

    The Jinja template renders a probe conversation of marker strings; the text around the markers gives context,
    user and bot turn pieces. The result is kept only if it renders probe conversations exactly as the Jinja
    template does (with and without a system message, one and two turns).
    """
    try:
        full = jinja.render([{"role": "system", "content": _SYS}, {"role": "user", "content": _U1},
                             {"role": "assistant", "content": _B1}, {"role": "user", "content": _U2}],
                            add_generation_prompt=True)
        without_prompt = jinja.render([{"role": "user", "content": _U2}], add_generation_prompt=False)
        no_system = jinja.render([{"role": "user", "content": _U1}], add_generation_prompt=True)
    except TemplateError:
        return None
    positions = [full.find(m) for m in (_SYS, _U1, _B1, _U2)]
    if min(positions) < 0 or positions != sorted(positions):
        return None
    p_sys, p_u1, p_b1, p_u2 = positions
    bot_end, user_start = _split_turn_gap(full[p_b1 + len(_B1):p_u2])
    sys_to_user = full[p_sys + len(_SYS):p_u1]
    if not sys_to_user.endswith(user_start):
        return None
    context = full[:p_sys] + "<|system-message|>" + sys_to_user[:len(sys_to_user) - len(user_start)]
    # The user turn's end is what follows the last user message without a generation prompt; the bot turn's
    # start is what the generation prompt adds after it.
    if _U2 not in without_prompt:
        return None
    user_end = without_prompt[without_prompt.find(_U2) + len(_U2):]
    after_user = full[p_u2 + len(_U2):]
    if not after_user.startswith(user_end):
        return None
    generation_prompt = after_user[len(user_end):]
    # textgen strips the user and bot strings, so their outer whitespace goes into the turn template
    user_lead, user_name, user_trail = _strip_parts(user_start)
    bot_lead, bot_name, bot_trail = _strip_parts(generation_prompt)
    turn = (user_lead + "<|user|>" + user_trail + "<|user-message|>" + user_end + bot_lead + "<|bot|>" + bot_trail
            + "<|bot-message|>" + bot_end).replace("\n", r"\n")
    # The default system message: what the template writes in its place when none is given.
    pre, post = context.split("<|system-message|>")
    head = no_system[:no_system.find(_U1) - len(user_start)] if _U1 in no_system else ""
    system_message = head[len(pre):len(head) - len(post)] if head.startswith(pre) and head.endswith(post) \
        and len(head) >= len(pre) + len(post) else ""
    try:
        candidate = TextgenTemplate(user=user_name, bot=bot_name, turn_template=turn, context=context,
                                    system_message=system_message, name=FROM_MODEL_FILE)
    except TemplateError:
        return None
    probes = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}],
    ]
    try:
        if any(candidate.render(p) != jinja.render(p, add_generation_prompt=True) for p in probes):
            return None
    except TemplateError:
        return None
    return candidate
