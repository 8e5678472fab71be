#!/usr/bin/env bash
# GPU offload (issue 17) on a fresh NVIDIA H200 machine with this repository, unattended, in under 10 minutes
# (every step is time-boxed; the boxes add up to about 9.5 minutes):
#
#   1. install the cuda extra (numba-cuda + CUDA 12 runtime wheels; time-boxed: an offline machine keeps the
#      numba.cuda it has) and, in the background, llama-cpp-python built with CUDA into a folder of its own
#      (time-boxed and optional: the comparison column stays empty when it does not build in time);
#   2. the kernel and end-to-end tests of tests/test_cuda_sim.py on the real device (GGML_BACKEND_TEST_CUDA=1, no
#      simulator), which on a GPU also check the real models (Qwen2.5-Coder-0.5B, Gemma 3 270M) against
#      llama.cpp's outputs by tests/test_engine_real.py's criteria;
#   3. decode benchmarks, every layer on the GPU: the 0.5B model and 7B / 13B-shaped synthetic q4_0 Llamas (written
#      by our GGUF writer), tokens/s and GB/s of weights read against the H200's 4.8 TB/s; then the same with
#      llama.cpp (CUDA) when it built.
#
# Usage: bash benchmarks/gpu_h200.sh [RESULTS_DIR]      (default: ./gpu-results; $OUT when set, as on the
# project's device runner). Every step's output is kept there, the summary in summary.txt. SKIP_INSTALL=1 and
# SKIP_LLAMA_CPP=1 leave out step 1's installs (a rerun on the same machine); SKIP_TESTS=1 / SKIP_BENCH=1 leave
# out steps 2 / 3 (two shorter runs instead of one).
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
RESULTS=${1:-${OUT:-$ROOT/gpu-results}}
mkdir -p "$RESULTS"
export PYTHONPATH="$ROOT:$ROOT/integrations/langchain:$ROOT/integrations/gradio${PYTHONPATH:+:$PYTHONPATH}"
export GGML_BACKEND_BENCH_DIR=${GGML_BACKEND_BENCH_DIR:-/tmp/ggml_backend_bench}
START=$(date +%s)
log() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$RESULTS/summary.txt"; }

log "machine: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'nvidia-smi not found')"
nvidia-smi > "$RESULTS/nvidia-smi.txt" 2>&1

# --- 1. install ---------------------------------------------------------------------------------------------
if [ -n "${SKIP_INSTALL:-}" ]; then
    log "SKIP_INSTALL: using what is installed"
elif timeout 90 python -m pip install -q --retries 0 --timeout 10 -e ".[cuda]" > "$RESULTS/pip-cuda.log" 2>&1; then
    log "pip install -e .[cuda]: installed"
else
    log "pip install -e .[cuda] failed or timed out after 90 s (offline?): using what is installed (pip-cuda.log)"
fi
python - > "$RESULTS/cuda-detect.txt" 2>&1 <<'EOF'
from ggml_backend.cuda.runtime import cuda_status, import_cuda
status = cuda_status()
print("CUDA:", status)
cuda = import_cuda()
if cuda is not None and status.available:
    print("numba.cuda from", cuda.__file__)
    cuda.detect()
EOF
log "$(head -2 "$RESULTS/cuda-detect.txt" | tr '\n' ' ')"

LLAMA_CUDA="$RESULTS/llama_cpp_cuda"
(
    [ -n "${SKIP_LLAMA_CPP:-}" ] && exit 0
    # sm_90 only (H200): a build for every architecture would not finish in time
    CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90" CMAKE_BUILD_PARALLEL_LEVEL=14 \
        timeout 300 python -m pip install -q --retries 0 --timeout 10 --no-deps --no-cache-dir \
        --no-binary llama-cpp-python \
        --target "$LLAMA_CUDA" "llama-cpp-python==0.3.36" > "$RESULTS/llama-cpp-cuda-build.log" 2>&1 \
        && touch "$LLAMA_CUDA.ok"
) &
BUILD_PID=$!

# --- 2. tests on the device ---------------------------------------------------------------------------------
if [ -z "${SKIP_TESTS:-}" ]; then
    log "tests/test_cuda_sim.py on the GPU (at most 180 s)"
    GGML_BACKEND_TEST_CUDA=1 timeout 180 python -m pytest -q -s -p no:cacheprovider -rs tests/test_cuda_sim.py \
        > "$RESULTS/tests.log" 2>&1
    log "  exit $?: $(tail -1 "$RESULTS/tests.log")"
    grep -E "max \|GPU - CPU\|" "$RESULTS/tests.log" | sort -u | tee -a "$RESULTS/summary.txt"
fi

# --- 3. decode benchmarks -----------------------------------------------------------------------------------
if [ -z "${SKIP_BENCH:-}" ]; then
    log "ours, -ngl -1 (at most 210 s)"
    timeout 210 python benchmarks/bench_gpu.py --models 0.5b,7b-q4_0,13b-q4_0 --timeout 100 \
        --json "$RESULTS/bench-ggml_backend.json" 2>&1 | tee "$RESULTS/bench-ggml_backend.txt" \
        | tee -a "$RESULTS/summary.txt"
fi

log "waiting for the llama.cpp CUDA build (its own 300 s box from the start)"
wait "$BUILD_PID"
if [ -e "$LLAMA_CUDA.ok" ] && [ -z "${SKIP_BENCH:-}" ]; then
    log "llama.cpp (CUDA), -ngl -1 (at most 80 s)"
    PYTHONPATH="$LLAMA_CUDA:$PYTHONPATH" timeout 80 python benchmarks/bench_gpu.py --engine llama.cpp \
        --models 0.5b,7b-q4_0,13b-q4_0 --timeout 40 --json "$RESULTS/bench-llama.cpp.json" 2>&1 \
        | tee "$RESULTS/bench-llama.cpp.txt" | tee -a "$RESULTS/summary.txt"
else
    log "no llama.cpp (CUDA) comparison: not built in time or skipped (see llama-cpp-cuda-build.log)"
fi
log "done; results in $RESULTS"
