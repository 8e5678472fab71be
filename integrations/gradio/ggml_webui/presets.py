"""Generation presets as text-generation-webui keeps them: ``presets/<name>.yaml``, a mapping of sampler values
(``temperature: 0.7``, ``top_p: 0.9``...). The built-in ones (settings.PRESETS) are listed first; files in the
user data folder's ``presets/`` after them (a file of a built-in's name is that preset's new values).

Reading keeps the sampler values this engine has (settings.PRESET_FIELDS) and names the others it leaves out
(``typical_p``, ``mirostat_mode``...); textgen's ``do_sample: false`` is greedy decoding. Values must be finite
numbers within the Parameters tab's ranges. Files are bounded to MAX_PRESET_BYTES.
"""
from __future__ import annotations

import math
from pathlib import Path

import yaml

from .settings import NEUTRAL, PRESET_FIELDS, PRESETS
from .user_data import atomic_write, inside, read_bounded, safe_name

MAX_PRESET_BYTES = 64 * 1024
#: the range of each value (the Parameters tab's sliders)
RANGES = {"temperature": (0.0, 5.0), "top_p": (0.0, 1.0), "top_k": (0, 200), "min_p": (0.0, 1.0),
          "repetition_penalty": (1.0, 1.5)}


def preset_folder(user_data) -> Path:
    return Path(user_data) / "presets"


def preset_choices(folder) -> list[str]:
    folder = Path(folder)
    saved = sorted((p.stem for p in folder.glob("*.yaml") if p.is_file() and not p.name.startswith(".")),
                   key=str.casefold) if folder.is_dir() else []
    return list(PRESETS) + [n for n in saved if n not in PRESETS]


def values_from_mapping(data, where: str) -> tuple[dict[str, float], list[str]]:
    """(the five sampler values, neutral where the preset is silent; the keys left out)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping of sampler values, got {type(data).__name__}")
    values = dict(NEUTRAL)
    ignored = []
    for key, value in data.items():
        key = str(key)
        if key == "do_sample":
            if value is False:
                values.update(temperature=0.0, top_k=1)
            continue
        if key not in PRESET_FIELDS:
            ignored.append(key)
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{where}: {key} must be a number, got {str(value)[:40]!r}")
        low, high = RANGES[key]
        if not low <= value <= high:
            raise ValueError(f"{where}: {key} must be in {low}..{high}, got {value}")
        values[key] = int(value) if key == "top_k" else float(value)
    return values, ignored


def load_preset(folder, name: str) -> tuple[dict[str, float], list[str]]:
    """A preset's values: a saved file of that name, else the built-in one."""
    folder = Path(folder)
    stem = safe_name(name, "preset name")
    path = inside(folder, folder / f"{stem}.yaml")
    if path.is_file():
        text = read_bounded(path, MAX_PRESET_BYTES, f"preset file {path.name}")
        try:
            data = yaml.safe_load(text.decode("utf-8"))
        except UnicodeDecodeError:
            raise ValueError(f"{path.name} is not UTF-8 text") from None
        except yaml.YAMLError as exc:
            raise ValueError(f"{path.name} is not valid YAML: {str(exc)[:300]}") from None
        return values_from_mapping(data, path.name)
    if name in PRESETS:
        return {**NEUTRAL, **PRESETS[name]}, []
    raise ValueError(f"no preset named {name!r}")


def save_preset(folder, name: str, values: dict, overwrite: bool = False) -> Path:
    """Write the sampler values as ``presets/<name>.yaml`` (textgen's format); an existing file is replaced only
    with ``overwrite``."""
    folder = Path(folder)
    stem = safe_name(name, "preset name")
    path = inside(folder, folder / f"{stem}.yaml")
    if path.exists() and not overwrite:
        raise ValueError(f"a preset named {stem!r} exists already: tick Overwrite to replace it")
    checked, _ = values_from_mapping({k: values[k] for k in PRESET_FIELDS if values.get(k) is not None},
                                     "the preset")
    atomic_write(path, yaml.safe_dump(checked, sort_keys=False).encode("utf-8"))
    return path
