#!/usr/bin/env bash
# One device call: build the extension, run the GPU suite at every EP size (ranks as
# processes sharing the GPUs there are, tests/multiprocess.py), then the benchmarks.
# Logs and results go to $OUT, bundled into results.tgz beside the main logs (the device
# tool brings back at most 8 files).
# Usage (on the GPU machine, repo root): bash bench/run_gpu.sh [pytest args...]
#   TEST_RANKS=1,2,4,8  EP sizes of the suite (1: one process driving every local GPU)
#   RANK_TIMEOUT=1800   seconds each EP size may take
#   MPS=0               ranks sharing a GPU take turns by time slicing (default: concurrent
#                       under CUDA MPS where its daemon can be started)
#   SKIP_TESTS=1 / SKIP_BENCH=1 / LL_BENCH=1 / MOE_BENCH=1 / GM_BENCH=1 / CEILING=1 /
#   OVERLAP_BENCH=1 (bench/overlap_probe.py, bench/moe_layer.py --overlap --profile,
#   bench/decode_overlap.py)   what runs
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 JAX_EP_REAL_DEVICES=1
set -o pipefail
OUT=${OUT:-/tmp/jax_ep_out}
mkdir -p "$OUT/all"
PY=${PYTHON:-python3}
{ date -u '+%Y-%m-%d %H:%M:%S UTC'; git rev-parse HEAD 2>/dev/null || echo "commit unknown";
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; } |
  tee "$OUT/all/machine.txt"

t0=$(date +%s)
$PY -m pip install --no-build-isolation --no-deps -q . > "$OUT/all/build.log" 2>&1
rc=$?
echo "build rc=$rc in $(( $(date +%s) - t0 ))s" | tee -a "$OUT/all/build.log"
if [ $rc -ne 0 ]; then tail -40 "$OUT/all/build.log"; exit $rc; fi
# Tests and bench import jax_ep from the source tree: put the built extension there too.
SITE_PKG=$(cd /tmp && $PY -c "import jax_ep, os; print(os.path.dirname(jax_ep.__file__))")
cp "$SITE_PKG"/_jax_ep_ffi*.so jax_ep/
cp "$SITE_PKG"/_jax_ep_nvshmem*.so jax_ep/ 2>/dev/null || echo "built without NVSHMEM" | tee -a "$OUT/all/build.log"
$PY -c "import jax, jax_ep; print(jax.__version__, jax.devices(), jax_ep.cuda_available())" 2>&1 | tee "$OUT/all/env.txt"

rc_tests=0
if [ "${SKIP_TESTS:-0}" != "1" ]; then
  t0=$(date +%s)
  MPS_ARG=$([ "${MPS:-1}" = "0" ] && echo --no-mps)
  export JAX_EP_HLO_DIR="$OUT/all"  # tests/gpu/test_overlap_gpu.py leaves its compiled HLO
  echo "+ python -m tests.multiprocess --ranks ${TEST_RANKS:-1,2,4,8} $MPS_ARG --timeout ${RANK_TIMEOUT:-1800} -- -q -m gpu tests/gpu -rs $*" | tee "$OUT/gpu_tests.log"
  timeout ${TEST_TIMEOUT:-1500} $PY -m tests.multiprocess --ranks ${TEST_RANKS:-1,2,4,8} $MPS_ARG \
    --timeout ${RANK_TIMEOUT:-1800} --logs "$OUT/all/rank_logs" -- -q -m gpu tests/gpu -rs "$@" 2>&1 | tee -a "$OUT/gpu_tests.log"
  rc_tests=$?
  echo "tests rc=$rc_tests in $(( $(date +%s) - t0 ))s" | tee -a "$OUT/gpu_tests.log"
fi
GPUS=$(nvidia-smi -L | wc -l)
CEILING_ARGS=""
if [ "${CEILING:-0}" = "1" ] && [ "$GPUS" -ge 2 ]; then  # the NVLink rate SMs reach here
  nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -I. bench/nvlink_ceiling.cu \
    -o /tmp/nvlink_ceiling > "$OUT/all/nvlink_ceiling_build.log" 2>&1 &&
  for lc in 0 1; do
    timeout 120 /tmp/nvlink_ceiling --sms ${CEILING_SMS:-8,16,24,32,48,132} --local-copy $lc \
      > "$OUT/all/nvlink_ceiling-${GPUS}gpu-lc$lc.json" 2> "$OUT/all/nvlink_ceiling-${GPUS}gpu-lc$lc.log"
  done
  CEILING_ARGS="--ceiling $OUT/all/nvlink_ceiling-${GPUS}gpu-lc0.json,$OUT/all/nvlink_ceiling-${GPUS}gpu-lc1.json"
fi
if [ "${SKIP_BENCH:-0}" != "1" ]; then
  timeout ${BENCH_TIMEOUT:-200} $PY bench/normal.py --out "$OUT/all" $CEILING_ARGS ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_normal.log" | tail -16
fi
if [ "${LL_BENCH:-0}" = "1" ]; then
  timeout ${BENCH_TIMEOUT:-200} $PY bench/low_latency.py --out "$OUT/all" ${LL_ARGS:-} 2>&1 | tee "$OUT/bench_low_latency.log" | tail -12
fi
if [ "${GM_BENCH:-0}" = "1" ]; then
  timeout ${GM_TIMEOUT:-240} $PY bench/grouped_matmul.py --out "$OUT/all" ${GM_ARGS:-} 2>&1 | tee "$OUT/bench_grouped_matmul.log" | tail -6
fi
if [ "${MOE_BENCH:-0}" = "1" ]; then
  timeout ${MOE_TIMEOUT:-240} $PY bench/moe_layer.py --platform gpu --impls ${MOE_IMPLS:-jax_ep_cf,a2a_cf} \
    --iters 20 --warmup 1 --out "$OUT/all" ${MOE_ARGS:-} 2>&1 | tee "$OUT/bench_moe_layer.log" | tail -12
fi
if [ "${OVERLAP_BENCH:-0}" = "1" ]; then
  timeout ${BENCH_TIMEOUT:-200} $PY bench/overlap_probe.py --out "$OUT/all" 2>&1 | tee "$OUT/bench_overlap_probe.log" | tail -12
  timeout ${MOE_TIMEOUT:-240} $PY bench/moe_layer.py --platform gpu --overlap --profile \
    --iters 20 --warmup 1 --out "$OUT/all" ${MOE_ARGS:-} 2>&1 | tee "$OUT/bench_overlap_layer.log" | tail -14
  timeout ${BENCH_TIMEOUT:-200} $PY bench/decode_overlap.py --out "$OUT/all" ${DECODE_ARGS:-} 2>&1 | tee "$OUT/bench_overlap_decode.log" | tail -6
fi
(cd "$OUT" && tar czf results.tgz all && rm -rf all)
exit $rc_tests
