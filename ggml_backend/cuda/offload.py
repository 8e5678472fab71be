"""The offloaded layers: their weights on the device, their KV cache on the device, and the forward pass through
them. model/forward.Model runs its first ``first_layer`` layers on the CPU and hands the residual stream over here
(``forward_rest``): it crosses to the device once per forward pass and comes back once, as logits when the output
layer is offloaded too (every layer offloaded), else as the last hidden state for the CPU's output layer.
"""
from __future__ import annotations

import sys
from collections import deque

import numpy as np

from ..model.forward import rms_norm as cpu_rms_norm
from ..model.kv_cache import KVCache
from ..model.rope import rope_cos_sin
from . import kernels as K
from .kernels import DeviceActivations, DeviceCacheLayer, DeviceMatrix, DeviceProjection
from .memory import MiB, VRAMError, OffloadPlan
from .runtime import CudaGraph, graphs_enabled, import_cuda, simulated

cuda = import_cuda()
_said_no_graphs = False


def say_no_graphs(error) -> None:
    global _said_no_graphs
    if not _said_no_graphs:
        _said_no_graphs = True
        print(f"ggml_backend: CUDA graphs unavailable ({error}): decode steps launch each kernel", file=sys.stderr)


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
        self._graphs: dict = {}      # output kind -> DecodeGraph, or where it stands (see graph_step)

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

    def graph_step(self, model, x: np.ndarray, start: int, positions: np.ndarray, output: str):
        """A decode step of this sequence through its CUDA graph, or None where it runs eagerly: the first step
        (kernels compile, constants upload: nothing of that may happen while capturing), and every step once a
        capture failed (said once)."""
        state = self._graphs.get(output)
        if state is None or state == "failed":
            self._graphs.setdefault(output, "eager once")
            return None
        if state == "eager once":
            try:
                state = DecodeGraph(self.offload, model, self, output, x, start, positions)
            except Exception as error:   # noqa: BLE001 - a driver or capture failure: eager launches still work
                self._graphs[output] = "failed"
                say_no_graphs(error)
                return None
            self._graphs[output] = state
            return state.finish(model, start)
        return state.step(model, x, start, positions)

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
        for _, _, cache, _ in spans:
            if not isinstance(cache, OffloadedKVCache):
                raise TypeError("a model with offloaded layers needs its KV caches from model.new_cache()")
            cache.to_device()
        if graphs_enabled() and all(last - first == 1 for first, last, _, _ in spans):
            return self._decode_steps(model, x, spans, positions, all_logits, output)
        return self._eager(model, x, spans, positions, all_logits, output)

    def _decode_steps(self, model, x, spans, positions, all_logits, output):
        """A pass whose sequences each bring one token (decode steps; the server's slots batched together): each
        sequence's step replayed from its own CUDA graph, one after the other. Each sequence gets the logits of its
        step alone, which the batched pass gives too (the kernels compute every row as they would alone; from 48
        tokens on a batched pass would take the GEMM instead), and a replay costs about a microsecond a kernel
        where a pass launched from Python costs 35 us a kernel. A sequence whose graph is not made yet (its first
        decode step) takes its step eagerly."""
        results = []
        for first, last, cache, start in spans:
            span = (0, 1, cache, start)
            result = cache.graph_step(model, x[first:last], int(start), positions[first:last], output)
            if result is None:
                result = self._eager(model, x[first:last], [span], positions[first:last], all_logits, output)[0]
            results.append(result)
        return results

    def _eager(self, model, x, spans, positions, all_logits, output):
        """The pass with every kernel launched from Python."""
        d_x = cuda.to_device(np.ascontiguousarray(x, np.float32))
        d_starts = K.positions([start for _, _, _, start in spans])
        self.layers_forward(model, d_x, spans, self.rope_tables(model, positions), d_starts)
        self._advance(spans)
        return self._output(model, d_x, spans, all_logits, output)

    def host_rope_tables(self, model, positions) -> dict:
        """{rope parameters: (cos, sin)} of these positions, one pair per distinct rope of the offloaded layers
        (Gemma 3's local and global layers differ)."""
        tables = {}
        for il in range(self.first_layer, self.hp.n_layer):
            rope = model._rope_params(il)
            if rope not in tables:
                tables[rope] = rope_cos_sin(positions, self.hp.rope_dims, *rope)
        return tables

    def rope_tables(self, model, positions) -> dict:
        """host_rope_tables, on the device."""
        return {rope: (cuda.to_device(cos), cuda.to_device(sin))
                for rope, (cos, sin) in self.host_rope_tables(model, positions).items()}

    def layers_forward(self, model, d_x, spans, tables: dict, d_starts, n_keys_max: int | None = None) -> None:
        """Layers first_layer.. on d_x [n_tokens, n_embd] in place; each span's keys and values stored from
        d_starts[span] on. ``n_keys_max``: attention's scratch width (None: each span's own length)."""
        hp = self.hp
        n_tokens = d_x.shape[0]
        group = hp.n_head // hp.n_head_kv
        # one attention scratch for every layer when its width is fixed (a graph keeps what it allocates)
        probs = K.empty((n_tokens * hp.n_head, n_keys_max), np.float32) if n_keys_max and len(spans) == 1 else None
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
            cos, sin = tables[model._rope_params(il)]
            K.rope(q, cos, sin, hp.rope_dims, hp.arch.rope_mode)
            K.rope(k, cos, sin, hp.rope_dims, hp.arch.rope_mode)
            window = hp.sliding_window if hp.swa_layers[il] else 0
            attn = K.empty((n_tokens, hp.n_head * hp.head_dim_v), np.float32)
            for span, (first, last, cache, start) in enumerate(spans):   # each sequence over its own cache
                keys, values = cache.device_k[il], cache.device_v[il]
                K.store_kv(k[first:last], keys, d_starts, span)
                K.store_kv(v[first:last], values, d_starts, span)
                K.attention(q[first:last], keys, values, d_starts, group, window, hp.attn_scale, attn[first:last],
                            span, n_keys_max or start + last - first, probs)
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

    @staticmethod
    def _advance(spans) -> None:
        for first, last, cache, start in spans:
            cache.n_past = start + last - first
            cache.device_changed()

    def output_on_device(self, d_x, output: str):
        """The last rows' normed hidden state (output "hidden") or logits, on the device, when the output layer is
        offloaded; d_x holds exactly the rows wanted."""
        normed = K.rms_norm(d_x, self.output_norm, self.hp.rms_eps)
        return normed if output == "hidden" else self.output(DeviceActivations(normed))

    def output_on_host(self, model, x_host: np.ndarray, output: str) -> np.ndarray:
        """The CPU's output layer for rows x_host [n, n_embd] (when the output layer stayed on the CPU)."""
        normed = np.ascontiguousarray(cpu_rms_norm(x_host, model.output_norm, self.hp.rms_eps), np.float32)
        return normed if output == "hidden" else model.output(normed)

    def _output(self, model, d_x, spans, all_logits, output):
        n_tokens = d_x.shape[0]
        rows = np.arange(n_tokens) if all_logits else np.array([last - 1 for _, last, _, _ in spans])
        if self.output is not None:
            picked = d_x if all_logits or len(rows) == n_tokens else K.gather_rows(d_x, rows)
            out = self.output_on_device(picked, output).copy_to_host()
        else:
            out = self.output_on_host(model, d_x.copy_to_host()[rows], output)
        if all_logits:
            return [out[first:last] for first, last, _, _ in spans]
        return [out[i:i + 1] for i in range(len(spans))]


class DecodeGraph:
    """One decode step of one sequence (one token through layers first_layer.. and the output layer when it is
    offloaded) as a CUDA graph (runtime.CudaGraph), made at the sequence's second decode step and replayed at every
    later one. What changes between steps lives in device arrays that the replay reads, refreshed before each
    launch: the token's hidden state, its position (the cache kernels read starts[0]) and its rope tables;
    attention's scratch is as wide as the cache. The step that makes the graph runs once for real on the graph's
    stream, keeping every array it allocates; the capture that follows is handed the same arrays in the same order,
    so nothing is allocated while capturing, and the graph holds addresses that stay valid. The numbers are the
    eager step's, kernel for kernel."""

    def __init__(self, offload: "GPUOffload", model, cache: "OffloadedKVCache", output: str, x: np.ndarray,
                 start: int, positions: np.ndarray):
        self.offload, self.cache, self.output = offload, cache, output
        self.stream = cuda.stream()
        host_tables = offload.host_rope_tables(model, positions)
        inputs: list = []
        with K.launching_on(self.stream, inputs):
            self.x = K.empty(x.shape, np.float32)
            self.starts = K.empty((1,), np.int32)
            self.tables = {rope: (K.empty(cos.shape), K.empty(sin.shape)) for rope, (cos, sin) in host_tables.items()}
        self._inputs(x, start, host_tables)

        def run():
            offload.layers_forward(model, self.x, [(0, 1, cache, start)], self.tables, self.starts,
                                   n_keys_max=cache.n_ctx)
            return offload.output_on_device(self.x, output) if offload.output is not None else self.x

        self.kept: list = []
        with K.launching_on(self.stream, self.kept):     # this step, for real: its arrays recorded
            self.result = run()

        def record():                                      # the same launches on the same arrays, captured
            with K.launching_on(self.stream, reuse=deque(self.kept)):
                return run()
        self.graph = CudaGraph(self.stream, record)
        self.inputs = inputs
        self.host_result = np.empty(tuple(self.result.shape), np.float32)

    def _inputs(self, x, start, host_tables) -> None:
        self.x.copy_to_device(np.ascontiguousarray(x, np.float32), stream=self.stream)
        self.starts.copy_to_device(np.array([start], np.int32), stream=self.stream)
        for rope, (cos, sin) in host_tables.items():
            device_cos, device_sin = self.tables[rope]
            device_cos.copy_to_device(np.ascontiguousarray(cos), stream=self.stream)
            device_sin.copy_to_device(np.ascontiguousarray(sin), stream=self.stream)

    def step(self, model, x: np.ndarray, start: int, positions: np.ndarray) -> np.ndarray:
        """A replay: the step's output rows [1, n] (logits, or the hidden state as output asks)."""
        self._inputs(x, start, self.offload.host_rope_tables(model, positions))
        self.graph.launch()
        return self.finish(model, start)

    def finish(self, model, start: int) -> np.ndarray:
        """The output of the step just run (by the replay, or for real while the graph was made)."""
        self.result.copy_to_host(self.host_result, stream=self.stream)
        self.stream.synchronize()
        GPUOffload._advance([(0, 1, self.cache, start)])
        if self.offload.output is not None:
            return self.host_result.copy()
        return self.offload.output_on_host(model, self.host_result, self.output)
