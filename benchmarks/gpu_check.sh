#!/usr/bin/env bash
# The GPU check, one command on a machine with an NVIDIA GPU, from anywhere in the repository:
#
#     bash benchmarks/gpu_check.sh
#
# 1. builds fusedrnn (CPU + CUDA, sm_90 unless FUSEDRNN_CUDA_ARCHS says otherwise) against the
#    torch installed there; 2. runs the CUDA tests (parity with cuDNN over the CPU matrix,
#    CUDA = CPU in float64, gradcheck and opcheck on CUDA, half precision, autocast, streams,
#    torch.compile with CUDA graphs); 3. compute-sanitizer memcheck and racecheck on a small
#    forward + backward of every cell; 4. the GPU micro-benchmarks against nn.* (cuDNN), float32
#    and bfloat16; 5. writes gpu_report.{md,json} and prints a short table last.
# Reports go to $OUT when set (the device tool), else benchmarks/results/. Exit status is
# non-zero if any step failed. Target: under 8 minutes on an H100 machine with 16 cores.
set -uo pipefail
cd "$(dirname "$0")/.."
REPORT_DIR=${OUT:-benchmarks/results}
mkdir -p "$REPORT_DIR"
STEPS="$REPORT_DIR/gpu_check_steps.txt"
: > "$STEPS"
export PYTHONUNBUFFERED=1
export FUSEDRNN_CUDA=1 FUSEDRNN_CUDA_ARCHS=${FUSEDRNN_CUDA_ARCHS:-9.0} MAX_JOBS=${MAX_JOBS:-16}

step() {
  local name=$1 t0=$SECONDS
  shift
  echo "=== $name: $*"
  if "$@"; then
    echo "$name: ok ($((SECONDS - t0)) s)" | tee -a "$STEPS"
  else
    echo "$name: FAILED ($((SECONDS - t0)) s)" | tee -a "$STEPS"
  fi
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
# compute-sanitizer ships with the toolkit and is not always on PATH.
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
SANITIZER=${SANITIZER:-compute-sanitizer}
# Editable install; an older setuptools without PEP 660 support falls back to an in-place build.
step build bash -c "pip install --no-build-isolation --no-deps -q -e . || python setup.py build_ext --inplace"
python -c "import fusedrnn, torch; print(fusedrnn.backends(), torch.cuda.get_device_name())"
step cuda-tests python -m pytest -q -x -p no:cacheprovider -k cuda tests/test_cuda.py tests/test_ops.py tests/test_parity.py \
  --junitxml="$REPORT_DIR/gpu_tests.xml"
step memcheck "$SANITIZER" --tool memcheck --error-exitcode 1 python benchmarks/sanitize_cuda.py
step racecheck "$SANITIZER" --tool racecheck --error-exitcode 1 python benchmarks/sanitize_cuda.py
step bench-float32 python -m benchmarks.layers --device cuda --configs sentiment,fastrnns,skewed,small_batch \
  --reps 15 --out gpu_layers_float32 --results-dir "$REPORT_DIR"
step bench-bfloat16 python -m benchmarks.layers --device cuda --dtype bfloat16 --configs sentiment,fastrnns \
  --reps 15 --out gpu_layers_bfloat16 --results-dir "$REPORT_DIR"
python benchmarks/gpu_report.py "$REPORT_DIR"
