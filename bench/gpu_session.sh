#!/usr/bin/env bash
# The GPU runs behind the README's GPU numbers, in stages that fit one device call each.
#   bash bench/gpu_session.sh STAGE      ($OUT: where logs and results go; DECDEC_COMMIT: the commit measured)
# check:  the layer kernels, the glue folded into the GEMV and its correction, and the engine on the GPU,
#         against their CPU references
# llama:  bench/engine.py on Llama-3-8B shapes: ours beside the anchor at KV 256 / 2048 / 8192, tuned targets
# small:  the same on Gemma 3 270M and SmolLM2-135M shapes (merged into the same results file)
# gemv:   the base GEMV's GPU tests, then its default plans timed beside torch's int4 kernel (Llama, small shapes)
# lm_head: the int8 lm_head's GPU tests and memcheck, the kernel beside torch's fp16 / bf16 matmuls
#         (bench/lm_head_speed.py), then Llama-3-8B shapes: ours with the fp16 and the int8 lm_head beside the
#         int4 anchor (MODELS, POSITIONS to change what is timed)
# memcheck: compute-sanitizer over the layer kernels' and the engine's GPU tests
# Each stage runs on a bare machine: it installs the NumPy wheel that numba-cuda needs (carry .whl).
set -uo pipefail
stage=$1
export PYTHONPATH=/tmp/site:$PWD NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS=0 PYTHONUNBUFFERED=1
[ -d /tmp/site/numpy ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
kernels="tests/ops/test_norm.py tests/ops/test_attention.py"
case $stage in
check)
  DECDEC_GPU_TESTS=1 timeout 240 python -m pytest -q -x -m gpu $kernels 2>&1 | tee $OUT/kernel_tests.log | tail -4 \
    || exit 1
  DECDEC_GPU_TESTS=1 timeout 120 python -m pytest -q -x tests/ops/test_base_gemv.py tests/ops/test_correction.py \
    -k folded 2>&1 | tee $OUT/fold_tests.log | tail -2 || exit 1
  DECDEC_GPU_TESTS=1 timeout 200 python -m pytest -q -x -m gpu tests/runtime/test_engine_cuda.py -k "not on_gemma3" \
    2>&1 | tee $OUT/engine_cuda_tests.log | tail -4
  ;;
llama)
  timeout 500 python bench/engine.py --models llama3-8b --targets "${TARGETS:-0.025,0.05,0.1,0.2}" --k-chunks "${K_CHUNKS:-1,4}" \
    --out $OUT/engine.json 2>&1 | tee $OUT/engine_llama.log | grep -v "^\[" | tail -30
  ;;
small)
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -o -i -E 'h100|h200' | tr A-Z a-z)
  [ -f bench/results/engine_$gpu.json ] && cp bench/results/engine_$gpu.json $OUT/engine.json  # merged into
  timeout 400 python bench/engine.py --models gemma3-270m,smollm2-135m --targets "${TARGETS:-0.025,0.05,0.1,0.2}" --k-chunks "${K_CHUNKS:-1}" \
    --out $OUT/engine.json --merge 2>&1 | tee $OUT/engine_small.log | grep -v "^\[" | tail -30
  ;;
gemv)
  DECDEC_GPU_TESTS=1 timeout 150 python -m pytest -q -x -m gpu tests/ops/test_base_gemv.py 2>&1 \
    | tee $OUT/gemv_tests.log | tail -2
  timeout 200 python bench/gemv_variants.py --default-only --out $OUT/gemv.json \
    --shapes 28672x4096,14336x4096,6144x4096,4096x4096,4096x14336,1024x4096,1536x640,640x2048 2>&1 | tee $OUT/gemv.log
  ;;
lm_head)
  DECDEC_GPU_TESTS=1 timeout 150 python -m pytest -q -x -m gpu tests/ops/test_lm_head.py tests/runtime/test_engine_cuda.py \
    -k lm_head 2>&1 | tee $OUT/lm_head_tests.log | tail -2 || exit 1
  DECDEC_GPU_TESTS=1 timeout 60 compute-sanitizer --tool memcheck python -m pytest -q -p no:cacheprovider -m gpu \
    tests/ops/test_lm_head.py -k 49152 2>&1 | tee $OUT/memcheck_lm_head.log | grep -v cuGetProcAddress | tail -2
  timeout 120 python bench/lm_head_speed.py --out $OUT/lm_head_speed.json 2>&1 | tail -9
  timeout 420 python bench/engine.py --models "${MODELS:-llama3-8b}" --systems ours,ours-lm8,anchor-int4 \
    --positions "${POSITIONS:-256,8192}" --out $OUT/engine_lm8.json 2>&1 | tee $OUT/engine_lm8.log | grep -v "^\[" | tail -12
  ;;
memcheck)
  DECDEC_GPU_TESTS=1 timeout 300 compute-sanitizer --tool memcheck python -m pytest -q -p no:cacheprovider -m gpu \
    $kernels 2>&1 | tee $OUT/memcheck_kernels.log | grep -v cuGetProcAddress | tail -3
  ;;
*)
  echo "unknown stage $stage"; exit 2
  ;;
esac
