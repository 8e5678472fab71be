"""Architectures as data.

llama, qwen2 and gemma3 share one forward pass (model/forward.py); what differs between them is written down
here, as a small spec of switches, and the hyper-parameters read from the file's metadata under the
architecture's key prefix (``llama.embedding_length``, ``qwen2.attention.head_count_kv``, ...).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ArchSpec:
    name: str
    rope_mode: str                 # "normal": rotate adjacent pairs (x0,x1); "neox": rotate (x_i, x_{i+d/2})
    qkv_bias: bool = False         # q/k/v projections carry biases (qwen2)
    qk_norm: bool = False          # RMS norm of each q and k head before rope (gemma3)
    post_norms: bool = False       # RMS norm of the attention and FFN outputs before the residual add (gemma3)
    embed_scale: bool = False      # token embeddings multiplied by sqrt(n_embd) (gemma)
    ffn_activation: str = "silu"   # gate activation: "silu" (SwiGLU) or "gelu" (GeGLU, tanh approximation)
    swa_pattern: int = 0           # every swa_pattern-th layer is global, the others use a sliding window (gemma3)
    default_rope_base_swa: float = 10000.0
    default_rms_eps: float = 1e-5


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", rope_mode="normal"),
    "qwen2": ArchSpec("qwen2", rope_mode="neox", qkv_bias=True, default_rms_eps=1e-6),
    "gemma3": ArchSpec("gemma3", rope_mode="neox", qk_norm=True, post_norms=True, embed_scale=True,
                       ffn_activation="gelu", swa_pattern=6, default_rms_eps=1e-6),
}


@dataclass
class HParams:
    """Hyper-parameters of one model, resolved from metadata, tensor shapes and user overrides."""
    arch: ArchSpec
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_ff: int
    n_ctx_train: int
    rms_eps: float
    rope_dims: int
    rope_base: float
    rope_scale: float              # linear scale on positions (llama.cpp's freq_scale = 1/factor)
    rope_base_swa: float
    sliding_window: int
    attn_scale: float              # multiplies q.k (1/sqrt(head_dim) for these models)
    swa_layers: list = field(default_factory=list)

    @property
    def n_embd_k_gqa(self) -> int:
        return self.head_dim_k * self.n_head_kv

    @property
    def n_embd_v_gqa(self) -> int:
        return self.head_dim_v * self.n_head_kv


def _first(metadata: dict, *keys, default=None):
    for key in keys:
        if key in metadata:
            return metadata[key]
    return default


def resolve_hparams(metadata: dict, tensor_shapes: dict, *, rope_freq_base: float = 0.0,
                    rope_freq_scale: float = 0.0) -> HParams:
    """Build HParams from GGUF-style metadata. ``rope_freq_base``/``rope_freq_scale`` of 0 mean "from the file"
    (llama.cpp's --rope-freq-base / --rope-freq-scale semantics)."""
    arch_name = metadata.get("general.architecture", "llama")
    if arch_name not in ARCHITECTURES:
        raise ValueError(f"architecture {arch_name!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    arch = ARCHITECTURES[arch_name]
    p = arch_name + "."

    def need(key):
        if p + key not in metadata:
            raise ValueError(f"model metadata lacks {p + key}")
        return metadata[p + key]

    n_embd = int(need("embedding_length"))
    n_layer = int(need("block_count"))
    n_head = int(need("attention.head_count"))
    n_head_kv = int(_first(metadata, p + "attention.head_count_kv", default=n_head))
    head_dim_k = int(_first(metadata, p + "attention.key_length", default=n_embd // n_head))
    head_dim_v = int(_first(metadata, p + "attention.value_length", default=n_embd // n_head))
    n_vocab = tensor_shapes["token_embd.weight"][0]
    n_ff = int(_first(metadata, p + "feed_forward_length", default=tensor_shapes["blk.0.ffn_up.weight"][0]))
    rope_dims = int(_first(metadata, p + "rope.dimension_count", default=head_dim_k))
    file_base = float(_first(metadata, p + "rope.freq_base", default=10000.0))
    scaling_type = _first(metadata, p + "rope.scaling.type", default="none")
    factor = float(_first(metadata, p + "rope.scaling.factor", default=0.0) or 0.0)
    file_scale = 1.0 / factor if (factor and scaling_type == "linear") else 1.0
    if rope_freq_base < 0 or rope_freq_scale < 0:
        raise ValueError("rope_freq_base and rope_freq_scale must be >= 0 (0 = from the file)")
    if n_head <= 0 or n_head_kv <= 0 or n_head % n_head_kv:
        raise ValueError(f"n_head {n_head} is not a multiple of n_head_kv {n_head_kv}")
    swa = int(_first(metadata, p + "attention.sliding_window", default=0) or 0)
    if arch.swa_pattern and swa:
        swa_layers = [il % arch.swa_pattern < arch.swa_pattern - 1 for il in range(n_layer)]
    else:
        swa_layers = [False] * n_layer
    return HParams(
        arch=arch, n_vocab=n_vocab, n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv,
        head_dim_k=head_dim_k, head_dim_v=head_dim_v, n_ff=n_ff,
        n_ctx_train=int(_first(metadata, p + "context_length", default=2048)),
        rms_eps=float(_first(metadata, p + "attention.layer_norm_rms_epsilon", default=arch.default_rms_eps)),
        rope_dims=rope_dims,
        rope_base=rope_freq_base or file_base,
        rope_scale=rope_freq_scale or file_scale,
        rope_base_swa=arch.default_rope_base_swa,
        sliding_window=swa,
        attn_scale=1.0 / math.sqrt(head_dim_k),
        swa_layers=swa_layers,
    )
