#!/usr/bin/env bash
# GPU offload on an NVIDIA H200 machine with this repository, unattended, in under 10 minutes (every step is
# time-boxed). Written for the project's device runner, whose machines are offline: nothing is installed from a
# registry; the image's python3 with its numpy, numba and numba-cuda is used (extra wheels, if any, are taken from
# .gpu/wheels). The real models' files (0.5 and 0.25 GB) cannot travel to such a machine, so their *shape clones*
# are measured: the same metadata, tokenizer, tensor names, types and shapes, random weights
# (ggml_backend.cli.bench_models.write_shape_clone), written there from the headers in .gpu/ (not in git; made on a
# machine that has the models by the command below, and carried along: the runner's `carry: [".gpu"]`).
#
#   0. versions, nvidia-smi, numba.cuda's view of the device;
#   1. model files written in the background (the shape clones, the 7B / 13B-shaped synthetic q4_0 Llamas), and the
#      CPU kernels the tests' references need compiled beside them;
#   2. benchmarks/gpu_probe.py: launch and allocation costs from Python, attention and each mat-vec kernel alone
#      (old against new), an eager decode step's per-kernel profile and a graph step's replay against its wall
#      time, CUDA-graph capture of numba launches;
#   3. tests/test_cuda_sim.py on the device (GGML_BACKEND_TEST_CUDA=1), the shape clones included (every layer
#      offloaded against the CPU path): before the benchmark, whose figures mean nothing if a kernel is wrong;
#   4. decode benchmarks, every layer on the GPU (benchmarks/bench_gpu.py): tokens/s and GB/s of weights read
#      against the H200's 4.8 TB/s, decode steps replayed as CUDA graphs and (--eager-too) launched one by one.
#
# Usage: bash benchmarks/gpu_h200.sh [RESULTS_DIR]   (default: $OUT when set, else ./gpu-results). The summary is in
# summary.txt there. SKIP_PROBE=1 / SKIP_BENCH=1 / SKIP_TESTS=1 leave steps out; TESTS_K="..." runs the tests that
# pytest -k selects; PROBE_S / BENCH_S / TESTS_S set the steps' time boxes (150, 300, 240 s).
# Headers (on a machine that has the models): python -c "from ggml_backend.cli.bench_models import
# write_shape_header as w; from ggml_backend.default_model import default_model_path as q, gemma_model_path as g;
# w(q(), '.gpu/qwen2.5-coder-0.5b-q4_k_m.header.gguf'); w(g(), '.gpu/gemma3-270m-q4_k_m.header.gguf')"
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
RESULTS=${1:-${OUT:-$ROOT/gpu-results}}
mkdir -p "$RESULTS"
# the device runner brings back at most 8 files: the step logs go to $LOGS, packed into $RESULTS/logs.tgz after
# each step; summary.txt, tests.log and the JSON files stay beside it
LOGS=${LOGS:-/tmp/gpu-logs}
mkdir -p "$LOGS"
pack() { tar czf "$RESULTS/logs.tgz" -C "$(dirname "$LOGS")" "$(basename "$LOGS")" 2>/dev/null; }
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export GGML_BACKEND_BENCH_DIR=${GGML_BACKEND_BENCH_DIR:-/tmp/ggml_backend_bench}
mkdir -p "$GGML_BACKEND_BENCH_DIR"
START=$(date +%s)
log() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$RESULTS/summary.txt"; }

# --- 0. the machine ------------------------------------------------------------------------------------------
log "gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1)"
log "cpu: $(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2) x $(nproc)"
if ls .gpu/wheels/*.whl > /dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/wheels/*.whl \
        > "$LOGS/wheels.log" 2>&1 && export PYTHONPATH="$PYTHONPATH:/tmp/site"
    log "wheels from .gpu/wheels: $(ls .gpu/wheels | tr '\n' ' ')"
fi
timeout 60 $PY - > "$LOGS/cuda-detect.txt" 2>&1 <<'EOF'
import sys, numpy, numba
print("python", sys.version.split()[0], "numpy", numpy.__version__, "numba", numba.__version__)
try:
    from importlib.metadata import version
    print("numba-cuda", version("numba-cuda"))
except Exception as exc:
    print("numba-cuda version unknown:", exc)
from ggml_backend.cuda.runtime import cuda_status, import_cuda
print("CUDA:", cuda_status())
cuda = import_cuda()
if cuda is not None:
    print("numba.cuda from", cuda.__file__)
    cuda.detect()
EOF
log "$(head -3 "$LOGS/cuda-detect.txt" | tr '\n' ' ')"

# --- 1. model files, in the background ----------------------------------------------------------------------
CLONES=""
for header in .gpu/*.header.gguf; do
    [ -e "$header" ] || continue
    CLONES="$CLONES${CLONES:+,}$GGML_BACKEND_BENCH_DIR/$(basename "$header" .header.gguf)-clone.gguf"
done
(
    timeout 150 $PY - "$CLONES" <<'EOF'
import sys, time
from pathlib import Path
from ggml_backend.cli.bench_models import synthetic_model, write_shape_clone
for clone in filter(None, sys.argv[1].split(",")):
    t0 = time.time()
    header = Path(".gpu") / Path(clone).name.replace("-clone.gguf", ".header.gguf")
    write_shape_clone(header, clone)
    print(f"{clone}: {time.time() - t0:.1f} s", flush=True)
for shape in ("7b", "13b"):
    t0 = time.time()
    print(f"{synthetic_model(shape, 'q4_0')}: {time.time() - t0:.1f} s", flush=True)
EOF
) > "$LOGS/models.log" 2>&1 &
MODELS_PID=$!
# numba compiles the CPU kernels at their first use on this CPU (about a minute for a model's types); the tests'
# CPU references then find them in numba's cache. Each clone once it is written.
(
    for clone in ${CLONES//,/ }; do
        for _ in $(seq 150); do [ -e "$clone" ] && break; sleep 1; done
        timeout 200 $PY -c "
import sys, time
from ggml_backend import Llama
t0 = time.time()
llm = Llama(sys.argv[1], n_ctx=128, verbose=False)
llm.eval([1] + list(range(100, 159)))
llm.eval(list(range(200, 208)))
llm.eval([5])
print(f'CPU kernels compiled for {sys.argv[1]}: {time.time() - t0:.1f} s')
" "$clone"
    done
) > "$LOGS/cpu-warmup.log" 2>&1 &
WARMUP_PID=$!

# --- 2. probe ------------------------------------------------------------------------------------------------
if [ -z "${SKIP_PROBE:-}" ]; then
    log "gpu_probe.py (at most ${PROBE_S:-150} s)"
    timeout ${PROBE_S:-150} $PY benchmarks/gpu_probe.py --json "$RESULTS/probe.json" > "$LOGS/probe.txt" 2>&1
    log "  exit $?"; grep -v -E "Warning|warn\(" "$LOGS/probe.txt" | tail -40 | tee -a "$RESULTS/summary.txt"; pack
fi
wait "$MODELS_PID"
log "models written: $(tr '\n' ';' < "$LOGS/models.log")"; pack

# --- 3. tests on the device ---------------------------------------------------------------------------------
if [ -z "${SKIP_TESTS:-}" ]; then
    wait "$WARMUP_PID"; log "$(tr '\n' ';' < "$LOGS/cpu-warmup.log")"
    log "tests/test_cuda_sim.py on the GPU (at most ${TESTS_S:-240} s)"
    GGML_BACKEND_TEST_CUDA=1 GGML_BACKEND_TEST_CUDA_MODELS="$CLONES" timeout ${TESTS_S:-240} $PY -m pytest -q \
        -p no:cacheprovider -v -rsP -n 8 ${TESTS_K:+-k "$TESTS_K"} tests/test_cuda_sim.py > "$RESULTS/tests.log" 2>&1
    log "  exit $?: $(tail -1 "$RESULTS/tests.log")"
    grep -E "max \|GPU - CPU\||FAILED|Error" "$RESULTS/tests.log" | sort -u | head -40 | tee -a "$RESULTS/summary.txt"
fi
# --- 4. decode benchmarks -----------------------------------------------------------------------------------
if [ -z "${SKIP_BENCH:-}" ]; then
    log "bench_gpu.py, -ngl -1, with and without CUDA graphs (at most ${BENCH_S:-300} s)"
    timeout ${BENCH_S:-300} $PY benchmarks/bench_gpu.py --models "$CLONES${CLONES:+,}7b-q4_0,13b-q4_0" --timeout 80 \
        --eager-too --prompt 256 \
        --json "$RESULTS/bench-ggml_backend.json" > "$LOGS/bench.txt" 2>&1
    log "  exit $?"; tee -a "$RESULTS/summary.txt" < "$LOGS/bench.txt"; pack
fi

pack; log "done; results in $RESULTS"
