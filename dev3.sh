set -u
export PYTHONPATH=/tmp/site:$PWD NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS=0 PYTHONUNBUFFERED=1 DECDEC_COMMIT=9b67863
[ -d /tmp/site/numpy ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
T0=$(date +%s)
DECDEC_GPU_TESTS=1 timeout 110 python -m pytest -q -x -m gpu -p no:cacheprovider tests/ops/test_correction.py tests/runtime/test_engine_cuda.py -k "not on_gemma3" > $OUT/gpu_tests.log 2>&1; echo "tests rc=$? $(( $(date +%s)-T0 ))s"; tail -n 3 $OUT/gpu_tests.log
cp bench/results/engine_h100.json $OUT/engine.json
timeout 175 python bench/engine.py --models llama3-8b --systems ours,anchor-int4 --positions 256,2048 --quick --targets 0.025,0.05,0.1,0.2 --k-chunks 1,4 --out $OUT/engine.json --merge > $OUT/engine_llama.log 2>&1; echo "engine rc=$? $(( $(date +%s)-T0 ))s"; grep -v "^\[" $OUT/engine_llama.log | grep -E "llama|model" | head -20
timeout 45 python bench/fixed_cost.py --kinds qkv,down,all --n-tbs 16 --timeline --out $OUT/fixed_cost.json 2>&1 | grep -v -E "^\[|Warn|warn" > $OUT/fixed_cost.log; echo "fixed rc=$? $(( $(date +%s)-T0 ))s"
python -c "
import json,os
d=json.load(open(os.environ['OUT']+'/fixed_cost.json'))
for r in d['rows']: print(r['kinds'], r['n_tb'], round(r['base_ms'],3), round(r['step_ms'],3), f\"{r['slowdown']:+.1%}\", round(r['extra_us_per_group'],1))
for k,v in d.get('timeline_us',{}).items(): print(k, {g:{a:round(b,1) for a,b in x.items()} for g,x in v.items()})
" 2>&1 | tail -8
