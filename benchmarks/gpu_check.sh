#!/usr/bin/env bash
# The GPU check: on a bare H200 machine with no network, install mdlm-ctc from this working tree
# (CUDA kernels included), run the GPU tests, run the GPU benchmark rows (G1-G4 of SPEC §6) with
# every provider present, and print a compact report. Results land in benchmarks/results/ and, when
# $OUT is set (the device tool's output folder), are copied there too.
#
#   bash benchmarks/gpu_check.sh            # the real check (about 6 minutes)
#   bash benchmarks/gpu_check.sh --smoke    # the same steps at toy sizes, runnable on a CPU machine
#
# Every step has its own time limit, so one slow step cannot eat the whole budget; a failed step is
# reported and the next one still runs. Exit status: number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
PY=${PYTHON:-python3}
if [ -n "${OUT:-}" ]; then LOGS=$OUT/logs; elif [ $SMOKE -eq 1 ]; then LOGS=$(mktemp -d); else LOGS=$ROOT/benchmarks/results/gpu_check_logs; fi
mkdir -p "$LOGS"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export MDLM_CTC_CUDA_ARCHS=${MDLM_CTC_CUDA_ARCHS:-90}
export PYTHONUNBUFFERED=1
failed=0
summary=()

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "== [$name] (limit ${limit}s) $*"
  timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  local took=$((SECONDS - t0))
  tail -n 25 "$LOGS/$name.log"
  if [ $rc -eq 0 ]; then
    summary+=("ok     $name (${took}s)")
  else
    summary+=("FAILED $name (rc=$rc, ${took}s; log: $LOGS/$name.log)")
    failed=$((failed + 1))
  fi
}

echo "== machine"
"$PY" - <<'PYEOF'
import torch, platform
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
try:
    import triton; print("triton", triton.__version__)
except ImportError:
    print("triton: not importable")
PYEOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv

# The tests need pytest and hypothesis, which a bare GPU machine may lack and cannot download: carry a
# wheelhouse made beforehand (`pip download -d wheelhouse pytest hypothesis`; the device tool's
# `carry`), and it is installed from there.
if ! "$PY" -c "import pytest, hypothesis" 2>/dev/null; then
  step test_deps 120 "$PY" -m pip install --no-index --find-links "${WHEELHOUSE:-$ROOT/wheelhouse}" pytest hypothesis
fi

if [ $SMOKE -eq 1 ]; then
  # the package is already installed on a development machine; only check that it imports
  step install 120 "$PY" -c "import mdlm_ctc; print(mdlm_ctc.available_backends())"
else
  # no network: no build isolation, no dependency resolution, nothing from an index. The CUDA
  # kernels are required (MDLM_CTC_BUILD=cuda fails loudly); if that build fails, install the Python
  # package alone and compile the kernels with ninja at first use (MDLM_CTC_JIT=1).
  step install 420 env MDLM_CTC_BUILD=cuda "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
  if [ $failed -gt 0 ]; then
    echo "AOT build failed; falling back to the JIT build"
    failed=0
    step install_jit 120 env MDLM_CTC_BUILD=none "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
    export MDLM_CTC_JIT=1
  fi
  step backends 300 "$PY" -c "import mdlm_ctc; b = mdlm_ctc.available_backends('cuda'); print(b); assert 'cuda' in b and 'triton' in b, b"
fi

if [ $SMOKE -eq 1 ]; then
  step gpu_tests 300 "$PY" -m pytest -q -m gpu tests
  step static_cuda 300 "$PY" benchmarks/static_cuda.py --shapes G1 --dtypes fp32 --out "$LOGS/static_cuda.md"
  step bench_slack_ctc 300 "$PY" benchmarks/bench_slack_ctc.py --smoke
  [ -f benchmarks/bench_linear_slack_ctc.py ] && step bench_linear 300 "$PY" benchmarks/bench_linear_slack_ctc.py --smoke
else
  step gpu_tests 240 "$PY" -m pytest -q -x -m gpu tests
  # the Triton tests written at GPU block sizes, compiled this time (no interpreter), and band_bound
  step triton_gpu_shaped 180 "$PY" -m pytest -q -x tests/test_triton_gpu_shaped.py tests/test_band_bound.py
  # the CUDA lattice's static cost (SASS per warp-step of each plan) of the very commit measured here
  step static_cuda 180 "$PY" benchmarks/static_cuda.py
  step bench_slack_ctc 300 "$PY" benchmarks/bench_slack_ctc.py --suite gpu --repeats 20 --record
  step bench_sweep 120 "$PY" benchmarks/bench_slack_ctc.py --suite sweep --repeats 10 --record
  [ -f benchmarks/bench_linear_slack_ctc.py ] && step bench_linear 300 "$PY" benchmarks/bench_linear_slack_ctc.py --workloads G4 --chunk-size default 512 2048 --record
fi

if [ -n "${OUT:-}" ] && [ $SMOKE -eq 0 ]; then
  cp -r benchmarks/results/. "$OUT/results/" 2>/dev/null || { mkdir -p "$OUT/results" && cp -r benchmarks/results/. "$OUT/results/"; }
fi

echo
echo "== gpu_check summary"
for line in "${summary[@]}"; do echo "  $line"; done
for f in benchmarks/results/slack_ctc_gpu_latest.md benchmarks/results/linear_slack_ctc_latest.md benchmarks/results/static_cuda.md; do
  [ -f "$f" ] && [ $SMOKE -eq 0 ] && { echo; cat "$f"; }
done
exit $failed
