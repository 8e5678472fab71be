#!/usr/bin/env python3
"""Time ``ggml-backend quantize`` beside llama.cpp's quantizer (llama_cpp.llama_model_quantize) on one f16 file.

usage: python benchmarks/bench_quantize_model.py [--layers 4] [--types Q8_0,Q4_0,Q6_K] [--threads 2] [--repeat 3]
                                                 [--dir DIR]

The input is a random-weight f16 Llama of TinyLlama-1.1B's shapes (n_embd 2048, n_ff 5632, 32 heads sharing
4 KV heads, 32,000-token vocabulary) with ``--layers`` layers (4: 0.31 B parameters, 0.63 GB), written once to
``--dir`` (default: the bench cache, ``$GGML_BACKEND_BENCH_DIR`` or ~/.cache/ggml_backend/bench). Each run is a
fresh process (imports and numba's cached kernels included, as a user pays them), both engines with ``--threads``
threads; the table shows the median wall time of ``--repeat`` alternating runs, the rate in millions of
parameters per second and each process's peak resident memory (VmHWM, read in the process itself: the file
pages it mapped count too, so this is an upper bound on what it needed). K types whose quantizer ggml_backend lacks are skipped with a note.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ggml_backend.cli.bench_models import bench_models_dir, spm_vocab  # noqa: E402
from ggml_backend.formats import load, write_gguf  # noqa: E402
from ggml_backend.tools.quant_mix import parse_file_type, plan_tensor_types  # noqa: E402

N_EMBD, N_FF, N_HEAD, N_KV, N_VOCAB = 2048, 5632, 32, 4, 32000

_OURS = """
import sys, time
sys.path.insert(0, {repo!r})
t = time.perf_counter()
from ggml_backend.tools.quantize import quantize_model
quantize_model({src!r}, {dst!r}, {ftype!r}, threads={threads})
print(time.perf_counter() - t, int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024)
"""
_LLAMA_CPP = """
import ctypes, time
t = time.perf_counter()
import llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype, p.nthread = {ftype_id}, {threads}
assert llama_cpp.llama_model_quantize({src!r}.encode(), {dst!r}.encode(), ctypes.byref(p)) == 0
print(time.perf_counter() - t, int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024)
"""


def source_model(directory: Path, n_layer: int) -> Path:
    path = directory / f"quantize-bench-f16-{n_layer}L.gguf"
    if path.is_file():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    pool = (np.random.default_rng(0).standard_normal(1 << 22) * 0.02).astype(np.float16)

    def values(shape, seed):
        n = int(np.prod(shape))

        def chunks():   # streamed: the pool rotated per tensor, 4 Mi values at a time
            start = seed * 7919 % pool.size
            done = 0
            while done < n:
                take = min(n - done, pool.size - start)
                yield pool[start:start + take]
                done, start = done + take, 0
        return chunks

    kv = N_EMBD // N_HEAD * N_KV
    layout = [("token_embd.weight", (N_VOCAB, N_EMBD)), ("output_norm.weight", (N_EMBD,)),
              ("output.weight", (N_VOCAB, N_EMBD))]
    for i in range(n_layer):
        p = f"blk.{i}."
        layout += [(p + "attn_norm.weight", (N_EMBD,)), (p + "attn_q.weight", (N_EMBD, N_EMBD)),
                   (p + "attn_k.weight", (kv, N_EMBD)), (p + "attn_v.weight", (kv, N_EMBD)),
                   (p + "attn_output.weight", (N_EMBD, N_EMBD)), (p + "ffn_norm.weight", (N_EMBD,)),
                   (p + "ffn_gate.weight", (N_FF, N_EMBD)), (p + "ffn_up.weight", (N_FF, N_EMBD)),
                   (p + "ffn_down.weight", (N_EMBD, N_FF))]
    tensors = [(name, "f32", shape, np.ones(shape, np.float32)) if len(shape) == 1 else
               (name, "f16", shape, values(shape, seed)) for seed, (name, shape) in enumerate(layout)]
    tokens, scores, types = spm_vocab(N_VOCAB)
    metadata = {"general.architecture": "llama", "general.name": "quantize-bench", "general.file_type": 1,
                "llama.context_length": 2048, "llama.embedding_length": N_EMBD, "llama.block_count": n_layer,
                "llama.feed_forward_length": N_FF, "llama.rope.dimension_count": N_EMBD // N_HEAD,
                "llama.attention.head_count": N_HEAD, "llama.attention.head_count_kv": N_KV,
                "llama.attention.layer_norm_rms_epsilon": 1e-5, "tokenizer.ggml.model": "llama",
                "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
                "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1,
                "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0}
    tmp = path.with_name(path.name + ".partial")
    write_gguf(tmp, metadata, tensors, progress=True)
    os.replace(tmp, path)
    return path


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def run(script: str) -> tuple[float, int]:
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed")
    seconds, rss = out.stdout.split()[-2:]
    return float(seconds), int(rss)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--types", default="Q8_0,Q4_0,Q6_K,Q4_K_M")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    src = source_model(args.dir or bench_models_dir(), args.layers)
    model = load(src)
    n_params = model.n_parameters
    print(f"input: {src} ({src.stat().st_size / 1e9:.2f} GB f16, {n_params / 1e9:.2f} B parameters); "
          f"{args.threads} threads; median of {args.repeat}")
    print(f"{'type':8} {'ggml_backend s':>15} {'llama.cpp s':>12} {'ratio':>6} {'ours Mparam/s':>14} "
          f"{'ours peak RSS':>14} {'llama.cpp peak RSS':>19}")
    rows = []
    for spec in args.types.split(","):
        ft = parse_file_type(spec)
        plan = plan_tensor_types(model.tensors.values(), ft, model.metadata)
        missing = sorted({p.target_type.name for p in plan if p.converted and p.target_type.quantize is None})
        if missing:
            print(f"{ft.name:8} skipped: ggml_backend has no quantizer yet for {', '.join(missing)}")
            continue
        dst = src.with_name(f"quantize-bench-out-{ft.name}.gguf")
        ours, theirs = [], []
        for _ in range(args.repeat):
            ours.append(run(_OURS.format(repo=str(REPO), src=str(src), dst=str(dst), ftype=ft.name,
                                         threads=args.threads)))
            theirs.append(run(_LLAMA_CPP.format(src=str(src), dst=str(dst) + ".llamacpp", ftype_id=ft.ftype,
                                                threads=args.threads)))
        same = file_digest(dst) == file_digest(Path(str(dst) + ".llamacpp"))
        for p in (dst, Path(str(dst) + ".llamacpp")):
            p.unlink(missing_ok=True)
        t_ours = statistics.median(s for s, _ in ours)
        t_theirs = statistics.median(s for s, _ in theirs)
        rss_ours, rss_theirs = max(r for _, r in ours), max(r for _, r in theirs)
        print(f"{ft.name:8} {t_ours:15.2f} {t_theirs:12.2f} {t_ours / t_theirs:6.1f} {n_params / t_ours / 1e6:14.0f} "
              f"{rss_ours / 2**20:11.0f} MiB {rss_theirs / 2**20:16.0f} MiB"
              f"{'' if same else '   (files differ!)'}")
        rows.append({"type": ft.name, "ours_s": t_ours, "llama_cpp_s": t_theirs, "ours_peak_rss": rss_ours,
                     "llama_cpp_peak_rss": rss_theirs, "identical_files": same, "runs_ours": ours,
                     "runs_llama_cpp": theirs})
    if args.json:
        args.json.write_text(json.dumps({"input_bytes": src.stat().st_size, "parameters": n_params,
                                         "threads": args.threads, "when": time.strftime("%Y-%m-%d %H:%M"),
                                         "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
