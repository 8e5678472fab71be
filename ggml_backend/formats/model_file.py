"""What a reader returns: a model file's metadata, vocabulary and tensor views, whichever container it came from.

GGUF and GGML readers both fill the same objects, so the rest of the engine never asks which format a file was.
Tensor names are always GGUF names (``blk.0.attn_q.weight``); a GGML file's legacy names are mapped on reading.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..quant.types import QuantType

# GGML legacy names -> GGUF names (llama architecture). In LLaMA's feed-forward w1 is the gate, w2 the down
# projection, w3 the up projection.
_GGML_GLOBAL_NAMES = {
    "tok_embeddings.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "output.weight": "output.weight",
}
_GGML_LAYER_NAMES = {
    "attention.wq.weight": "attn_q.weight",
    "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight",
    "attention.wo.weight": "attn_output.weight",
    "feed_forward.w1.weight": "ffn_gate.weight",
    "feed_forward.w2.weight": "ffn_down.weight",
    "feed_forward.w3.weight": "ffn_up.weight",
    "attention_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}
_GGML_LAYER_RE = re.compile(r"layers\.(\d+)\.(.+)")
GGUF_TO_GGML_NAMES_GLOBAL = {v: k for k, v in _GGML_GLOBAL_NAMES.items()}
_GGUF_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")
_GGUF_TO_GGML_LAYER = {v: k for k, v in _GGML_LAYER_NAMES.items()}


def gguf_name_from_ggml(name: str) -> Optional[str]:
    """GGUF name of a legacy GGML LLaMA tensor name, or None when the name is not one of LLaMA's."""
    if name in _GGML_GLOBAL_NAMES:
        return _GGML_GLOBAL_NAMES[name]
    match = _GGML_LAYER_RE.fullmatch(name)
    if match and match.group(2) in _GGML_LAYER_NAMES:
        return f"blk.{match.group(1)}.{_GGML_LAYER_NAMES[match.group(2)]}"
    return None


def ggml_name_from_gguf(name: str) -> Optional[str]:
    """Legacy GGML name of a GGUF LLaMA tensor name (the inverse of ``gguf_name_from_ggml``)."""
    if name in GGUF_TO_GGML_NAMES_GLOBAL:
        return GGUF_TO_GGML_NAMES_GLOBAL[name]
    match = _GGUF_LAYER_RE.fullmatch(name)
    if match and match.group(2) in _GGUF_TO_GGML_LAYER:
        return f"layers.{match.group(1)}.{_GGUF_TO_GGML_LAYER[match.group(2)]}"
    return None


@dataclass
class Tensor:
    name: str                 # GGUF name
    type: QuantType           # row of quant/types.py
    shape: tuple              # numpy order: (rows, row_length) = reversed ggml dims
    offset: int               # absolute byte offset of the data in the file
    nbytes: int
    data: np.ndarray = field(repr=False)   # read-only uint8 view into the file's one memmap (or copy), nbytes long
    source_name: str = ""     # the name as stored in the file (differs from ``name`` for GGML legacy files)

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def dims(self) -> tuple:
        """ggml order (ne0 = row length first), as GGUF and GGML files store them."""
        return tuple(reversed(self.shape))

    def __repr__(self) -> str:
        return f"Tensor({self.name!r}, {self.type.name}, shape={self.shape}, offset={self.offset}, nbytes={self.nbytes})"

    def dequantize(self) -> np.ndarray:
        """The tensor as float32 of ``self.shape``, through the engine's own kernels (``ggml_backend.quant``)."""
        from ..quant import dequantize  # imported late: formats must load without the kernels compiled
        return dequantize(self.type, self.data, self.shape)


@dataclass
class Vocab:
    """The vocabulary as the file stores it.

    ``style`` says whose conventions the pieces follow: "gguf" (SentencePiece pieces with '▁' and '<0xNN>' byte
    tokens, or GPT-2 byte-level BPE pieces) or "ggml-legacy" (a GGML-era file: plain spaces, a single raw byte for
    each byte token, empty strings for control tokens). For legacy files ``token_bytes`` holds the exact stored
    bytes and ``tokens`` the same decoded as UTF-8 (undecodable bytes kept as surrogates, see ``cursor.decode_text``).
    """
    model: str                          # tokenizer.ggml.model: "llama" (SPM), "gpt2" (BPE), ...
    tokens: list                        # list[str]
    scores: np.ndarray                  # float32[n_vocab] (zeros when the file has none)
    token_types: np.ndarray             # int32[n_vocab] (1 = normal when the file has none)
    merges: list = field(default_factory=list)   # BPE merges "a b"
    style: str = "gguf"
    token_bytes: Optional[list] = None  # list[bytes], legacy files only
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    unknown_token_id: Optional[int] = None
    padding_token_id: Optional[int] = None

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class ModelFile:
    path: Path
    format: str                         # "gguf" or "ggml"
    version: int                        # GGUF version, or the GGML container's version
    container: str                      # "gguf", "ggjt", "ggmf" or "ggml" (the unversioned GGML magic)
    metadata: dict                      # GGUF keys -> values (numeric arrays as numpy arrays, strings as str)
    metadata_types: dict                # key -> GGUFValueType (for arrays: the element type)
    vocab: Optional[Vocab]
    tensors: dict                       # GGUF name -> Tensor, in file order
    tensor_data_offset: int
    alignment: int
    file_size: int
    mmap: np.ndarray = field(repr=False)   # the memmap (copy-on-write, seen read-only) or in-memory copy they view
    hparams: dict = field(default_factory=dict)   # GGML header fields as stored (empty for GGUF)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def arch_key(self, suffix: str, default: Any = None) -> Any:
        """``metadata[f"{architecture}.{suffix}"]``, e.g. ``arch_key("block_count")``."""
        return self.metadata.get(f"{self.architecture}.{suffix}", default)

    @property
    def n_parameters(self) -> int:
        return sum(t.n_elements for t in self.tensors.values())

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def bits_per_weight(self) -> float:
        n = self.n_parameters
        return self.tensor_bytes * 8 / n if n else 0.0

    def __repr__(self) -> str:
        return (f"ModelFile({str(self.path)!r}, {self.container} v{self.version}, arch={self.architecture!r}, "
                f"{len(self.tensors)} tensors, vocab={len(self.vocab) if self.vocab else 0})")
