#!/usr/bin/env bash
# The GPU runs behind the README's GPU tables, in stages that fit one device call each (DESIGN.md §6:
# 64 MiB travel per call, so Gemma's GGUF arrives in parts, appended to /tmp/gemma.gguf, one per stage).
#   bash bench/gpu_session.sh STAGE       (STAGE: a b c d e; $OUT: where results go; DECDEC_COMMIT set)
# a: tiny-model GPU tests of the engine + tune, Llama-3-8B end to end
# b: kernel benchmarks (bench/gpu_ops.py)
# g: base GEMV: bench/gemv_variants.py --quick (large and small shapes), then the GPU tests of base_gemv + correction
# m: the kernel tests under compute-sanitizer memcheck on the GPU (tiny shapes, then real-shape GEMV tests)
# c: SmolLM2-shaped end to end, base GEMV variants
# d: (transfer only)
# e: Gemma 3 270M: sha256 of the GGUF, GPU vs CPU engine tests, end to end, then stage cli (unless NO_CLI=1)
# cli: `decdec tune`, `decdec profile`, `decdec graph` on Gemma 3 270M at a 5 % target (the GGUF already sent)
# TRANSFER_ONLY=1 bash bench/gpu_session.sh X: only append stage X's part
set -uo pipefail
stage=$1
export PYTHONPATH=/tmp/site:$PWD NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS=0 PYTHONUNBUFFERED=1
if [ ! -d /tmp/site/numpy ]; then  # NumPy 2.4.6 for numba-cuda 0.30.4 (DESIGN.md §6), once per machine
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
case $stage in a) part=.gguf/p0;; b) part=.gguf/p1;; c) part=.gguf/p2;; d) part=.gguf/p3;; e) part=.gguf/p4;; *) part=;; esac
[ -f "$part" ] && cat "$part" >> /tmp/gemma.gguf && echo "appended $part: $(stat -c %s /tmp/gemma.gguf) bytes"
[ -n "${TRANSFER_ONLY:-}" ] && exit 0  # TRANSFER_ONLY=1: append the stage's part, run nothing
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
case $stage in
a)
  DECDEC_GPU_TESTS=1 timeout 200 python -m pytest -q -x -m gpu tests/runtime/test_engine_cuda.py -k "not on_gemma3" \
    2>&1 | tee $OUT/engine_cuda_tests.log | tail -4
  timeout 330 python bench/gpu_engine.py --only llama --out $OUT/gpu_engine_llama.json 2>&1 | tee $OUT/gpu_engine_llama.log
  ;;
b)
  timeout 400 python bench/gpu_ops.py --only checks,bandwidth,gemv,correction,overlap --out $OUT/gpu_ops.json \
    2>&1 | tee $OUT/gpu_ops.log | tail -80
  ;;
g)  # ~400 s: the variants at Llama-3-8B and small-model shapes, then every base GEMV + correction test on the GPU
  timeout 240 python bench/gemv_variants.py --quick --sass --out $OUT/gemv_variants.json --shapes \
    28672x4096,14336x4096,4096x14336,6144x4096,4096x4096,1024x4096,1536x640,640x2048,3072x576,576x1536 \
    2>&1 | tee $OUT/gemv_variants.log
  DECDEC_GPU_TESTS=1 timeout 250 python -m pytest -q tests/ops/test_base_gemv.py tests/ops/test_correction.py \
    2>&1 | tee $OUT/ops_gemv_tests.log | tail -5
  ;;
m)  # ~180 s: memcheck on every kernel test of tests/ops on the GPU (tiny shapes), then real-shape GEMV tests
  DECDEC_GPU_TESTS=1 timeout 330 compute-sanitizer --tool memcheck python -m pytest -q -p no:cacheprovider tests/ops \
    -m "not gpu" 2>&1 | tee $OUT/memcheck_kernels_tiny.log | grep -v cuGetProcAddress | tail -3
  DECDEC_GPU_TESTS=1 timeout 130 compute-sanitizer --tool memcheck python -m pytest -q -p no:cacheprovider \
    tests/ops/test_base_gemv.py -m gpu -k "4096-4096 or 640-1024 or 1536-576" 2>&1 \
    | tee $OUT/memcheck_gemv_real.log | grep -v cuGetProcAddress | tail -3
  ;;
c)
  timeout 200 python bench/gpu_engine.py --only smollm --out $OUT/gpu_engine_smollm.json 2>&1 | tee $OUT/gpu_engine_smollm.log
  ;;
d)
  ;;
e)
  echo "$(cat .gguf/sha256)  /tmp/gemma.gguf" | sha256sum -c - || exit 1
  export DECDEC_GEMMA_GGUF=/tmp/gemma.gguf
  DECDEC_GPU_TESTS=1 timeout 240 python -m pytest -q -x -m gpu tests/runtime/test_engine_cuda.py \
    -k gpu_steps_equal_cpu_engine_on_gemma3 2>&1 | tee $OUT/engine_gemma_tests.log | tail -4
  timeout 200 python bench/gpu_engine.py --only gemma --gemma /tmp/gemma.gguf --out $OUT/gpu_engine_gemma.json \
    2>&1 | tee $OUT/gpu_engine_gemma.log
  [ -n "${NO_CLI:-}" ] || bash "$0" cli
  ;;
cli)  # the CLI on Gemma 3 270M at a 5 % target: tune, profile (in the replay and eager), the tuned graph
  echo "$(cat .gguf/sha256)  /tmp/gemma.gguf" | sha256sum -c - || exit 1
  cat > /tmp/gemma.yaml <<EOF
model: {source: /tmp/gemma.gguf, max_seq_len: 256}
quant: {method: rtn, bits: 3}
calibration: {tokens: 256, ctx: 128}
decdec: {target_slowdown: 0.05, device_profile: /tmp/gemma-profile.json}
artifacts: /tmp/decdec-gemma-cli
device: cuda
EOF
  timeout 120 python -m runtime.cli tune /tmp/gemma.yaml --out /tmp/gemma-profile.json 2>&1 | grep -v it/s \
    | tee $OUT/tune_gemma.log | tail -8
  timeout 150 python -m runtime.cli profile /tmp/gemma.yaml --steps 8 --eager --trace $OUT/profile_gemma_trace.json \
    2>&1 | grep -v it/s > $OUT/profile_gemma.log; tail -24 $OUT/profile_gemma.log
  timeout 150 python -m runtime.cli graph /tmp/gemma.yaml 2>&1 | grep -v it/s > $OUT/graph_gemma_tuned.log
  grep -i "round\|step:\|error" $OUT/graph_gemma_tuned.log
  ;;
esac
