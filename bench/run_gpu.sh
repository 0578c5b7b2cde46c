#!/usr/bin/env bash
# One device call: build the extension, run the GPU tests, run the benchmark.
# Logs and results go to $OUT (the device tool brings them back).
# Usage (on the GPU machine, repo root): bash bench/run_gpu.sh [pytest args...]
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 JAX_EP_REAL_DEVICES=1
set -o pipefail
OUT=${OUT:-/tmp/jax_ep_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpus.txt"

t0=$(date +%s)
$PY -m pip install --no-build-isolation --no-deps -q . > "$OUT/build.log" 2>&1
rc=$?
echo "build rc=$rc in $(( $(date +%s) - t0 ))s" | tee -a "$OUT/build.log"
if [ $rc -ne 0 ]; then tail -40 "$OUT/build.log"; exit $rc; fi
# Tests and bench import jax_ep from the source tree: put the built extension there too.
SITE_PKG=$(cd /tmp && $PY -c "import jax_ep, os; print(os.path.dirname(jax_ep.__file__))")
cp "$SITE_PKG"/_jax_ep_ffi*.so jax_ep/
cp "$SITE_PKG"/_jax_ep_nvshmem*.so jax_ep/ 2>/dev/null || echo "built without NVSHMEM" | tee -a "$OUT/build.log"
$PY -c "import jax, jax_ep; print(jax.__version__, jax.devices(), jax_ep.cuda_available())" 2>&1 | tee "$OUT/env.txt"

if [ "${SKIP_TESTS:-0}" != "1" ]; then
  timeout ${TEST_TIMEOUT:-360} $PY -m pytest ${PYTEST_STOP:--x} -q -m gpu -p no:cacheprovider tests/gpu "$@" 2>&1 | tee "$OUT/gpu_tests.log" | tail -30
fi
CEILING_ARGS=""
if [ "${CEILING:-0}" = "1" ]; then  # the NVLink rate SMs reach on this machine, beside the bench
  GPUS=$(nvidia-smi -L | wc -l)
  nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -I. bench/nvlink_ceiling.cu \
    -o /tmp/nvlink_ceiling > "$OUT/nvlink_ceiling_build.log" 2>&1 &&
  for lc in 0 1; do
    timeout 120 /tmp/nvlink_ceiling --sms ${CEILING_SMS:-8,16,24,32,48,132} --local-copy $lc \
      > "$OUT/nvlink_ceiling-${GPUS}gpu-lc$lc.json" 2> "$OUT/nvlink_ceiling-${GPUS}gpu-lc$lc.log"
  done
  CEILING_ARGS="--ceiling $OUT/nvlink_ceiling-${GPUS}gpu-lc0.json,$OUT/nvlink_ceiling-${GPUS}gpu-lc1.json"
fi
if [ "${SKIP_BENCH:-0}" != "1" ]; then
  timeout ${BENCH_TIMEOUT:-200} $PY bench/normal.py --out "$OUT" $CEILING_ARGS ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -16
fi
if [ "${LL_BENCH:-0}" = "1" ]; then
  timeout ${BENCH_TIMEOUT:-200} $PY bench/low_latency.py --out "$OUT" 2>&1 | tee "$OUT/bench_low_latency.log" | tail -12
fi
if [ "${MOE_BENCH:-0}" = "1" ]; then
  timeout ${MOE_TIMEOUT:-240} $PY bench/moe_layer.py --platform gpu --impls ${MOE_IMPLS:-jax_ep_cf,a2a_cf} \
    --iters 20 --warmup 1 --out "$OUT" ${MOE_ARGS:-} 2>&1 | tee "$OUT/bench_moe_layer.log" | tail -12
fi
# The device tool brings back at most 8 files: bundle everything when asked.
if [ "${BUNDLE:-0}" = "1" ]; then
  (cd "$OUT" && tar czf /tmp/results.tgz . && find . -mindepth 1 -delete && mv /tmp/results.tgz .)
fi
