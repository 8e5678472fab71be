"""The offloaded layers: their weights on the device, their KV cache on the device, and the forward pass through
them. model/forward.Model runs its first ``first_layer`` layers on the CPU and hands the residual stream over here
(``forward_rest``): it crosses to the device once per forward pass and comes back once, as logits when the output
layer is offloaded too (every layer offloaded), else as the last hidden state for the CPU's output layer.
"""
from __future__ import annotations

import numpy as np

from ..model.forward import rms_norm as cpu_rms_norm
from ..model.kv_cache import KVCache
from ..model.rope import rope_cos_sin
from . import kernels as K
from .kernels import DeviceActivations, DeviceCacheLayer, DeviceMatrix, DeviceProjection
from .memory import MiB, VRAMError, OffloadPlan
from .runtime import import_cuda, simulated

cuda = import_cuda()

class DeviceLayer:
    """One layer's weights on the device (model/forward.Layer's twin)."""

    def __init__(self, layer):
        def matrix(linear):
            return DeviceMatrix(linear.qtype, linear.data, linear.n_out, linear.n_in, linear.bias)

        def vector(v):
            return None if v is None else cuda.to_device(np.ascontiguousarray(v, np.float32))

        self.qkv = DeviceProjection([layer.wq, layer.wk, layer.wv])        # fused where they can be
        self.gate_up = DeviceProjection([layer.w_gate, layer.w_up])
        self.wo, self.w_down = matrix(layer.wo), matrix(layer.w_down)
        self.attn_norm, self.ffn_norm = vector(layer.attn_norm), vector(layer.ffn_norm)
        self.q_norm, self.k_norm = vector(layer.q_norm), vector(layer.k_norm)
        self.post_attn_norm, self.post_ffn_norm = vector(layer.post_attn_norm), vector(layer.post_ffn_norm)


class OffloadedKVCache(KVCache):
    """A KV cache whose offloaded layers live on the device, in the CPU cache's types and layouts (f16, f32 or
    q8_0, [n_head_kv, n_ctx, head_dim] per layer and tensor). The host arrays of those layers are a mirror,
    brought up to date only when host code reads the cache (snapshots for the prompt cache and saved states,
    context shifts); the device copy is refreshed when host code changed it (restore, shift, re-rotation)."""

    def __init__(self, offload: "GPUOffload", n_ctx: int, type_k: str, type_v: str):
        hp = offload.hp
        self.offload = offload
        # allocated whole (the device arrays are made once, as llama.cpp's are), not grown as the CPU's caches are
        super().__init__(hp.n_layer, n_ctx, hp.n_head_kv, hp.head_dim_k, hp.head_dim_v, type_k, type_v,
                         capacity=n_ctx)
        self.layers = range(offload.first_layer, hp.n_layer)
        need = sum(self.k.data[il].nbytes + self.v.data[il].nbytes for il in self.layers)
        if self.k.scales is not None:
            need += sum(self.k.scales[il].nbytes for il in self.layers)
        if self.v.scales is not None:
            need += sum(self.v.scales[il].nbytes for il in self.layers)
        with offload.device():
            free = cuda.current_context().get_memory_info()[0]
            if need > free:
                raise VRAMError(f"a KV cache of n_ctx={n_ctx} for {len(self.layers)} offloaded layers needs "
                                f"{need / MiB:.0f} MiB of VRAM, {free / MiB:.0f} MiB are free: use a smaller n_ctx")
            self.device_k = {il: self._device_layer(self.k, il) for il in self.layers}
            self.device_v = {il: self._device_layer(self.v, il) for il in self.layers}
        self._host_stale = False     # the device holds newer keys/values than the host mirror
        self._device_stale = False   # the host mirror was changed by host code

    @staticmethod
    def _device_layer(tensor, il: int) -> DeviceCacheLayer:
        return DeviceCacheLayer(tensor.kind, tensor.data[il], None if tensor.scales is None else tensor.scales[il],
                                tensor.rotated)

    def _pairs(self):
        """(host tensor, device layers) of K and V."""
        return ((self.k, self.device_k), (self.v, self.device_v))

    def to_host(self) -> None:
        if self._host_stale:
            with self.offload.device():
                self._copy(to_host=True)
            self._host_stale = False

    def to_device(self) -> None:
        if self._device_stale:
            with self.offload.device():
                self._copy(to_host=False)
            self._device_stale = False

    def _copy(self, to_host: bool) -> None:
        for host, device in self._pairs():
            for il in self.layers:
                if to_host:
                    device[il].data.copy_to_host(host.data[il])
                    if host.scales is not None:
                        device[il].scales.copy_to_host(host.scales[il])
                else:
                    device[il].data.copy_to_device(host.data[il])
                    if host.scales is not None:
                        device[il].scales.copy_to_device(host.scales[il])

    def host_changed(self) -> None:
        self._device_stale = True

    def device_changed(self) -> None:
        self._host_stale = True

    def shift(self, n_keep: int, n_discard: int) -> None:
        self.to_host()
        super().shift(n_keep, n_discard)
        self.host_changed()

    def snapshot(self) -> dict:
        self.to_host()
        return super().snapshot()

    def copy_prefix_from(self, other: KVCache, n: int) -> None:
        if isinstance(other, OffloadedKVCache):
            other.to_host()
        super().copy_prefix_from(other, n)
        self._host_stale = False
        self.host_changed()

    def release(self) -> None:
        # the device arrays stay (they are the cache's whole size); only the positions are forgotten
        self.n_past = 0

    def restore(self, state: dict) -> None:
        super().restore(state)
        self._host_stale = False
        self.host_changed()


class GPUOffload:
    """The device half of a model: layers first_layer.. and, when all are offloaded, the output layer."""

    def __init__(self, model, plan: OffloadPlan, device_name: str = "GPU", main_gpu: int = 0):
        self.hp = model.hp
        self.main_gpu = main_gpu
        self.plan = plan
        self.device_name = device_name
        self.first_layer = plan.first_layer
        self.simulated = simulated()
        with self.device():
            self.layers = {il: DeviceLayer(model.layers[il]) for il in range(self.first_layer, self.hp.n_layer)}
            self.output = None
            if plan.output_on_device:
                out = model.output
                self.output = DeviceMatrix(out.qtype, out.data, out.n_out, out.n_in, out.bias)
                self.output_norm = cuda.to_device(np.ascontiguousarray(model.output_norm, np.float32))

    def device(self):
        """The GPU's context made current on the calling thread (a context manager): numba's current context is
        per thread, and the forward passes run on each Llama's worker thread."""
        return cuda.gpus[self.main_gpu]

    def new_cache(self, n_ctx: int, type_k: str, type_v: str) -> OffloadedKVCache:
        return OffloadedKVCache(self, n_ctx, type_k, type_v)

    def forward_rest(self, model, x: np.ndarray, spans, positions: np.ndarray, all_logits: bool,
                     output: str) -> list[np.ndarray]:
        """Layers first_layer.. on the device for the residual stream x [n_tokens, n_embd] (after the CPU's
        layers), then the output; the arguments and the result are model/forward.Model.forward_many's."""
        with self.device():
            return self._forward_rest(model, x, spans, positions, all_logits, output)

    def _forward_rest(self, model, x, spans, positions, all_logits, output):
        hp = self.hp
        for _, _, cache, _ in spans:
            if not isinstance(cache, OffloadedKVCache):
                raise TypeError("a model with offloaded layers needs its KV caches from model.new_cache()")
            cache.to_device()
        n_tokens = x.shape[0]
        d_x = cuda.to_device(np.ascontiguousarray(x, np.float32))
        tables = {}
        group = hp.n_head // hp.n_head_kv
        for il in range(self.first_layer, hp.n_layer):
            layer = self.layers[il]
            # --- attention ---
            q, k, v = layer.qkv(DeviceActivations(K.rms_norm(d_x, layer.attn_norm, hp.rms_eps)))
            q = q.reshape(n_tokens, hp.n_head, hp.head_dim_k)
            k = k.reshape(n_tokens, hp.n_head_kv, hp.head_dim_k)
            v = v.reshape(n_tokens, hp.n_head_kv, hp.head_dim_v)
            if layer.q_norm is not None:
                q = K.rms_norm(q, layer.q_norm, hp.rms_eps)
                k = K.rms_norm(k, layer.k_norm, hp.rms_eps)
            rope = model._rope_params(il)
            if rope not in tables:
                cos, sin = rope_cos_sin(positions, hp.rope_dims, *rope)
                tables[rope] = (cuda.to_device(cos), cuda.to_device(sin))
            cos, sin = tables[rope]
            K.rope(q, cos, sin, hp.rope_dims, hp.arch.rope_mode)
            K.rope(k, cos, sin, hp.rope_dims, hp.arch.rope_mode)
            window = hp.sliding_window if hp.swa_layers[il] else 0
            attn = cuda.device_array((n_tokens, hp.n_head * hp.head_dim_v), np.float32)
            for first, last, cache, start in spans:   # each sequence over its own keys and values
                keys, values = cache.device_k[il], cache.device_v[il]
                K.store_kv(k[first:last], keys, start)
                K.store_kv(v[first:last], values, start)
                K.attention(q[first:last], keys, values, start, group, window, hp.attn_scale, attn[first:last])
            attn_out = layer.wo(DeviceActivations(attn))
            if layer.post_attn_norm is not None:
                attn_out = K.rms_norm(attn_out, layer.post_attn_norm, hp.rms_eps)
            K.add(d_x, attn_out)
            # --- feed-forward ---
            gate, up = layer.gate_up(DeviceActivations(K.rms_norm(d_x, layer.ffn_norm, hp.rms_eps)))
            K.glu(gate, up, hp.arch.ffn_activation)
            ffn_out = layer.w_down(DeviceActivations(gate))
            if layer.post_ffn_norm is not None:
                ffn_out = K.rms_norm(ffn_out, layer.post_ffn_norm, hp.rms_eps)
            K.add(d_x, ffn_out)

        for first, last, cache, start in spans:
            cache.n_past = start + last - first
            cache.device_changed()
        rows = np.arange(n_tokens) if all_logits else np.array([last - 1 for _, last, _, _ in spans])
        if self.output is not None:
            picked = d_x if all_logits else K.gather_rows(d_x, rows)
            normed = K.rms_norm(picked, self.output_norm, hp.rms_eps)
            out = normed.copy_to_host() if output == "hidden" else self.output(DeviceActivations(normed)).copy_to_host()
        else:
            x_host = d_x.copy_to_host()
            normed = np.ascontiguousarray(cpu_rms_norm(x_host[rows], model.output_norm, hp.rms_eps), np.float32)
            out = normed if output == "hidden" else model.output(normed)
        if all_logits:
            return [out[first:last] for first, last, _, _ in spans]
        return [out[i:i + 1] for i in range(len(spans))]
