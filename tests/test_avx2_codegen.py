"""The AVX2 and AVX-VNNI kernels as a CPU without AVX-512 compiles them.

numba compiles for the CPU it runs on, so on a machine with AVX-512 (most CI and development machines) the AVX2
path's kernels are built with AVX-512 available: LLVM may fuse their instructions into AVX-512 ones (it turns a
``vpmaddwd`` and an add into ``vpdpwssd``, a permute into ``vpermt2b``), and a mistake that only an AVX2-only CPU
(AMD Zen 3, Intel desktop parts) would meet, an instruction its target lacks or different numbers, would pass
unseen. Here a fresh process compiles the AVX2 path for x86-64-v3 (AVX2, FMA, F16C, BMI2; no AVX-512) into its own
numba cache and multiplies every block type's weights by one token and by five (the few-token tiles); its
results must equal, bit for bit, those of the AVX2 path compiled for this CPU, and its kernels' assembly must load
no block scale by ``vpinsrw`` from memory (the cost ``simd.load_f16_pair`` exists to avoid on such CPUs). The same
for the AVX-VNNI path compiled for an Alder Lake (AVX2 and AVX-VNNI, no AVX-512), one token, whose kernels must
use the VEX-encoded ``vpdpbusd`` / ``vpdpwssd``. Each path's prompt GEMM (eight rows a register) must give the
numbers of this CPU's VNNI prompt GEMM where it has one; both paths' code must hold nothing of AVX-512.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import ggml_backend.quant.matmul as matmul_module
from ggml_backend.quant import simd
from ggml_backend.quant.decode import KINDS
from ggml_backend.quant.gemm import prompt_gemm_takes

X86_64_V3 = ("+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+cx8,+f16c,+fma,+fxsr,+lzcnt,+mmx,+movbe,+popcnt,+sahf,"
             "+sse,+sse2,+sse3,+sse4.1,+sse4.2,+ssse3,+xsave")

# (rows, k) per block size: rows of several whole tiles and a rest, k of several blocks
SHAPES = {32: (37, 640), 256: (37, 1024)}
TOKENS = (1, 5)

PRODUCTS = r"""
import sys
import numpy as np
import ggml_backend.quant.matmul as matmul_module
from ggml_backend.cli.bench_kernels import random_weights
from ggml_backend.quant import simd
from ggml_backend.quant.decode import KINDS

def products(shapes, tokens):
    out = {}
    for type_name in KINDS:
        rng = np.random.default_rng(KINDS[type_name])
        n_rows, k = shapes[256 if "_K" in type_name else 32]
        weights = random_weights(type_name, n_rows, k, rng)
        for n in tokens:
            x = rng.standard_normal((n, k)).astype(np.float32)
            out[f"{type_name}-{n}"] = matmul_module.matmul(type_name, weights, x, method="int")
    return out

def prompt_products(shapes, kinds, n):
    # the prompt GEMM (method="gemm"), n tokens: two register tiles of 4 and a rest, a last panel of 5 rows
    out = {}
    for type_name in kinds:
        rng = np.random.default_rng(KINDS[type_name] + 100)
        n_rows, k = shapes[256 if "_K" in type_name else 32]
        weights = random_weights(type_name, n_rows, k, rng)
        x = rng.standard_normal((n, k)).astype(np.float32)
        out[f"{type_name}-gemm-{n}"] = matmul_module.matmul(type_name, weights, x, method="gemm")
    return out
"""

# the prompt GEMM's kinds compared: no offsets, offsets per 16 and per 32 values, groups of 16 and of 32, and q8_0's
# full byte range (signed by signed bytes on the avx2 path); tokens: tiles of 4 with a rest
GEMM_KINDS = ("q4_0", "q4_1", "q8_0", "q2_K", "q4_K", "q6_K")
GEMM_TOKENS = 11


# what the compiled one-token and few-token kernels hold, by kernel and kind: vpinsrw from memory, AVX-512 (zmm
# registers, kmask registers), VEX-encoded VNNI instructions
INSERTS = r"""
import json, re
from ggml_backend.quant import decode
from ggml_backend.quant import gemm
counts = {{}}
for kernel in (decode.matvec_here, decode.matmul_few, gemm.gemm_rows):
    for signature in kernel.signatures:
        asm = kernel.inspect_asm(signature)
        counts[f"{{kernel.__name__}} {{signature[0]}}"] = {{
            "vpinsrw": len(re.findall(r"vpinsrw\s+\$\d+, -?\d*\(", asm)),
            "avx512": len(re.findall(r"%zmm\d|%k[1-7]\b", asm)),
            "vex_vnni": len(re.findall(r"\{{vex\}}\s+vpdp(busd|wssd)", asm))}}
open({!r}, "w").write(json.dumps(counts))
"""


def _products_here(tokens, gemm_isa=None, gemm_kinds=()) -> dict:
    """The AVX2 path's products compiled for this CPU; with ``gemm_isa`` also the prompt GEMM's on that path."""
    namespace: dict = {}
    exec(PRODUCTS, namespace)
    saved = matmul_module.KERNEL_ISA
    matmul_module.KERNEL_ISA = simd.AVX2
    try:
        out = namespace["products"](SHAPES, tokens)
        if gemm_isa is not None:
            matmul_module.KERNEL_ISA = gemm_isa
            out.update(namespace["prompt_products"](SHAPES, gemm_kinds, GEMM_TOKENS))
        return out
    finally:
        matmul_module.KERNEL_ISA = saved


# What each path's kernels are compiled for here: a CPU with that path's instructions and no AVX-512 (the avxvnni
# path's: an Intel Alder Lake, AVX2 with AVX-VNNI), and the tokens of its products (the avxvnni path's tiles are
# compared with the avx2 path's on this CPU by test_decode_kernels.py; one token here keeps the compile short).
TARGETS = {"avx2": ("haswell", X86_64_V3, TOKENS), "avxvnni": ("alderlake", X86_64_V3 + ",+avxvnni", (1,))}


@pytest.mark.parametrize("path", list(TARGETS))
def test_path_compiled_without_avx512_gives_the_same_numbers(tmp_path, path):
    needs = set(simd.ISAS[path].needs)
    if not needs <= simd.host_features():
        pytest.skip(reason=f"this CPU lacks {', '.join(sorted(needs - simd.host_features()))}: the {path} path "
                           "cannot run here")
    cpu, features, tokens = TARGETS[path]
    result = tmp_path / "products.npz"
    inserts = tmp_path / "vpinsrw.json"
    # the path's prompt GEMM (8-row panels) against this CPU's VNNI path (16-row panels on AVX512-VNNI) where it
    # has one: every row's groups are summed exactly and added in the same order, so the same bits
    gemm_isa = next((simd.ISAS[name] for name in ("avx512vnni", "avxvnni")
                     if set(simd.ISAS[name].needs) <= simd.host_features()), None)
    gemm_kinds = tuple(name for name in GEMM_KINDS if prompt_gemm_takes(simd.ISAS[path], KINDS[name]))
    computed = f"products({SHAPES!r}, {tokens!r})"
    if gemm_isa is not None:
        computed += f", **prompt_products({SHAPES!r}, {gemm_kinds!r}, {GEMM_TOKENS!r})"
    script = (PRODUCTS + f"np.savez({str(result)!r}, **{computed})\n" + INSERTS.format(str(inserts)))
    env = dict(os.environ, NUMBA_CPU_NAME=cpu, NUMBA_CPU_FEATURES=features, GGML_BACKEND_KERNELS=path,
               NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    theirs = np.load(result)
    ours = _products_here(tokens, gemm_isa, gemm_kinds)
    assert sorted(theirs.files) == sorted(ours)
    for name, values in ours.items():
        assert np.array_equal(theirs[name], values), name
    report = json.loads(inserts.read_text())
    # no block scale loaded by vpinsrw from memory in the one-token and few-token kernels (three slots of Zen 3's
    # two load / store-data pipes each, where a plain load takes one: simd.load_f16_pair, load_f16_8_rows); the
    # prompt GEMM unpacks a panel once for many tokens
    with_inserts = {kernel: n["vpinsrw"] for kernel, n in report.items()
                    if n["vpinsrw"] and not kernel.startswith("gemm_rows")}
    assert not with_inserts, f"kernels loading halves by vpinsrw: {with_inserts}"
    # nothing of AVX-512 (a zmm register, an EVEX-only instruction), and on the avxvnni path the VEX-encoded
    # vpdpbusd / vpdpwssd in every kind's one-token kernel
    assert not {kernel: n["avx512"] for kernel, n in report.items() if n["avx512"]}
    if gemm_isa is not None:
        assert sum(kernel.startswith("gemm_rows") for kernel in report) == len(gemm_kinds)
    if path == "avxvnni":
        without = [kernel for kernel, n in report.items()
                   if kernel.startswith(("matvec_here", "gemm_rows")) and not n["vex_vnni"]]
        assert not without, f"one-token and prompt kernels without {{vex}} vpdpbusd / vpdpwssd: {without}"
