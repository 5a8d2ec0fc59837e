#!/usr/bin/env bash
# The GPU check of issue 15 in one run (about 6-8 minutes on one H100/H200; needs nothing but pip):
#   1. the kernel and decode tests, compiled for the GPU (not in Triton's interpreter);
#   2. bench_kernels: Pixtral-Large's four linear shapes at 2/3/4/8 bits and EXL3 at K = 2/3/4 (rows "e2".."e4"),
#      batch 1 and 16: ms, GB/s, fraction of the GPU's spec bandwidth, next to a 16-bit torch matmul;
#   3. bench_decode: a 4-layer model of Pixtral-Large's width at 3.0 bpw, eager and CUDA-graph decode tokens/s,
#      projected to 88 layers with the roofline fraction; and the ops launched per layer per decoded token;
#   4. bench_exl3_encode: the EXL3 trellis encoder (its Viterbi kernel) on a 2048 x 2048 matrix at K = 2/3/4: seconds
#      per million weights and the projection to Pixtral-Large's decoder, then exl3_encode_projection: the same
#      projection computed from the kernel's sm_90 SASS without running it (issue bound), to set beside it;
#   5. bench_quantize_speed: one random decoder layer at Pixtral-Large's widths quantized --bits 4 and --bpw 3.0
#      (both formats) on the GPU, 32 x 2048 calibration tokens: seconds per layer (x 88 for the whole model) next to
#      --dry-run's estimate.
# Everything goes to one results file (default gpu_check_results.txt) as well as the terminal.
# --dry runs the same steps at CPU scale (interpreter correctness pass, tiny model): what CI can check without a
# GPU (tests/test_gpu_check.py runs it).
# Usage: benchmarks/gpu_check.sh [--dry] [--no-install] [RESULTS_FILE]
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
INSTALL=1
OUT=gpu_check_results.txt
for arg in "$@"; do
  case "$arg" in
    --dry) DRY=1 ;;
    --no-install) INSTALL=0 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    -*) echo "error: unknown option $arg" >&2; exit 2 ;;
    *) OUT="$arg" ;;
  esac
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
exec > >(tee "$OUT") 2>&1
FAILED=()

step() {  # step NAME SECONDS COMMAND...: run with a time limit, record a failure, carry on
  local name=$1 limit=$2
  shift 2
  echo
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@"
  local rc=$?
  echo "--- $name: exit $rc in $((SECONDS - t0))s"
  [ "$rc" -eq 0 ] || FAILED+=("$name (exit $rc)")
}

echo "quantkit gpu_check $([ $DRY = 1 ] && echo '--dry ')at $(date -u '+%Y-%m-%d %H:%M:%S UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
if [ $DRY = 0 ]; then
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader || FAILED+=("nvidia-smi")
  if [ $INSTALL = 1 ]; then  # keeps the machine's CUDA torch: pip only adds what is missing
    step install 240 "$PY" -m pip install -q -e ".[test]"
  fi
fi
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.is_available())"

if [ $DRY = 1 ]; then
  step tests 300 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_kernels.py tests/test_decode.py \
    -k "gemv_many_rows or config_selection or static_decode or sampling or fused_triton"
  step bench_kernels 300 "$PY" benchmarks/bench_kernels.py --bits 2 3 4 8 --exl3 2 3 4
  step bench_decode 300 "$PY" benchmarks/bench_decode.py --dry
  step launch_count 300 "$PY" benchmarks/bench_decode.py --dry --count --backend torch --modes eager
  step exl3_projection 120 "$PY" benchmarks/exl3_encode_projection.py --k 2,3,4 --book 3inst
else
  step tests 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_decode.py tests/test_exl3.py
  step bench_kernels 200 "$PY" benchmarks/bench_kernels.py --bits 2 3 4 8 --exl3 2 3 4 --batch 1 16
  step bench_kernels_graphs 60 "$PY" benchmarks/bench_kernels.py --bits 3 4 --batch 1 --graphs
  step bench_decode 150 "$PY" benchmarks/bench_decode.py --layers 4 --bpw 3.0 --modes eager graph
  step bench_decode_fixup 90 "$PY" benchmarks/bench_decode.py --layers 4 --bpw 3.0 --modes graph --reduce fixup
  step launch_count 60 "$PY" benchmarks/bench_decode.py --count --layers 2 --modes eager static  # graph: = static
  step exl3_encode 300 "$PY" benchmarks/bench_exl3_encode.py --device cuda --size 2048
  step exl3_projection 120 "$PY" benchmarks/exl3_encode_projection.py --k 2,3,4 --book 3inst
  step quantize_speed 420 "$PY" benchmarks/bench_quantize_speed.py --models pixtral-large-layer --rows 32 \
    --seq-len 2048 --work /tmp/gpu-check-quantize
fi

echo
if [ ${#FAILED[@]} -eq 0 ]; then
  echo "gpu_check: all steps passed; results in $OUT"
  exit 0
fi
echo "gpu_check: FAILED: ${FAILED[*]}; results in $OUT"
exit 1
