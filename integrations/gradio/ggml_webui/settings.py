"""Generation parameters as text-generation-webui's Parameters tab names them, its presets, and their mapping onto
``Llama.generate_tokens``'s sampler settings."""
from __future__ import annotations

import ast
import math
from dataclasses import dataclass, fields

# text-generation-webui's presets/*.yaml; a field a preset leaves out keeps the sampler's neutral value.
NEUTRAL = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}
PRESETS: dict[str, dict[str, float]] = {
    "simple-1": {"temperature": 0.7, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.15},
    "Divine Intellect": {"temperature": 1.31, "top_p": 0.14, "top_k": 49, "repetition_penalty": 1.17},
    # textgen's "do_sample: false": greedy decoding, the same prompt always gives the same reply.
    "Debug-deterministic": {"temperature": 0.0, "top_p": 1.0, "top_k": 1, "repetition_penalty": 1.0},
}
DEFAULT_PRESET = "simple-1"
PRESET_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def preset_values(name: str) -> dict[str, float]:
    """The five sampler values of a preset (neutral where the preset is silent)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return {**NEUTRAL, **PRESETS[name]}


def parse_stop_strings(text: str) -> list[str]:
    """text-generation-webui's "Custom stopping strings" box: quoted strings separated by commas, with escapes
    (``"\\n", "\\nYou:"``). Unquoted text is taken as one stop string."""
    text = (text or "").strip()
    if not text:
        return []
    try:
        value = ast.literal_eval(f"[{text}]")
    except (ValueError, SyntaxError):
        return [text]
    if not all(isinstance(item, str) for item in value):
        raise ValueError(f"custom stopping strings must be quoted strings separated by commas, got {text!r}")
    return [item for item in value if item]


@dataclass(frozen=True)
class GenerationSettings:
    """The values of the Parameters tab (textgen's names)."""
    max_new_tokens: int = 200
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 20
    min_p: float = 0.0
    repetition_penalty: float = 1.15
    repetition_penalty_range: int = 1024
    seed: int = -1
    custom_stopping_strings: str = ""
    truncation_length: int = 0          # 0: the model's context size
    add_bos_token: bool = True
    ban_eos_token: bool = False
    skip_special_tokens: bool = True
    grammar_string: str = ""            # a GBNF grammar the reply must follow (textgen's "Grammar" box)

    @classmethod
    def from_values(cls, values: dict) -> "GenerationSettings":
        """From UI values (sliders give floats, numbers may be None); unknown keys are ignored."""
        known = {f.name: f for f in fields(cls)}
        kwargs = {}
        for name, value in values.items():
            if name not in known or value is None:
                continue
            kind = known[name].type
            if kind == "int":
                if isinstance(value, float) and not math.isfinite(value):
                    raise ValueError(f"{name} must be a whole number, got {value}")
                value = int(value)
            elif kind == "float":
                value = float(value)
            elif kind == "bool":
                value = bool(value)
            else:
                value = str(value)
            kwargs[name] = value
        return cls(**kwargs)

    def sampling_params(self, eog_ids):
        """The engine's SamplingParams; ban_eos_token sets the end-of-generation tokens' bias to -inf."""
        from ggml_backend.generation import SamplingParams
        logit_bias = {int(t): -math.inf for t in eog_ids} if self.ban_eos_token else {}
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                              repeat_penalty=self.repetition_penalty, repeat_last_n=self.repetition_penalty_range,
                              logit_bias=logit_bias, seed=self.seed)   # SamplingParams: -1 = random
