"""The compiled decode step (model/decode_step.py) against the Python forward pass it replaces for a few tokens (one,
or several of one sequence): the same logits and the same cache contents, bit for bit, on the real model, on the
synthetic model of every block type and on the tiny Llama written as F32, F16 and BF16; the models and caches it
cannot take keep the Python path."""
import os

import numpy as np
import pytest

from ggml_backend import Llama
from ggml_backend.model.forward import Linear
from ggml_backend.quant import dequantize
from ggml_backend.model.decode_step import FusedDecode, fused_decode_enabled
from ggml_backend.quant.matmul import KERNEL_ISA
from refdata import synthetic_file, synthetic_types

needs_float_kernels = pytest.mark.skipif(KERNEL_ISA is None, reason="f32 / f16 / bf16 weights take the compiled "
                                         "layers on the float kernels, which need AVX2 (else the BLAS path)")

PROMPT = list(range(100, 110))
STEPS = 6
F32, Q8_0 = 0, 8    # ggml type ids, as llama-cpp-python's type_k / type_v take them


def _count_compiled_passes(monkeypatch) -> list:
    """A list that gets an item for each forward pass that runs the compiled layers (until monkeypatch.undo)."""
    taken = []
    real_run = FusedDecode.run

    def counting_run(self, *args):
        taken.append(1)
        return real_run(self, *args)
    monkeypatch.setattr(FusedDecode, "run", counting_run)
    return taken


#: what follows the prompt: single tokens (decode steps), then passes of a few tokens of the one sequence (a
#: speculative verification, a short prompt chunk), all under the integer GEMM's 8 tokens
CHUNKS = [[200 + 7 * i] for i in range(STEPS)] + [[300, 301], [302, 303, 304], [305, 306, 307, 308, 309]]


def _decode(path, fused: bool, monkeypatch, **kwargs):
    """(logits after every token of CHUNKS, evaluated chunk by chunk after a prompt, the cache's stored keys and
    values, how many of the chunks took the compiled layers)."""
    llm = Llama(str(path), n_ctx=64, n_threads=2, verbose=False, logits_all=True, **kwargs)
    if not fused:
        llm.model.fused_decode = None
    llm.eval(PROMPT)
    taken = _count_compiled_passes(monkeypatch)
    for chunk in CHUNKS:
        llm.eval(chunk)
    monkeypatch.undo()
    n = len(PROMPT) + sum(map(len, CHUNKS))
    logits = [np.array(row) for row in llm.scores[len(PROMPT):n]]
    stored = (llm.cache.k.data[:, :, :n].copy(), llm.cache.v.data[:, :, :n].copy())
    return logits, stored, len(taken)


def _same_as_python_path(path, monkeypatch, **kwargs):
    fused_logits, fused_cache, taken = _decode(path, True, monkeypatch, **kwargs)
    python_logits, python_cache, _ = _decode(path, False, monkeypatch, **kwargs)
    assert taken == len(CHUNKS), "the compiled layers were not taken"
    for row, (a, b) in enumerate(zip(fused_logits, python_logits)):
        assert np.array_equal(a, b), f"token {row}: logits differ by up to {np.abs(a - b).max()}"
    for a, b in zip(fused_cache, python_cache):
        assert np.array_equal(a, b), "the caches differ"


def test_real_model_same_logits_and_cache(qwen_path, monkeypatch):
    _same_as_python_path(qwen_path, monkeypatch)


def test_real_model_f32_cache(qwen_path, monkeypatch):
    _same_as_python_path(qwen_path, monkeypatch, type_k=F32, type_v=F32)


def test_f32_keys_with_f16_values(tiny_path, monkeypatch):
    _same_as_python_path(tiny_path, monkeypatch, type_k=F32)


@pytest.mark.parametrize("type_name", [t for t in synthetic_types() if t != "f16"])
def test_every_block_type_same_logits_and_cache(monkeypatch, type_name):
    _same_as_python_path(synthetic_file(type_name), monkeypatch)


@pytest.fixture(scope="module")
def float_files(tmp_path_factory, tiny_path):
    """The tiny synthetic Llama written as F32, F16 and BF16 by our quantizer (from its q4_0 file)."""
    from ggml_backend.cli.main import main
    folder = tmp_path_factory.mktemp("float-models")
    files = {}
    for type_name in ("F32", "F16", "BF16"):
        files[type_name] = folder / f"tiny-{type_name}.gguf"
        assert main(["quantize", "--allow-requantize", "--no-progress", str(tiny_path), str(files[type_name]),
                     type_name]) == 0
    return files


@needs_float_kernels
@pytest.mark.parametrize("type_name", ["F32", "F16", "BF16"])
def test_float_weights_same_logits_and_cache(float_files, monkeypatch, type_name):
    """f32 / f16 / bf16 weights in the compiled layers (float_dot.py's kernels): the Python path's numbers."""
    _same_as_python_path(float_files[type_name], monkeypatch)


@needs_float_kernels
def test_float_weights_in_one_launch_give_the_launches_numbers(float_files, monkeypatch):
    """The token's launch and a launch a layer (the float kernels' chunks, the gate-up phase's rows of gate and up
    and their SwiGLU) against a launch per product, bit for bit."""
    _launches_agree(float_files["BF16"], monkeypatch)


def test_a_matrix_outside_the_file_keeps_the_python_path(tiny_path):
    model = Llama(str(tiny_path), n_ctx=32, verbose=False).model
    assert FusedDecode.build(model) is not None
    wo = model.layers[0].wo          # one matrix as f16, in its own bytes (not the file's memory map)
    values = dequantize(wo.qtype, wo.data.reshape(-1), (wo.n_out, wo.n_in)).reshape(wo.n_out, wo.n_in)
    half = np.ascontiguousarray(values.astype(np.float16)).view(np.uint8)
    model.layers[0].wo = Linear(wo.name, "f16", half, wo.n_out, wo.n_in)
    assert FusedDecode.build(model) is None


def test_q8_0_caches_keep_the_python_path(tiny_path, monkeypatch):
    llm = Llama(str(tiny_path), n_ctx=32, verbose=False)
    assert llm.model.fused_decode is not None
    fused = llm.model.fused_decode
    q8_0, mixed = llm.model.new_cache(32, "q8_0", "q8_0"), llm.model.new_cache(32, "f16", "f32")
    assert not fused.takes([(0, 1, q8_0, 0)], 1)
    assert fused.takes([(0, 1, mixed, 0)], 1)
    assert not fused.takes([(0, 1, mixed, 0), (1, 2, llm.model.new_cache(32), 0)], 2)   # kinds differ
    assert fused.takes([(0, 2, mixed, 0)], 2)       # two tokens of one sequence
    _, _, taken = _decode(tiny_path, True, monkeypatch, type_k=Q8_0, type_v=Q8_0)
    assert taken == 0


def test_gemma_keeps_the_python_path(gemma_path):
    assert Llama(str(gemma_path), n_ctx=32, verbose=False).model.fused_decode is None


def test_the_environment_switch(tiny_path, monkeypatch):
    monkeypatch.setenv("GGML_BACKEND_DECODE_STEP", "python")
    assert not fused_decode_enabled()
    assert Llama(str(tiny_path), n_ctx=32, verbose=False).model.fused_decode is None
    monkeypatch.setenv("GGML_BACKEND_DECODE_STEP", "fast")
    with pytest.raises(ValueError, match="GGML_BACKEND_DECODE_STEP"):
        fused_decode_enabled()


def _sequences_pass(path, fused: bool, monkeypatch, n_sequences: int):
    """Logits of one-token passes of several sequences at once (continuous batching's decode step), after each
    sequence's own prompt; and how many passes took the compiled layers."""
    llm = Llama(str(path), n_ctx=64, n_threads=2, verbose=False)
    model = llm.model
    if not fused:
        model.fused_decode = None
    caches = [model.new_cache(64) for _ in range(n_sequences)]
    for s, cache in enumerate(caches):    # prompts of different lengths: every sequence at its own position
        model.forward_many([(list(range(100 + s, 105 + 2 * s)), cache)])
    taken = _count_compiled_passes(monkeypatch)
    logits = []
    for step in range(3):
        outs = model.forward_many([([300 + 11 * s + step], cache) for s, cache in enumerate(caches)])
        logits.append(np.concatenate(outs))
    # then a pass where the sequences carry one or two tokens (verifications beside decode steps; at most 7 in
    # all, under the integer GEMM's 8)
    outs = model.forward_many([(list(range(400 + s, 401 + s + s % 2)), cache) for s, cache in enumerate(caches)],
                              all_logits=True)
    logits.append(np.concatenate(outs))
    monkeypatch.undo()
    stored = [(c.k.data[:, :, :c.n_past].copy(), c.v.data[:, :, :c.n_past].copy()) for c in caches]
    return logits, stored, len(taken)


@pytest.mark.parametrize("n_sequences", [2, 5])
def test_sequences_decoded_together_same_as_python_path(qwen_path, monkeypatch, n_sequences):
    fused_logits, fused_cache, taken = _sequences_pass(qwen_path, True, monkeypatch, n_sequences)
    python_logits, python_cache, _ = _sequences_pass(qwen_path, False, monkeypatch, n_sequences)
    assert taken == 4, "the compiled decode step was not taken"
    for a, b in zip(fused_logits, python_logits):
        assert np.array_equal(a, b), f"logits differ by up to {np.abs(a - b).max()}"
    for (ka, va), (kb, vb) in zip(fused_cache, python_cache):
        assert np.array_equal(ka, kb) and np.array_equal(va, vb), "the caches differ"


@pytest.mark.parametrize("type_name", [t for t in ("q4_1", "q5_K_M", "q2_K") if t in synthetic_types()])
def test_sequences_of_other_block_types(monkeypatch, type_name):
    fused_logits, _, taken = _sequences_pass(synthetic_file(type_name), True, monkeypatch, 3)
    python_logits, _, _ = _sequences_pass(synthetic_file(type_name), False, monkeypatch, 3)
    assert taken == 4
    assert all(np.array_equal(a, b) for a, b in zip(fused_logits, python_logits))


# a kind of each row-kernel family: row lanes (q4_0, q5_0 with its fifth bits), the lane kernel (q8_0 on AVX2),
# q4_K / q5_K's chunks (q4_K), the groups of q2_K / q3_K / q6_K (q3_K, q6_K)
@pytest.mark.parametrize("type_name", ["q4_0", "q5_0", "q8_0", "q4_K", "q3_K", "q6_K"])
def test_gate_up_and_swiglu_in_one_launch_give_the_separate_numbers(type_name):
    """``_gate_up_swiglu`` (one token's gate and up products and their SwiGLU in one launch) against ``matvec`` of
    the two matrices then SwiGLU, bit for bit, for a kind of each row-kernel family and chunkings that cut the rows
    unevenly (1000 rows: 125 and 334 a chunk, row lanes of 8 split)."""
    from ggml_backend.cli.bench_kernels import random_weights
    from ggml_backend.model.decode_step import _gate_up_swiglu, _quantized
    from ggml_backend.model.forward import swiglu
    from ggml_backend.quant.decode import KIND_ARGS, KINDS, matvec
    from ggml_backend.quant.matmul import KERNEL_ISA
    if KERNEL_ISA is None:
        pytest.skip("the SIMD kernels need AVX2")
    rng = np.random.default_rng(7)
    n_ff, k = 1000, 512
    gate, up = random_weights(type_name, n_ff, k, rng), random_weights(type_name, n_ff, k, rng)
    w = np.concatenate([gate.reshape(-1), up.reshape(-1)])
    row_bytes = gate.shape[1]
    starts = np.array([0, gate.nbytes], np.int64)
    kind = KIND_ARGS[KINDS[type_name]]
    xq, x_scale, x_sums, x_bsums = _quantized(kind, rng.standard_normal((1, k)).astype(np.float32))
    both = np.empty(2 * n_ff, np.float32)
    matvec(kind, w, starts, np.array([n_ff, n_ff], np.int64), row_bytes, xq[0], x_scale[0], x_sums[0], x_bsums[0],
           both, 8, KERNEL_ISA)
    expected = swiglu(both[None, :n_ff].copy(), both[None, n_ff:].copy())[0]
    assert np.isfinite(expected).all() and np.abs(expected).max() > 0
    for n_chunks in (1, 3, 8):
        gate_up = np.full(2 * n_ff, np.nan, np.float32)
        act = np.full(n_ff, np.nan, np.float32)
        _gate_up_swiglu(kind, w, starts, row_bytes, xq[0], x_scale[0], x_sums[0], x_bsums[0], gate_up, act, n_chunks,
                        KERNEL_ISA)
        np.testing.assert_array_equal(gate_up, both)
        np.testing.assert_array_equal(act, expected)


def _steps(path, monkeypatch, choice: str | None, n_steps: int = 4, token_launch: bool = True):
    """Logits of ``n_steps`` one-token steps after PROMPT on two threads and the cache's stored keys and values,
    with ``GGML_BACKEND_DECODE_STEP=choice`` (None: unset), the whole token in one launch or (``token_launch``
    False) a launch a layer; and which launches ran: "token" (decode_token_region), "layer" (decode_layer_region)
    or "products" (decode_layer)."""
    if choice is None:
        monkeypatch.delenv("GGML_BACKEND_DECODE_STEP", raising=False)
    else:
        monkeypatch.setenv("GGML_BACKEND_DECODE_STEP", choice)
    llm = Llama(str(path), n_ctx=64, n_threads=2, verbose=False, logits_all=True)
    fused = llm.model.fused_decode
    fused.token_launch = fused.token_launch and token_launch
    llm.eval(PROMPT)
    for i in range(n_steps):
        llm.eval([200 + 7 * i])
    n = len(PROMPT) + n_steps
    logits = np.array(llm.scores[len(PROMPT):n])
    stored = (llm.cache.k.data[:, :, :n].copy(), llm.cache.v.data[:, :, :n].copy())
    ran = ("token" if fused._token_entry is not None else "layer" if any(key[-1] for key in fused._compiled)
           else "products")
    return logits, stored, ran


def _same_steps(a, b):
    assert np.array_equal(a[0], b[0]), f"logits differ by up to {np.abs(a[0] - b[0]).max()}"
    for x, y in zip(a[1], b[1]):
        assert np.array_equal(x, y), "the caches differ"


def test_layer_in_one_launch_gives_the_launches_numbers(qwen_path, monkeypatch):
    """One token on two threads runs all its layers in one parallel launch (decode_token_region: the default,
    GGML_BACKEND_DECODE_STEP=region), or each layer in one (decode_layer_region: where a layer cannot join the
    token's launch), and either gives the logits and cache of a launch per product (decode_layer,
    GGML_BACKEND_DECODE_STEP=fused), bit for bit."""
    _launches_agree(qwen_path, monkeypatch)


def _launches_agree(path, monkeypatch):
    """The token's launch, a launch a layer and a launch a product give the same logits and caches."""
    import numba
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one launch a layer needs two threads, and numba has one on this machine")
    token = _steps(path, monkeypatch, None)
    per_layer = _steps(path, monkeypatch, None, token_launch=False)
    per_product = _steps(path, monkeypatch, "fused")
    assert (token[2], per_layer[2], per_product[2]) == ("token", "layer", "products")
    _same_steps(token, per_product)
    _same_steps(per_layer, per_product)


@pytest.mark.parametrize("token_launch", [True, False], ids=["token", "layer"])
def test_layer_in_one_launch_with_more_workers_than_threads(qwen_path, monkeypatch, token_launch):
    """Workers past numba's threads run after the others (in turn on a thread): they find every phase's chunks
    taken and wait for nothing, so the launch ends, with the same numbers. Also the case of a second thread that
    starts after the first has done the layer (or, in the token's launch, every layer: the layers share their
    work arrays, which a late worker must not write)."""
    from ggml_backend.model import decode_step
    reference = _steps(qwen_path, monkeypatch, "fused")
    monkeypatch.setattr(decode_step, "_n_threads", lambda: 5)
    stragglers = _steps(qwen_path, monkeypatch, "region", token_launch=token_launch)
    assert stragglers[2] == ("token" if token_launch else "layer")
    _same_steps(stragglers, reference)


_WORKER_CACHE_SCRIPT = """
import sys
from numba import types
for i in range(int(sys.argv[2])):   # numba types made before: their serial numbers differ from the first process's
    types.Array(types.float32, 1 + i % 4, "C", readonly=i % 2 == 0)
from ggml_backend import Llama
from ggml_backend.model import decode_step
llm = Llama(sys.argv[1], n_ctx=64, n_threads=2, verbose=False)
llm.eval(list(range(100, 110)))
llm.eval([200])
workers = decode_step._workers.values()
print(len(workers), sum(worker.cache_hits for worker in workers))
"""


def test_the_layer_worker_loads_from_numbas_cache_in_another_process(qwen_path):
    """The layer region's workers (a C function per layer kind, closing over its kinds and path) are compiled once
    and loaded from numba's cache by later processes: their cache key covers what they close over, which must
    pickle to the same bytes whatever the process typed before (a numba type's serial number once made every
    process compile them again: 10 s at each first decode step)."""
    import subprocess
    import sys
    import numba
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one launch a layer needs two threads, and numba has one on this machine")
    env = dict(os.environ, GGML_BACKEND_COMPILE_HELPERS="0")   # numba's cache as the suite's (compiled once)
    env.pop("GGML_BACKEND_DECODE_STEP", None)
    counts = []
    for types_before in (0, 37):
        run = subprocess.run([sys.executable, "-c", _WORKER_CACHE_SCRIPT, str(qwen_path), str(types_before)],
                             env=env, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stderr[-2000:]
        counts.append(tuple(int(n) for n in run.stdout.split()[-2:]))
    (n_first, _), (n_second, hits) = counts
    assert n_first == n_second >= 1 and hits == n_second


def test_claims_hand_out_each_task_once_own_share_first():
    """claims.py's counters as the layer region uses them: three workers claiming in turn take every task of a
    phase once, each its own share (a neighbouring range) before the others'; a phase's done count reaches its
    tasks."""
    from numba import njit
    from ggml_backend.model.decode_step import _claim_task, _phase_done, _phase_open, _task_done

    @njit
    def claim_all(n_tasks, n_workers, order):
        counters = np.zeros(n_workers + 1, np.int64)
        taken = np.full(n_tasks[0], -1, np.int64)
        sequence = np.full(n_tasks[0] + 2, -1, np.int64)
        for step in range(sequence.size):
            me = order[step % order.size]
            i = _claim_task(counters, 0, n_tasks, me, n_workers)
            sequence[step] = i
            if i >= 0:
                taken[i] = me
                _task_done(counters, 0, n_workers)
        still_open = _phase_open(counters, 0, n_tasks, n_workers)
        _phase_done(counters, 0, n_tasks, n_workers)     # returns: every task counted done
        return taken, sequence, still_open

    taken, sequence, still_open = claim_all(np.array([10]), 3, np.array([0, 1, 2]))
    # in turn: 0, 3, 6, 1, 4, 7, 2, 5, 8; then worker 0, its share done, takes worker 2's last
    assert list(taken) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 0] and not still_open
    assert sorted(sequence[:10]) == list(range(10)) and list(sequence[10:]) == [-1, -1]
    # worker 0 alone (the others never start): its share, then the others' from where they are (untouched)
    taken, sequence, _ = claim_all(np.array([10]), 3, np.array([0]))
    assert list(sequence[:10]) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9] and set(taken) == {0}
