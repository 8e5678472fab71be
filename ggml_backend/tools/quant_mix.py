"""Which type each tensor gets when a model is quantized to a llama.cpp file type (``Q4_K_M``, ``Q3_K_S``, ...).

A port of llama.cpp's ``llama_tensor_get_type`` (src/llama-quant.cpp, the version llama-cpp-python 0.3.36
bundles), for the file types this engine can write; the tests check every choice against llama.cpp's own
quantizer on two synthetic models. The rules, in words:

* Only tensors whose name ends in ``weight``, with at least 2 dimensions, are quantized; norms, biases, expert
  routers and a few small per-architecture tensors keep their type (``allows_quantization``).
* ``output.weight`` (and ``token_embd.weight`` when the model has no ``output.weight``, i.e. ties its embeddings)
  gets q6_K, or q8_0 when the file type is q8_0, when its rows are not whole 256-blocks or the model is Falcon.
* The _S/_M/_L mixes spend bits where quantization hurts most: ``attn_v`` (and fused ``attn_qkv``) and
  ``ffn_down``, by layer index (``use_more_bits``: the first and last eighth and every third layer between), and
  ``attn_output`` for the small types. Models with grouped-query attention (n_head / n_head_kv >= 4) give q2_K's
  ``attn_v`` q4_K; 8-expert models and LLaMA-70B get more bits still.
* A type whose block does not divide a tensor's row length falls back to a 32-block type (q2_K/q3_K -> q4_0,
  q4_K -> q5_0, q5_K -> q5_1, q6_K -> q8_0), or to f16 when even 32 does not divide it.

Tensors are visited in llama.cpp's order (``llama_order``: global tensors by name, then layer by layer, each
layer's tensors by name), which matters because the mixes count ``attn_v`` tensors as they go.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..quant.types import QuantType, get_type


@dataclass(frozen=True)
class FileType:
    """One of llama.cpp's LLAMA_FTYPE values: the id stored as ``general.file_type`` and the base tensor type."""
    name: str          # llama-quantize's spelling, e.g. "Q4_K_M"
    ftype: int         # LLAMA_FTYPE_* (also the GGML-era hparams ftype)
    base_type: str     # llama_ftype_get_default_type: the type of every tensor the mix does not single out

    @property
    def quantized(self) -> bool:
        return self.base_type not in ("f32", "f16", "bf16")


FILE_TYPES: dict[str, FileType] = {ft.name: ft for ft in (
    FileType("F32", 0, "f32"), FileType("F16", 1, "f16"), FileType("BF16", 32, "bf16"),
    FileType("Q4_0", 2, "q4_0"), FileType("Q4_1", 3, "q4_1"), FileType("Q5_0", 8, "q5_0"),
    FileType("Q5_1", 9, "q5_1"), FileType("Q8_0", 7, "q8_0"),
    FileType("Q2_K", 10, "q2_K"), FileType("Q3_K_S", 11, "q3_K"), FileType("Q3_K_M", 12, "q3_K"),
    FileType("Q3_K_L", 13, "q3_K"), FileType("Q4_K_S", 14, "q4_K"), FileType("Q4_K_M", 15, "q4_K"),
    FileType("Q5_K_S", 16, "q5_K"), FileType("Q5_K_M", 17, "q5_K"), FileType("Q6_K", 18, "q6_K"),
)}
FILE_TYPES_BY_ID = {ft.ftype: ft for ft in FILE_TYPES.values()}
# llama-quantize's aliases: a K type without a size letter means its _M mix
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}
# llama.cpp file types this engine cannot write, and why (named in the error instead of "unknown")
UNSUPPORTED = {
    "Q2_K_S": "needs an importance matrix", "IQ2_XXS": "an IQ type", "IQ2_XS": "an IQ type",
    "IQ2_S": "an IQ type", "IQ2_M": "an IQ type", "IQ1_S": "an IQ type", "IQ1_M": "an IQ type",
    "IQ3_XXS": "an IQ type", "IQ3_XS": "an IQ type", "IQ3_S": "an IQ type", "IQ3_M": "an IQ type",
    "IQ4_NL": "an IQ type", "IQ4_XS": "an IQ type", "TQ1_0": "a ternary type", "TQ2_0": "a ternary type",
    "MXFP4_MOE": "an FP4 type", "NVFP4": "an FP4 type", "Q1_0": "not a type this engine has",
    "Q2_0": "not a type this engine has", "COPY": "copies tensors unchanged, which needs no quantizer",
}
_UNSUPPORTED_IDS = {21: "Q2_K_S", 19: "IQ2_XXS", 20: "IQ2_XS", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S",
                    25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M",
                    36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4_MOE", 39: "NVFP4", 40: "Q1_0", 41: "Q2_0"}


def parse_file_type(spec) -> FileType:
    """A file type from llama-quantize's spellings: a name (any case, ``q4_k_m``), an alias (``Q4_K``) or the
    numeric LLAMA_FTYPE id (``15`` or ``"15"``)."""
    if isinstance(spec, FileType):
        return spec
    if isinstance(spec, bool) or not isinstance(spec, (str, int)):
        raise TypeError(f"file type must be a name such as 'Q4_K_M' or an LLAMA_FTYPE id, not {spec!r}")
    text = str(spec).strip()
    if text.isdigit():
        ftype = int(text)
        if ftype in FILE_TYPES_BY_ID:
            return FILE_TYPES_BY_ID[ftype]
        if ftype in _UNSUPPORTED_IDS:
            text = _UNSUPPORTED_IDS[ftype]
        else:
            raise ValueError(f"unknown file type id {ftype}; known: {_known()}")
    name = ALIASES.get(text.upper(), text.upper())
    if name in FILE_TYPES:
        return FILE_TYPES[name]
    if name in UNSUPPORTED:
        raise ValueError(f"file type {name} is not supported ({UNSUPPORTED[name]}); supported: {_known()}")
    raise ValueError(f"unknown file type {text!r}; supported: {_known()}")


def _known() -> str:
    return ", ".join(FILE_TYPES) + " (aliases Q3_K, Q4_K, Q5_K; or the LLAMA_FTYPE id)"


# ------------------------------------------------------------------------------------------------ tensor roles

# tensor_get_category: broad roles by name, checked in this order (output and token_embd by exact name)
_ROLE_SUBSTRINGS = (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"), ("attn_v.weight", "attn_v"),
                    ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"),
                    ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"),
                    ("ffn_down", "ffn_down"))
_ATTN_V_LIKE = ("attn_v", "attn_qkv", "attn_kv_b")


def tensor_role(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for needle, role in _ROLE_SUBSTRINGS:
        if needle in name:
            return role
    return "other"


# Substrings of weights that are never quantized: expert routers, tiny per-architecture matrices (Gemma 3n's
# altup/laurel, Mamba's conv1d, RWKV's time-mix vectors, T5's relative bias, vision/audio towers' position tables).
_NEVER_QUANTIZED = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj",
    "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight",
    "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight", "time_mix_a1.weight",
    "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight", "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight", "attn_rel_b.weight", ".position_embd",
    "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook",
    "mm.a.code_embd",
)


def ggml_n_dims(shape) -> int:
    """ggml_n_dims: dimensions up to the last one longer than 1 (a [1, n] matrix counts as 1-D)."""
    dims = tuple(reversed(tuple(shape)))   # ggml order
    for i in range(len(dims) - 1, 0, -1):
        if dims[i] > 1:
            return i + 1
    return 1


def allows_quantization(name: str, shape, *, quantize_output_tensor: bool = True) -> bool:
    """tensor_allows_quantization: weights of 2 or more dimensions, except norms and the tensors listed above."""
    if ggml_n_dims(shape) < 2 or not name.endswith("weight"):
        return False
    if name == "output.weight" and not quantize_output_tensor:
        return False
    if name in ("position_embd.weight", "token_types.weight"):   # BERT's positional and token-type embeddings
        return False
    return not any(part in name for part in _NEVER_QUANTIZED)


_LAYER = re.compile(r"blk\.(\d+)\.")


def layer_of(name: str) -> int:
    match = _LAYER.match(name)
    return int(match.group(1)) if match else -1


def llama_order(names) -> list:
    """llama.cpp's tensor order (llama_model_loader's weights_map): tensors outside layers first, then layer by
    layer in numeric order (blk.10 after blk.9), by name within each group."""
    return sorted(names, key=lambda name: (layer_of(name), name))


# ------------------------------------------------------------------------------------------------- the mixes

@dataclass
class ModelFacts:
    """What the rules ask of the model (llama_model's hparams and type)."""
    architecture: str
    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int = 0

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_llama_70b(self) -> bool:   # llama.cpp's LLM_TYPE_70B: an 80-layer LLaMA with grouped-query attention
        return self.architecture == "llama" and self.n_layer == 80 and self.n_head != self.n_head_kv

    @classmethod
    def from_metadata(cls, metadata: dict) -> "ModelFacts":
        arch = str(metadata.get("general.architecture", ""))

        def first(key, default=0):
            value = metadata.get(f"{arch}.{key}", default)
            if hasattr(value, "__len__") and not isinstance(value, str):   # per-layer arrays: layer 0's value
                value = value[0] if len(value) else default
            return int(value)
        n_head = first("attention.head_count")
        return cls(architecture=arch, n_layer=first("block_count"), n_head=n_head,
                   n_head_kv=first("attention.head_count_kv", n_head), n_expert=first("expert_count"))


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """The layers the _M mixes favour: the first and last eighth, and every third layer in between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


class _Counters:
    """The running counts the mixes keep while visiting tensors in order (quantize_state_impl)."""

    def __init__(self, names, n_layer: int):
        roles = [tensor_role(n) for n in names]
        self.n_attention_wv = sum(r in _ATTN_V_LIKE for r in roles)
        self.i_attention_wv = 0
        self.n_layer = n_layer
        self.i_ffn_down = 0
        self.tied_embeddings = "output" not in roles


def _mix_type(name: str, role: str, new_type: str, row_length: int, ftype: str, model: ModelFacts,
              c: _Counters, output_tensor_type: str | None) -> str:
    """llama_tensor_get_type_impl for the K and legacy file types: the type the mix ``ftype`` gives this tensor."""
    falcon = model.architecture == "falcon"

    def layer_index(counter: int) -> int:
        if model.n_expert > 1:   # Mixtral's experts are not in layer order: read the layer from the name
            i_layer = layer_of(name)
            if not 0 <= i_layer < c.n_layer:
                raise ValueError(f"tensor {name!r}: cannot tell its layer (expected blk.N. with N < {c.n_layer})")
            return i_layer
        return counter

    if role == "output" or (c.tied_embeddings and role == "token_embd"):
        if output_tensor_type is not None:
            return output_tensor_type
        if falcon or row_length % get_type(new_type).block_size:
            return "q8_0"
        return new_type if new_type == "q8_0" else "q6_K"
    if role == "token_embd":
        return new_type
    if role in _ATTN_V_LIKE:
        # (llama.cpp has a separate attn_qkv branch after this one; attn_qkv is attn_v-like, so it never runs)
        i, n = c.i_attention_wv, c.n_attention_wv
        if ftype == "Q2_K":
            new_type = "q4_K" if model.n_gqa >= 4 else "q3_K"
        elif ftype == "Q3_K_M":
            new_type = "q5_K" if i < 2 else "q4_K"
        elif ftype == "Q3_K_L":
            new_type = "q5_K"
        elif ftype in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
            new_type = "q6_K"
        elif ftype == "Q4_K_S" and i < 4:
            new_type = "q5_K"
        if model.is_llama_70b and new_type in ("q3_K", "q4_K"):
            new_type = "q5_K"   # 8 heads share each attn_v: more bits there cost little
        if model.n_expert == 8:
            new_type = "q8_0"
        c.i_attention_wv += 1
        return new_type
    if role == "attn_k":
        return "q8_0" if model.n_expert == 8 else new_type
    if role == "ffn_down":
        i, n = layer_index(c.i_ffn_down), c.n_layer
        c.i_ffn_down += 1
        if ftype == "Q2_K":
            return "q3_K"
        if ftype == "Q3_K_M":
            return "q5_K" if i < n // 16 else "q4_K" if not falcon or use_more_bits(i, n) else "q3_K"
        if ftype == "Q3_K_L":
            return "q4_K" if falcon else "q5_K"
        if ftype == "Q4_K_M":
            if falcon:
                return "q6_K" if i < n // 16 else "q5_K" if use_more_bits(i, n) else "q4_K"
            return "q6_K" if use_more_bits(i, n) else new_type
        if ftype == "Q5_K_M" and use_more_bits(i, n):
            return "q6_K"
        if ftype == "Q4_K_S" and not falcon and i < n // 8:
            return "q5_K"
        return new_type
    if role == "attn_output":
        if falcon:
            return "q4_K" if ftype == "Q3_K_L" else new_type
        if model.n_expert == 8:
            return "q5_K" if ftype in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M") else new_type
        return {"Q2_K": "q3_K", "Q3_K_M": "q4_K", "Q3_K_L": "q5_K"}.get(ftype, new_type)
    return new_type   # attn_q, ffn_gate, ffn_up, other: the base type for every file type supported here


# tensor_type_fallback: where a 256-block type goes when a tensor's rows are not whole blocks
_FALLBACK = {"q2_K": "q4_0", "q3_K": "q4_0", "q4_K": "q5_0", "q5_K": "q5_1", "q6_K": "q8_0"}


def fallback_type(name: str, type_name: str, row_length: int) -> str:
    """The type ``name`` gets when ``type_name``'s block does not divide its rows: a 32-block type for the K
    types, else f16. (llama.cpp of llama-cpp-python 0.3.36 gives f16 to legacy types too, as checked by the tests;
    later llama.cpp refuses a legacy type that does not fit.)"""
    if row_length % get_type(type_name).block_size == 0:
        return type_name
    new = _FALLBACK.get(type_name, type_name)
    return new if row_length % get_type(new).block_size == 0 else "f16"


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple             # numpy order
    source_type: QuantType
    target_type: QuantType

    @property
    def converted(self) -> bool:
        return self.source_type is not self.target_type


def plan_tensor_types(tensors, file_type, metadata: dict, *, pure: bool = False,
                      leave_output_tensor: bool = False, output_tensor_type=None,
                      token_embedding_type=None) -> list[TensorPlan]:
    """The target type of every tensor, in llama.cpp's output order.

    ``tensors``: (name, shape, type) triples (numpy shapes, row length last) or objects with those attributes;
    ``metadata``: the GGUF keys (architecture, layer and head counts). ``pure``: every quantizable tensor gets the
    base type (still with the row-length fallbacks); ``leave_output_tensor``: output.weight keeps its type;
    ``output_tensor_type`` / ``token_embedding_type``: types for those two tensors (llama-quantize's options)."""
    ft = parse_file_type(file_type)
    rows = {}
    for t in tensors:
        name, shape, type_ = (t.name, t.shape, t.type) if hasattr(t, "name") else t
        rows[name] = (tuple(int(d) for d in shape), get_type(type_))
    names = llama_order(rows)
    model = ModelFacts.from_metadata(metadata)
    counters = _Counters(names, model.n_layer)
    out_type = get_type(output_tensor_type).name if output_tensor_type is not None else None
    embd_type = get_type(token_embedding_type).name if token_embedding_type is not None else None
    plan = []
    for name in names:
        shape, source = rows[name]
        target = source.name
        if allows_quantization(name, shape, quantize_output_tensor=not leave_output_tensor):
            role = tensor_role(name)
            if embd_type is not None and role == "token_embd":
                target = embd_type
            elif out_type is not None and role == "output":
                target = out_type
            else:
                target = ft.base_type
                if ft.quantized:
                    if not pure:
                        target = _mix_type(name, role, target, shape[-1], ft.name, model, counters, out_type)
                    target = fallback_type(name, target, shape[-1])
        plan.append(TensorPlan(name, shape, source, get_type(target)))
    return plan
