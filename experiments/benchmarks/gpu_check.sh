#!/usr/bin/env bash
# One prepared GPU check, under 8 minutes on one NVIDIA GPU where JAX with CUDA is installed and
# nothing can be installed from outside: sampler and train-step throughput of Qwen3-0.6B- and
# Qwen3-1.7B-shaped random weights in bf16, with the HBM roofline share of decoding, the train
# step's MFU and the guided/unguided sampling time ratio (experiments/benchmarks/utilization.py).
#
#   bash experiments/benchmarks/gpu_check.sh [OUT_DIR]     # on the GPU machine, from the repo root
#   bash experiments/benchmarks/gpu_check.sh --dry         # the same steps on tiny shapes, any device
#
# The package's own imports are the only Python requirement beyond JAX; when ml_collections is
# missing, wheels in .whl/ (if present) are installed into a private directory first. Each model
# has its own time limit, and a train step that runs out of memory is retried with remat, so one
# failure does not cost the others. Everything printed is also written to OUT_DIR/gpu_check.log.
set -uo pipefail

cd "$(dirname "$0")/../.."
DRY=0
OUT_DIR=${OUT:-/tmp/gpu_check}
for arg in "$@"; do
  case "$arg" in
    --dry) DRY=1 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option '$arg'; use --dry or an output directory" >&2; exit 2 ;;
    *) OUT_DIR=$arg ;;
  esac
done
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
# Compilation, not running, is most of a case's time on a GPU (each layer of the unrolled model is
# its own code, and GEMM autotuning times every distinct shape): cuBLAS's own choice of algorithm
# keeps large bf16 matmuls near peak and cuts compile time several-fold. Set XLA_FLAGS to override.
[ "$DRY" = 1 ] || export XLA_FLAGS=${XLA_FLAGS:---xla_gpu_autotune_level=0 --xla_gpu_enable_triton_gemm=false}

if ! "$PYTHON" -c "import ml_collections" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/gpu_check_site"
fi

{
  echo "== gpu_check $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$PYTHON" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
  echo "XLA_FLAGS=${XLA_FLAGS:-}"
} 2>&1 | tee "$LOG"

# name, time limit (s), utilization.py arguments
if [ "$DRY" = 1 ]; then
  CASES=("tiny|240|--model tiny --rows 16 --prompt-len 16 --new-tokens 16 --guide-len 8 --repeats 1 --matmul-size 256 --bandwidth-mib 16")
else
  SHAPE="--dtype bfloat16 --rows 64 --prompt-len 256 --new-tokens 512 --guide-len 128 --micro-batch 16 --repeats 3"
  # The 1.7B shape first: its MFU and decode roofline are the acceptance figures.
  CASES=("qwen3-1.7b|300|--model qwen3-1.7b $SHAPE" "qwen3-0.6b|150|--model qwen3-0.6b $SHAPE")
fi

status=0
for case in "${CASES[@]}"; do
  IFS='|' read -r name limit arguments <<<"$case"
  echo "== $name: utilization.py $arguments" | tee -a "$LOG"
  start=$SECONDS
  # shellcheck disable=SC2086
  timeout "$limit" "$PYTHON" experiments/benchmarks/utilization.py $arguments 2>&1 | tee "$OUT_DIR/$name.log"
  code=${PIPESTATUS[0]}
  cat "$OUT_DIR/$name.log" >>"$LOG"
  if [ "$code" != 0 ] && grep -q "RESOURCE_EXHAUSTED\|out of memory" "$OUT_DIR/$name.log"; then
    echo "== $name: out of memory; again with --remat, train step only" | tee -a "$LOG"
    # shellcheck disable=SC2086
    timeout "$limit" "$PYTHON" experiments/benchmarks/utilization.py $arguments --remat --skip decode 2>&1 | tee -a "$LOG"
    code=${PIPESTATUS[0]}
  fi
  [ "$code" = 124 ] && echo "== $name: stopped at its ${limit} s limit" | tee -a "$LOG"
  echo "== $name: exit $code after $((SECONDS - start)) s" | tee -a "$LOG"
  [ "$code" = 0 ] || status=1
done
echo "== summary" | tee -a "$LOG"
grep -E "^(model|matmul peak|train-step MFU|decode memory roofline|decode floor share|  guided)" "$LOG" | tee "$OUT_DIR/gpu_check_summary.txt"
exit $status
