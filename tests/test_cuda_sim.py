"""GPU offload (ggml_backend/cuda): every kernel against the CPU path, and a tiny model end to end, in numba's CUDA
simulator; the VRAM check and the no-CUDA fallback without any CUDA at all.

numba reads NUMBA_ENABLE_CUDASIM when numba.cuda is first imported, and the other test files must keep running
without CUDA, so this module runs in three modes:

* plain ``pytest`` (no GPU, CI): the CUDA-free tests here, plus one test that runs this file again in a
  subprocess with NUMBA_ENABLE_CUDASIM=1 (the kernels on the CPU, one Python thread per CUDA thread: slow, hence
  the tiny shapes);
* NUMBA_ENABLE_CUDASIM=1 (that subprocess): the kernel and end-to-end tests in the simulator;
* GGML_BACKEND_TEST_CUDA=1 on a machine with an NVIDIA GPU (benchmarks/gpu_h200.sh): the same kernel and
  end-to-end tests on the real device, plus the CUDA-free ones.

Tolerances: dequantization and activation quantization are bit-exact in the simulator (the same float32
operations as the CPU); on a GPU the compiler may fuse d*q - m into one FMA, so there they may differ by an ulp.
Mat-vec products differ from the CPU's only by the order of float32 sums (relative 1e-5). Logits end to end: the
CPU path's own tolerance against llama.cpp for q4_0 on the synthetic Llama is 0.088 (tests/test_engine_synthetic.py);
on a GPU they must be within 0.05 of the CPU's (a sum order that moves an activation across a rounding boundary of
its 8-bit quantization moves logits by hundredths); in the simulator, whose arithmetic is the CPU's but for sum
order, the tiny models here come within 1e-6, so 1e-3 there.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
DEVICE = os.environ.get("GGML_BACKEND_TEST_CUDA") == "1" and not SIMULATOR
KERNEL_TESTS = SIMULATOR or DEVICE
ROOT = Path(__file__).resolve().parent.parent
LOGIT_TOLERANCE = 1e-3 if SIMULATOR else 0.05


# --- tiny models: 2 layers, n_embd 32, GQA (2 heads on 1 KV head), q4_0 layers, q8_0 output --------------------
# llama (adjacent-pair rope), qwen2 (neox rope, q/k/v biases) and gemma3 (per-head q/k norms, post norms, GeGLU,
# embedding scale, tied output, sliding window of 4 over the 5 tokens of SEQUENCE)

def write_micro_model(path, arch: str, n_head: int = 2) -> str:
    """n_head 2 (on one KV head): head size 16; n_head 1: 32, the least a q8_0 KV cache takes."""
    from ggml_backend.cli.bench_models import LlamaShape, random_tensor_data, spm_vocab, tensor_layout
    from ggml_backend.formats import write_gguf
    shape = LlamaShape("micro", n_embd=32, n_layer=2, n_ff=64, n_head=n_head, n_head_kv=1, n_vocab=260)
    tokens, scores, types = spm_vocab(shape.n_vocab)
    p = arch + "."
    metadata = {
        "general.architecture": arch, "general.name": f"micro-{arch}", p + "context_length": 64,
        p + "embedding_length": shape.n_embd, p + "block_count": shape.n_layer,
        p + "feed_forward_length": shape.n_ff, p + "rope.dimension_count": shape.head_dim,
        p + "attention.head_count": shape.n_head, p + "attention.head_count_kv": shape.n_head_kv,
        p + "attention.layer_norm_rms_epsilon": 1e-5, p + "rope.freq_base": 10000.0,
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0}
    # q6_K output rows need 256 values; this model's have 32
    layout = [(name, "q8_0" if kind == "q6_K" else kind, dims) for name, kind, dims in tensor_layout(shape, "q4_0")]
    head, kv = shape.head_dim, shape.head_dim * shape.n_head_kv
    for i in range(shape.n_layer):
        b = f"blk.{i}."
        if arch == "qwen2":
            layout += [(b + "attn_q.bias", "f32", (shape.n_embd,)), (b + "attn_k.bias", "f32", (kv,)),
                       (b + "attn_v.bias", "f32", (kv,))]
        if arch == "gemma3":
            layout += [(b + "attn_q_norm.weight", "f32", (head,)), (b + "attn_k_norm.weight", "f32", (head,)),
                       (b + "post_attention_norm.weight", "f32", (shape.n_embd,)),
                       (b + "post_ffw_norm.weight", "f32", (shape.n_embd,))]
    if arch == "gemma3":
        layout = [entry for entry in layout if entry[0] != "output.weight"]   # tied to the token embeddings
        metadata[p + "attention.sliding_window"] = 4
    tensors = [(name, kind, dims, random_tensor_data(kind, dims, seed))
               for seed, (name, kind, dims) in enumerate(layout)]
    write_gguf(path, metadata, tensors)
    return str(path)


@pytest.fixture(scope="module")
def micro_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cuda")
    made = {}

    def get(arch: str = "llama", n_head: int = 2) -> str:
        if (arch, n_head) not in made:
            made[arch, n_head] = write_micro_model(folder / f"micro-{arch}-{n_head}-q4_0.gguf", arch, n_head)
        return made[arch, n_head]
    return get


@pytest.fixture(scope="module")
def micro_model(micro_models) -> str:
    return micro_models("llama")


SEQUENCE = [1, 50, 60, 70, 80]


def cpu_logits(path: str) -> np.ndarray:
    from ggml_backend import Llama
    llm = Llama(path, n_ctx=32, logits_all=True, verbose=False)
    llm.eval(SEQUENCE)
    return np.array(llm.scores[:len(SEQUENCE)])


# --- without CUDA: the VRAM plan and check, the fallback message --------------------------------------------

if not SIMULATOR:
    def test_vram_too_small_names_the_layers_that_fit(micro_model, monkeypatch):
        from ggml_backend import Llama
        from ggml_backend import cuda as gpu
        from ggml_backend.cuda import runtime
        llm = Llama(micro_model, n_ctx=32, verbose=False)
        plan = gpu.plan_offload(llm.model, -1, 32, 8)
        assert (plan.n_offloaded, plan.first_layer, plan.output_on_device) == (2, 0, True)
        # one more layer: its weights and KV cache, and the output layer once every layer is offloaded
        assert plan.total_bytes - plan.bytes_for(1) == plan.layer_bytes[0] + plan.kv_bytes_per_layer + plan.output_bytes
        free = plan.bytes_for(1) + 1
        assert plan.layers_that_fit(free) == 1
        with pytest.raises(gpu.VRAMError, match=r"-ngl 2: .* MiB free; 1 layer would fit \(-ngl 1\)"):
            gpu.check_vram(plan, free)
        partial = gpu.plan_offload(llm.model, 1, 32, 8)
        assert (partial.n_offloaded, partial.first_layer, partial.output_on_device) == (1, 1, False)
        assert gpu.plan_offload(llm.model, 99, 32, 8).n_offloaded == 2          # more than there are: all
        with pytest.raises(ValueError, match="n_gpu_layers"):
            gpu.plan_offload(llm.model, -2, 32, 8)
        # through Llama: refused before anything is uploaded (a device with 1 MiB free is made up here)
        monkeypatch.setattr(gpu, "cuda_status", lambda: runtime.CudaStatus(True, n_devices=1))
        monkeypatch.setattr(runtime, "select_device", lambda main_gpu: ("Tiny GPU", 1 << 20, 1 << 20))
        with pytest.raises(gpu.VRAMError, match=r"GPU 0 \(Tiny GPU\) has 1 MiB free; not even one layer"):
            Llama(micro_model, n_ctx=32, verbose=False, n_gpu_layers=-1)

    def test_without_cuda_it_says_so_once_and_runs_on_the_cpu(micro_model, monkeypatch, capsys):
        from ggml_backend import Llama
        from ggml_backend import cuda as gpu
        from ggml_backend.cuda import runtime
        monkeypatch.setattr(gpu, "cuda_status", lambda: runtime.CudaStatus(False, "no CUDA driver or device"))
        monkeypatch.setattr(runtime, "_said_no_cuda", False)
        reference = cpu_logits(micro_model)
        for _ in range(2):
            llm = Llama(micro_model, n_ctx=32, logits_all=True, verbose=False, n_gpu_layers=-1, main_gpu=0)
            assert llm.model.offload is None
        assert capsys.readouterr().err.count("no CUDA GPU found: running on the CPU") == 1
        llm.eval(SEQUENCE)
        np.testing.assert_array_equal(np.array(llm.scores[:len(SEQUENCE)]), reference)

    def test_offload_arguments_are_checked(micro_model):
        from ggml_backend import Llama
        with pytest.raises(ValueError, match="n_gpu_layers must be >= -1"):
            Llama(micro_model, verbose=False, n_gpu_layers=-3)
        with pytest.raises(ValueError, match="main_gpu must be >= 0"):
            Llama(micro_model, verbose=False, main_gpu=-1)
        with pytest.raises(TypeError, match="n_gpu_layers must be an integer"):
            Llama(micro_model, verbose=False, n_gpu_layers="all")


if not KERNEL_TESTS:
    def test_kernels_in_the_cuda_simulator():
        """This file's kernel and end-to-end tests, run again under NUMBA_ENABLE_CUDASIM=1."""
        env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", __file__],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
        assert " passed" in proc.stdout and " failed" not in proc.stdout and " skipped" not in proc.stdout


# --- the kernels, in the simulator or on a GPU ----------------------------------------------------------------

if KERNEL_TESTS:
    from ggml_backend.cuda.runtime import import_cuda

    cuda = import_cuda()
    from ggml_backend.cuda import kernels as K
    from ggml_backend.quant import dequantize, quantize
    from ggml_backend.quant.activations import (quantize_activations_q8_1, quantize_activations_q8_K,
                                                round_rows_to_bf16, round_rows_to_f16)
    from ggml_backend.quant.matmul import matmul

    # q3_K_planes: the CPU's in-memory layout (quant/layouts.py), which the device takes back as q3_K
    WEIGHT_TYPES = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_K", "q3_K", "q3_K_planes", "q4_K", "q5_K", "q6_K",
                    "f16", "bf16", "f32"]

    def assert_dequantized(got, ref):
        if SIMULATOR:
            np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))
        else:   # an FMA may round d*q - m once instead of twice
            np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6 * float(np.abs(ref).max()))

    def test_every_cpu_type_has_a_device_kernel():
        from ggml_backend.quant.matmul import SUPPORTED_TYPES
        assert set(K.DEVICE_TYPES) == set(SUPPORTED_TYPES)

    @pytest.mark.parametrize("type_name", WEIGHT_TYPES)
    def test_dequantize_and_matvec_match_the_cpu(type_name):
        rng = np.random.default_rng(sum(map(ord, type_name)))
        n_rows, k = 3, 256
        weights = rng.standard_normal((n_rows, k)).astype(np.float32)
        weights[1, :32] = 0.0                       # a block of zeros: scale 0
        data = quantize(type_name, weights).reshape(n_rows, -1)
        bias = rng.standard_normal(n_rows).astype(np.float32)
        matrix = K.DeviceMatrix(type_name, data, n_rows, k, bias)
        assert_dequantized(matrix.dequantize(), dequantize(type_name, data.reshape(-1), (n_rows, k)))
        x = rng.standard_normal((2, k)).astype(np.float32)
        got = matrix(K.DeviceActivations(cuda.to_device(x))).copy_to_host()
        ref = matmul(type_name, data, x, method="int") + bias
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * float(np.abs(ref).max()))

    def test_activation_quantization_matches_the_cpu():
        rng = np.random.default_rng(7)
        x = (rng.standard_normal((2, 512)) * 3).astype(np.float32)
        x[0, :32] = 0.0                                 # an all-zero block
        x[1, 256:] *= 1e-6                              # scales in half-precision subnormals
        x[1, 5] = 1e5                                   # beyond the largest half: f16 rounding gives inf
        acts = K.DeviceActivations(cuda.to_device(x))
        for got, ref in zip(acts.form("q8_1"), quantize_activations_q8_1(x)):
            np.testing.assert_array_equal(got.copy_to_host(), ref)
        for got, ref in zip(acts.form("q8_K"), quantize_activations_q8_K(x)):
            np.testing.assert_array_equal(got.copy_to_host(), ref)
        with np.errstate(over="ignore"):
            np.testing.assert_array_equal(acts.form("f16")[0].copy_to_host(), round_rows_to_f16(x))
        np.testing.assert_array_equal(acts.form("bf16")[0].copy_to_host(), round_rows_to_bf16(x))

    @pytest.mark.parametrize("engine", ["numba", "cublas"] if DEVICE else ["numba"])   # (no CuPy in the simulator)
    def test_prompt_gemm_on_dequantized_bands(engine):
        from ggml_backend.cuda.runtime import import_cupy
        if engine == "cublas" and import_cupy() is None:
            pytest.skip(reason="cuBLAS through CuPy: CuPy is not importable here (or this is the simulator)")
        rng = np.random.default_rng(3)
        n_rows, k = 6, 64
        data = quantize("q8_0", rng.standard_normal((n_rows, k)).astype(np.float32)).reshape(n_rows, -1)
        bias = rng.standard_normal(n_rows).astype(np.float32)
        matrix = K.DeviceMatrix("q8_0", data, n_rows, k, bias)
        matrix.BAND_BYTES = 4 * 4 * k                   # bands of 4 rows: the second band is a partial one
        x = rng.standard_normal((3, k)).astype(np.float32)
        out = cuda.device_array((3, n_rows), np.float32)
        matrix._gemm(cuda.to_device(x), out, cupy=None if engine == "cublas" else False)
        ref = x @ dequantize("q8_0", data.reshape(-1), (n_rows, k)).T + bias
        np.testing.assert_allclose(out.copy_to_host(), ref, rtol=1e-5, atol=1e-5)

    def test_rms_norm_rope_and_glu_match_the_cpu():
        from ggml_backend.model.forward import gelu_tanh, rms_norm, swiglu
        from ggml_backend.model.rope import apply_rope, rope_cos_sin
        rng = np.random.default_rng(5)
        x = rng.standard_normal((3, 2, 16)).astype(np.float32)
        weight = rng.standard_normal(16).astype(np.float32)
        got = K.rms_norm(cuda.to_device(x), cuda.to_device(weight), 1e-6).copy_to_host()   # per head, as q_norm
        np.testing.assert_allclose(got, rms_norm(x, weight, 1e-6), rtol=2e-7, atol=1e-7)
        cos, sin = rope_cos_sin(np.arange(5, 8), 12, 10000.0, 1.0)   # rope over 12 of 16 dims: 4 pass through
        for mode in ("normal", "neox"):
            device_x = cuda.to_device(x)
            K.rope(device_x, cuda.to_device(cos), cuda.to_device(sin), 12, mode)
            np.testing.assert_allclose(device_x.copy_to_host(), apply_rope(x.copy(), cos, sin, 12, mode),
                                       rtol=1e-6, atol=1e-6)
        gate = (rng.standard_normal((2, 40)) * 4).astype(np.float32)
        gate[0, :2] = (-11.0, 12.0)                      # GELU's two cut-offs
        up = rng.standard_normal((2, 40)).astype(np.float32)
        for activation, reference in (("silu", swiglu(gate, up)), ("gelu", gelu_tanh(gate.copy()) * up)):
            device_gate = cuda.to_device(gate)
            K.glu(device_gate, cuda.to_device(up), activation)
            np.testing.assert_allclose(device_gate.copy_to_host(), reference, rtol=2e-6, atol=1e-6)

    @pytest.mark.parametrize("cache_kind, head_dim, window", [("f16", 8, 0), ("f32", 8, 3), ("q8_0", 32, 2),
                                                               ("q8_0", 64, 0)])
    def test_kv_store_and_attention_match_the_cpu(cache_kind, head_dim, window):
        """The store into each cache type (q8_0 with 64-value heads: stored Hadamard-rotated), then attention over
        it with GQA and a sliding window, against model/kv_cache.py and model/attention.py."""
        from ggml_backend.model.attention import attention
        from ggml_backend.model.kv_cache import CacheTensor
        rng = np.random.default_rng(11)
        n_head, n_head_kv, n_ctx, start, n_new = 4, 2, 8, 3, 2
        old = rng.standard_normal((2, n_head_kv, start, head_dim)).astype(np.float32)
        new = rng.standard_normal((2, n_new, n_head_kv, head_dim)).astype(np.float32)
        if cache_kind == "f16":   # f16 subnormal, negative zero, overflow to inf, subnormal
            new[0, 0, 0, :4] = (1e-7, -0.0, 7e4, -3e-5)
        cpu = [CacheTensor(cache_kind, (1, n_head_kv, n_ctx, head_dim)) for _ in range(2)]
        for tensor, rows in zip(cpu, old):
            tensor.write(0, 0, rows)
        device = [K.DeviceCacheLayer(cache_kind, *tensor.layer(0)) for tensor in cpu]
        assert device[0].rotated == (cache_kind == "q8_0" and head_dim == 64)
        for tensor, layer, rows in zip(cpu, device, new):
            tensor.write(0, start, np.ascontiguousarray(rows.transpose(1, 0, 2)))
            K.store_kv(cuda.to_device(rows), layer, start)
        for tensor, layer in zip(cpu, device):
            data = layer.data.copy_to_host()
            if device[0].rotated:    # rotation sums in another order: a quant may land one step away
                stored = CacheTensor(cache_kind, tensor.data.shape)
                stored.data[:], stored.scales[:] = data, layer.scales.copy_to_host()
                np.testing.assert_allclose(stored.read(0, 0, start + n_new), tensor.read(0, 0, start + n_new),
                                           atol=0.03)
                tensor.data[:], tensor.scales[:] = stored.data, stored.scales    # the same cache for both below
            else:
                with np.errstate(over="ignore"):
                    np.testing.assert_array_equal(data, tensor.data[0])
                if cache_kind == "q8_0":
                    np.testing.assert_array_equal(layer.scales.copy_to_host(), tensor.scales[0])
        if cache_kind == "f16":      # keep the scores finite for the attention comparison
            cpu[0].data[0, 0, start, 0:4] = 0
            device[0] = K.DeviceCacheLayer(cache_kind, *cpu[0].layer(0))
        q = rng.standard_normal((n_new, n_head, head_dim)).astype(np.float32)
        scale = 1 / np.sqrt(head_dim)
        ref = attention(q, cpu[0].layer(0), cpu[1].layer(0), start, n_head // n_head_kv, window, scale)
        out = cuda.device_array((n_new, n_head * head_dim), np.float32)
        K.attention(cuda.to_device(q), device[0], device[1], start, n_head // n_head_kv, window, scale, out)
        # q8_0: q's own 8-bit rounding (after a rotation summed in another order) may move by a step
        np.testing.assert_allclose(out.copy_to_host(), ref.reshape(n_new, -1), rtol=1e-5,
                                   atol=2e-2 if device[0].rotated else 1e-5)

    # --- end to end ---------------------------------------------------------------------------------------------

    @pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
    def test_other_architectures_offloaded_give_the_cpu_logits(micro_models, arch):
        from ggml_backend import Llama
        path = micro_models(arch)
        reference = cpu_logits(path)
        llm = Llama(path, n_ctx=32, logits_all=True, verbose=False, n_gpu_layers=-1)
        if arch == "gemma3":
            assert llm.hparams.swa_layers[0] and llm.hparams.sliding_window == 4 < len(SEQUENCE)
        llm.eval(SEQUENCE)
        assert np.abs(np.array(llm.scores[:len(SEQUENCE)]) - reference).max() <= LOGIT_TOLERANCE

    def test_all_layers_offloaded_give_the_cpu_logits(micro_model):
        from ggml_backend import Llama
        from ggml_backend.cuda.offload import OffloadedKVCache
        reference = cpu_logits(micro_model)
        llm = Llama(micro_model, n_ctx=32, logits_all=True, verbose=False, n_gpu_layers=-1)
        assert llm.model.offload.first_layer == 0 and llm.model.offload.output is not None
        assert isinstance(llm.cache, OffloadedKVCache)
        llm.eval(SEQUENCE[:3])                           # a prompt, then one token at a time over the device cache
        state = llm.save_state()                         # the device cache read back through the host mirror
        llm.eval(SEQUENCE[3:4])
        llm.eval(SEQUENCE[4:])
        got = np.array(llm.scores[:len(SEQUENCE)])
        assert np.abs(got - reference).max() <= LOGIT_TOLERANCE
        llm.load_state(state)                            # ... and written back to the device
        llm.eval(SEQUENCE[3:4])
        np.testing.assert_array_equal(np.array(llm.scores[3]), got[3])

    def test_sequences_batched_in_one_pass_each_attend_to_their_own_device_cache(micro_model):
        """forward_many with two sequences (the batcher's and perplexity's passes), logits and hidden states."""
        from ggml_backend import Llama
        results = []
        for n_gpu_layers in (0, -1):
            model = Llama(micro_model, n_ctx=32, verbose=False, n_gpu_layers=n_gpu_layers).model
            first, second = model.new_cache(16), model.new_cache(16)
            model.forward_many([([1, 50, 60], first)])
            logits = model.forward_many([([70], first), ([1, 80], second)])
            hidden = model.forward_many([([90], first), ([100], second)], all_logits=True, output="hidden")
            assert (first.n_past, second.n_past) == (5, 3)
            results.append(np.concatenate(logits + hidden, axis=1))
        assert np.abs(results[1] - results[0]).max() <= LOGIT_TOLERANCE

    def test_context_shift_rotates_the_device_cache_as_the_cpu_does(micro_model):
        from ggml_backend import Llama
        logits = []
        for n_gpu_layers in (0, -1):
            llm = Llama(micro_model, n_ctx=32, verbose=False, n_gpu_layers=n_gpu_layers)
            llm.eval(SEQUENCE)
            llm.session.context_shift(1)   # drops 2 positions, slides 2, re-rotates their keys (on the host mirror)
            llm.eval([90])
            logits.append(np.array(llm.scores[llm.n_tokens - 1]))
        assert np.abs(logits[1] - logits[0]).max() <= LOGIT_TOLERANCE

    @pytest.mark.parametrize("cache_types", [("f16", "f16"), ("q8_0", "f32")])
    def test_some_layers_offloaded_give_the_cpu_logits(micro_models, cache_types):
        from ggml_backend import Llama
        type_k, type_v = cache_types
        micro_model = micro_models("llama", n_head=2 if type_k != "q8_0" else 1)
        cpu = Llama(micro_model, n_ctx=32, logits_all=True, verbose=False, type_k=type_k, type_v=type_v)
        cpu.eval(SEQUENCE)
        reference = np.array(cpu.scores[:len(SEQUENCE)])
        llm = Llama(micro_model, n_ctx=32, logits_all=True, verbose=False, n_gpu_layers=1, type_k=type_k,
                    type_v=type_v)
        assert llm.model.offload.first_layer == 1 and llm.model.offload.output is None
        llm.eval(SEQUENCE)
        got = np.array(llm.scores[:len(SEQUENCE)])
        assert np.abs(got - reference).max() <= LOGIT_TOLERANCE


# --- decode steps replayed as CUDA graphs: on a GPU, captured and replayed by the driver; in the simulator (which
# cannot capture) by a stand-in that runs the recorded launches again at each replay, so that what the graph's
# replay depends on (the inputs refreshed in place, positions read from the device, attention's scratch as wide as
# the cache, the output rows) is checked there too -------------------------------------------------------------

class ReplayedByPython:
    """runtime.CudaGraph's stand-in under the simulator: capturing runs nothing; each launch runs the recorded
    launches again (on the arrays of the step that made the graph, as a replay does)."""

    def __init__(self, stream, record):
        self.record = record

    def launch(self):
        self.record()


if KERNEL_TESTS:
    @pytest.mark.parametrize("arch, n_head, n_gpu_layers, cache_types", [
        ("llama", 2, -1, ("f16", "f16")),
        ("llama", 2, 1, ("f32", "f32")),            # the output layer on the CPU: the graph ends at the hidden state
        ("llama", 1, -1, ("q8_0", "q8_0")),         # rotated q8_0 heads: rotations, round trips, copies
        ("gemma3", 2, -1, ("f16", "f16")),          # two rope tables, a sliding window the steps go past
    ] + ([("qwen2", 2, -1, ("f16", "f16"))] if DEVICE else []))   # biases, neox rope (slow in the simulator)
    def test_decode_steps_replayed_as_a_cuda_graph_give_the_eager_logits(micro_models, monkeypatch, arch, n_head,
                                                                         n_gpu_layers, cache_types):
        from ggml_backend import Llama
        from ggml_backend.cuda import offload
        from ggml_backend.cuda.offload import DecodeGraph
        if SIMULATOR:
            monkeypatch.setattr(offload, "CudaGraph", ReplayedByPython)
            monkeypatch.setattr(offload, "graphs_enabled", lambda: os.environ["GGML_BACKEND_CUDA_GRAPHS"] == "1")
        path = micro_models(arch, n_head=n_head)
        runs = []
        for graphs in ("1", "0"):
            monkeypatch.setenv("GGML_BACKEND_CUDA_GRAPHS", graphs)
            llm = Llama(path, n_ctx=32, logits_all=True, verbose=False, n_gpu_layers=n_gpu_layers,
                        type_k=cache_types[0], type_v=cache_types[1])
            llm.eval(SEQUENCE[:3])
            for token in [60, 70, 80, 90]:
                llm.eval([token])
            state = llm.save_state()                  # the host mirror read back, then written to the device again
            llm.load_state(state)
            for token in [100, 110, 120, 130]:
                llm.eval([token])
            used = [g for g in llm.cache._graphs.values() if isinstance(g, DecodeGraph)]
            assert bool(used) == (graphs == "1")
            runs.append(np.array(llm.scores[:llm.n_tokens]))
        np.testing.assert_array_equal(runs[0], runs[1])


if KERNEL_TESTS:
    def test_batched_decode_passes_replay_each_sequence_graph(micro_model, monkeypatch):
        """forward_many with one token from each of three sequences (the server's slots): each sequence's step from
        its own graph, the same logits and hidden states as the pass launched eagerly."""
        from ggml_backend import Llama
        from ggml_backend.cuda import offload
        from ggml_backend.cuda.offload import DecodeGraph
        if SIMULATOR:
            monkeypatch.setattr(offload, "CudaGraph", ReplayedByPython)
            monkeypatch.setattr(offload, "graphs_enabled", lambda: os.environ["GGML_BACKEND_CUDA_GRAPHS"] == "1")
        results = []
        for graphs in ("1", "0"):
            monkeypatch.setenv("GGML_BACKEND_CUDA_GRAPHS", graphs)
            model = Llama(micro_model, n_ctx=32, verbose=False, n_gpu_layers=-1).model
            caches = [model.new_cache(16) for _ in range(3)]
            outs = [model.forward_many([([1, 50, 60], caches[0]), ([1, 70], caches[1]), ([1], caches[2])])]
            for step in range(3):   # eager, then the step that makes each graph, then a replay
                outs += model.forward_many([([80 + step], caches[0]), ([90 + step], caches[1]),
                                            ([100 + step], caches[2])])
            outs += model.forward_many([([110], caches[0]), ([120], caches[2])], all_logits=True, output="hidden")
            assert [c.n_past for c in caches] == [7, 5, 5]
            made = [isinstance(c._graphs.get("logits"), DecodeGraph) for c in caches]
            assert made == [graphs == "1"] * 3
            results.append(np.concatenate([np.asarray(o).reshape(1, -1) for o in outs], axis=1))
        np.testing.assert_array_equal(results[0], results[1])


# --- on a GPU only: the real models against llama.cpp, by tests/test_engine_real.py's criteria -------------------

if DEVICE:
    @pytest.mark.parametrize("which", ["qwen", "gemma"])
    def test_real_models_offloaded_match_llama_cpp(which):
        from refdata import real_json, real_model
        from test_engine_real import NEAR_TIE
        from ggml_backend import Llama
        path = str(real_model(which))
        gpu = Llama(path, n_ctx=160, logits_all=True, verbose=False, n_gpu_layers=-1)
        cpu = Llama(path, n_ctx=160, logits_all=True, verbose=False)
        for case in real_json(which)["greedy"]:
            prompt, continuation = case["prompt_tokens"], case["greedy_tokens"]
            for llm in (gpu, cpu):
                llm.reset()
                llm.eval(prompt + continuation)
            span = slice(len(prompt) - 1, len(prompt) + len(continuation) - 1)
            logits = np.array(gpu.scores[span])
            print(f"{which}: max |GPU - CPU| logits {np.abs(logits - np.array(cpu.scores[span])).max():.4f}")
            for i, expected in enumerate(continuation):
                ours = int(np.argmax(logits[i]))
                if ours != expected:
                    margin = float(logits[i][ours] - logits[i][expected])
                    assert margin < NEAR_TIE[which], f"{which}: position {i}: ours {ours}, llama.cpp {expected}"
            ids = case["first_top10_ids"]
            diff = np.abs(logits[0][ids] - np.array(case["first_top10_logits"], dtype=np.float32)).max()
            assert diff < 0.5, f"{which}: top-10 logits differ from llama.cpp's by up to {diff:.3f}"


# --- on a GPU only: files of real shapes (benchmarks/gpu_h200.sh writes shape clones of the real models, whose own
# files cannot travel to an offline GPU machine): every layer offloaded against the CPU, a prompt through the GEMM
# path and decode steps through the mat-vec kernels ---------------------------------------------------------------

SHAPED_MODELS = [p for p in os.environ.get("GGML_BACKEND_TEST_CUDA_MODELS", "").split(",") if p]

if DEVICE:
    @pytest.mark.parametrize("path", SHAPED_MODELS or [None])
    def test_real_shaped_models_offloaded_give_the_cpu_logits(path):
        """Random weights through every layer amplify sum-order differences with depth, so the yardstick is the
        CPU's own: the same tokens with the prompt in 8-token batches (the integer few-token kernels instead of
        float GEMM) move the logits of the Gemma 3 clone by 0.17 and of the Qwen clone by 0.07 (std 1). The GPU
        must stay within twice that of the CPU; a wrong kernel moves logits by the order of their spread."""
        if path is None:
            pytest.skip(reason="GGML_BACKEND_TEST_CUDA_MODELS names no model file")
        from ggml_backend import Llama
        prompt = [1] + [100 + (37 * i) % 20000 for i in range(59)]    # 60 tokens: the GEMM path
        runs = []
        for n_gpu_layers, batch in ((-1, 60), (0, 60), (0, 8)):
            llm = Llama(path, n_ctx=128, logits_all=True, verbose=False, n_gpu_layers=n_gpu_layers)
            for i in range(0, len(prompt), batch):
                llm.eval(prompt[i:i + batch])
            for token in (500, 600, 700, 800):                      # decode steps: the mat-vec kernels
                llm.eval([token])
            runs.append(np.array(llm.scores[:llm.n_tokens]))
        gpu, cpu, cpu_batched = runs
        diff, spread = np.abs(gpu - cpu).max(), np.abs(cpu_batched - cpu).max()
        print(f"{Path(path).name}: max |GPU - CPU| logits {diff:.4f}, the CPU's own spread {spread:.4f} "
              f"(logit std {cpu.std():.3f})")
        assert np.isfinite(gpu).all()
        assert diff <= 2 * spread + LOGIT_TOLERANCE
