"""How much VRAM an offload takes, checked before anything is uploaded.

weights of the offloaded layers (their quantized bytes as stored in the file, plus biases and norms), the
output matrix when every layer is offloaded, the KV cache of the offloaded layers for one context of n_ctx
positions, and scratch: a batch's activations, the attention's probabilities and the GEMM's dequantized band.
Pure arithmetic on the model's tensors (no CUDA needed), so it is tested anywhere.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..model.kv_cache import cache_bytes

MiB = 1 << 20
GEMM_BAND_BYTES = 64 << 20      # kernels.DeviceMatrix.BAND_BYTES
CONTEXT_OVERHEAD = 300 * MiB    # the CUDA context, numba's modules and the allocator's slack


class VRAMError(MemoryError):
    """The GPU has too little free memory for the layers asked."""


@dataclass
class OffloadPlan:
    n_layer: int
    n_offloaded: int                  # the last n_offloaded layers run on the GPU
    output_on_device: bool            # the output norm and matrix too (every layer offloaded)
    layer_bytes: list                 # weights of each layer
    kv_bytes_per_layer: int
    output_bytes: int
    scratch_bytes: int

    @property
    def first_layer(self) -> int:
        return self.n_layer - self.n_offloaded

    def bytes_for(self, n_offloaded: int) -> int:
        weights = sum(self.layer_bytes[self.n_layer - n_offloaded:]) if n_offloaded else 0
        output = self.output_bytes if n_offloaded == self.n_layer else 0
        return weights + output + n_offloaded * self.kv_bytes_per_layer + self.scratch_bytes + CONTEXT_OVERHEAD

    @property
    def total_bytes(self) -> int:
        return self.bytes_for(self.n_offloaded)

    def layers_that_fit(self, free_bytes: float) -> int:
        fit = 0
        for n in range(self.n_layer + 1):
            if self.bytes_for(n) <= free_bytes:
                fit = n
        return fit

    def describe(self) -> str:
        weights = sum(self.layer_bytes[self.first_layer:]) + (self.output_bytes if self.output_on_device else 0)
        return (f"{self.total_bytes / MiB:.0f} MiB of VRAM (weights {weights / MiB:.0f} MiB, KV cache "
                f"{self.n_offloaded * self.kv_bytes_per_layer / MiB:.0f} MiB, scratch and CUDA context "
                f"{(self.scratch_bytes + CONTEXT_OVERHEAD) / MiB:.0f} MiB)")


def resolve_n_gpu_layers(n_gpu_layers: int, n_layer: int) -> int:
    """llama.cpp's -ngl: -1 (or any count >= n_layer) means every layer."""
    if n_gpu_layers < -1:
        raise ValueError(f"n_gpu_layers must be -1 (all layers) or a count >= 0, got {n_gpu_layers}")
    return n_layer if n_gpu_layers == -1 else min(n_gpu_layers, n_layer)


def plan_offload(model, n_gpu_layers: int, n_ctx: int, n_batch: int,
                 cache_types: tuple[str, str] = ("f16", "f16")) -> OffloadPlan:
    """The plan for offloading the last ``n_gpu_layers`` layers of ``model`` (model/forward.Model)."""
    hp = model.hp
    n = resolve_n_gpu_layers(n_gpu_layers, hp.n_layer)

    def linear_bytes(linear):
        return linear.data.nbytes + (0 if linear.bias is None else linear.bias.nbytes)

    layer_bytes = []
    for layer in model.layers:
        total = sum(linear_bytes(getattr(layer, name))
                    for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"))
        total += sum(v.nbytes for v in (layer.attn_norm, layer.ffn_norm, layer.q_norm, layer.k_norm,
                                        layer.post_attn_norm, layer.post_ffn_norm) if v is not None)
        layer_bytes.append(total)
    kv = (cache_bytes(cache_types[0], n_ctx * hp.n_head_kv * hp.head_dim_k)
          + cache_bytes(cache_types[1], n_ctx * hp.n_head_kv * hp.head_dim_v))
    output_bytes = linear_bytes(model.output) + model.output_norm.nbytes
    n_batch = max(1, min(n_batch, n_ctx))
    q_width = hp.n_head * max(hp.head_dim_k, hp.head_dim_v)
    # residual, norm output, q/k/v, attention output, gate/up: float32; quantized copies of the inputs; the
    # attention's probabilities [n_batch * n_head, n_ctx]; logits; the GEMM band
    activations = 4 * n_batch * (3 * hp.n_embd + q_width + 2 * hp.n_embd_k_gqa + q_width + 2 * hp.n_ff)
    activations += 2 * n_batch * max(hp.n_embd, hp.n_ff)
    probs = 4 * n_batch * hp.n_head * n_ctx
    logits = 4 * n_batch * hp.n_vocab if n == hp.n_layer else 0
    scratch = activations + probs + logits + GEMM_BAND_BYTES
    return OffloadPlan(hp.n_layer, n, n == hp.n_layer, layer_bytes, kv, output_bytes, scratch)


def check_vram(plan: OffloadPlan, free_bytes: float, device: str = "GPU 0") -> None:
    """VRAMError naming how many layers would fit when the plan needs more than ``free_bytes``."""
    if plan.total_bytes <= free_bytes:
        return
    fit = plan.layers_that_fit(free_bytes)
    raise VRAMError(
        f"-ngl {plan.n_offloaded}: offloading {plan.n_offloaded} of {plan.n_layer} layers needs "
        f"{plan.describe()}, but {device} has {free_bytes / MiB:.0f} MiB free; "
        + (f"{fit} layer{'' if fit == 1 else 's'} would fit (-ngl {fit})" if fit
           else "not even one layer would fit (use -ngl 0)"))
