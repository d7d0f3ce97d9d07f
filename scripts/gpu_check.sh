#!/usr/bin/env bash
# One command for a lent GPU machine (Python 3.12, torch 2.11, no package index): install what it
# lacks from .gpu/wheels, then run the checks that need a GPU, each part under its own timeout,
# and write one JSON line per part to $OUT/gpu_check.jsonl (or the folder given as an argument),
# also for a part that failed, timed out or was skipped for lack of time.
#
#   scripts/gpu_check.sh --first [OUTDIR]    the first call on a fresh GPU (~7 min on an H100,
#                                            installs included): preflight, the CUDA test tier,
#                                            English T3 original vs every step variant, engine N=1,8
#   scripts/gpu_check.sh --second [OUTDIR]   what --first leaves out (~9 min): Multilingual and
#                                            Turbo T3, engine N=1..16, end to end, stream, quality
#   scripts/gpu_check.sh --cpu [OUTDIR]      the same parts on this CPU at tiny sizes (CI runs it)
#   scripts/gpu_check.sh --first --dry-run   print what would run, with each part's time limit
#
# Before a GPU session, here:  mkdir -p .gpu/wheels && cp ../shared/gpu-wheels/*.whl .gpu/wheels/
# (.gpu/ is git-ignored; the device already has pytest, pytest-timeout and xdist: carry no pytest)
# then on the device:  run(command="bash scripts/gpu_check.sh --first", carry=[".gpu"], timeout_s=560)
# Every JSON line of a benchmark part records what ran: applied, fallbacks, run-time events and
# CUDA graphs captured, so a silent fallback never reads as "the GPU is slow".
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
MODE=first; DRY=0; OUTDIR="${OUT:-$ROOT/out}"
for arg in "$@"; do
  case "$arg" in
    --first) MODE=first ;;
    --second) MODE=second ;;
    --cpu) MODE=cpu ;;
    --dry-run) DRY=1 ;;
    -h|--help) sed -n 2,20p "$0"; exit 0 ;;
    -*) echo "unknown option $arg (see --help)" >&2; exit 2 ;;
    *) OUTDIR="$arg" ;;
  esac
done
# The whole run's deadline: the device's per-command limit is 600 s, and a part killed by it
# leaves no line. Parts get what is left, up to their own limit.
case "$MODE" in first) BUDGET=${GPU_CHECK_BUDGET:-480} ;; second) BUDGET=${GPU_CHECK_BUDGET:-540} ;; *) BUDGET=${GPU_CHECK_BUDGET:-1500} ;; esac
mkdir -p "$OUTDIR"
RESULTS="$OUTDIR/gpu_check.jsonl"
: > "$RESULTS"
export HF_HUB_OFFLINE=1 TQDM_DISABLE=1 PYTHONUNBUFFERED=1
cd "$ROOT"
START=$(date +%s)
FAILED=0
PY=python3

say() { echo "[gpu_check $MODE $(( $(date +%s) - START ))s] $*" >&2; }

# record NAME OK RC SECONDS [JSON]: append one line to the results (the part's own JSON line
# merged with its outcome, or the outcome alone).
record() {
  "$PY" - "$@" >> "$RESULTS" <<'PY'
import json, sys
name, ok, rc, seconds = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
line = {}
if len(sys.argv) > 5 and sys.argv[5]:
    try:
        line = json.loads(sys.argv[5])
    except ValueError:
        line = {"unparsed": sys.argv[5][:500]}
line.update(part=name, ok=ok, rc=rc, part_seconds=seconds)
if rc in (124, 137):
    line["timed_out"] = True
if not ok:
    line["log"] = name + ".log"
print(json.dumps(line))
PY
}

# part NAME LIMIT CMD...: run CMD under `timeout` (LIMIT seconds, or what is left of the budget),
# its stdout to NAME.log.out and stderr to NAME.log; record its last JSON line and outcome.
part() {
  local name="$1" limit="$2"; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  [ "$limit" -gt "$left" ] && limit=$left
  say "$name (limit ${limit}s): $*"
  if [ "$DRY" = 1 ]; then return 0; fi
  if [ "$left" -lt 20 ]; then
    echo "{\"part\": \"$name\", \"ok\": false, \"skipped\": \"no time left in the ${BUDGET}s budget\"}" >> "$RESULTS"
    FAILED=$((FAILED + 1)); say "$name skipped: no time left"; return 0
  fi
  local log="$OUTDIR/$name.log" t0=$(date +%s) rc
  timeout -k 10 "$limit" "$@" > "$log.out" 2> "$log"
  rc=$?
  local last; last=$(grep '^{' "$log.out" | tail -1)
  if [ "$rc" = 0 ] && [ -n "$last" ]; then
    record "$name" 1 "$rc" "$(( $(date +%s) - t0 ))" "$last"
  else
    FAILED=$((FAILED + 1))
    record "$name" 0 "$rc" "$(( $(date +%s) - t0 ))" "$last"
    say "$name FAILED (rc $rc); last lines of its log:"; tail -5 "$log" >&2
  fi
  return "$rc"
}

finish() {
  say "done in $(( $(date +%s) - START )) s, $FAILED part(s) failed; results: $RESULTS"
  [ "$DRY" = 1 ] || cat "$RESULTS"
  # On a GPU every part's outcome is in the results (a failure is a figure too); on the CPU (CI)
  # a failing part fails the run, so the script cannot rot before a GPU is lent.
  [ "$MODE" = cpu ] && [ "$FAILED" -gt 0 ] && exit 1
  exit 0
}

# Tests source the script with GPU_CHECK_LIB=1 to call part/record alone.
[ "${GPU_CHECK_LIB:-0}" = 1 ] && return 0

# ---- set-up ----------------------------------------------------------------------------------
if [ "$MODE" = cpu ]; then
  source "$ROOT/scripts/setup_env.sh"   # the project virtualenv (CI has just made it)
  PY=python; DEVICE=cpu
else
  DEVICE=cuda
  WHEELS="$ROOT/.gpu/wheels"
  export PYTHONPATH="/tmp/site:$ROOT"
  if [ ! -d "$WHEELS" ]; then
    say "no $WHEELS: assuming chatterbox-tts is importable (see the header for how to bring the wheels)"
  elif [ "$DRY" = 1 ]; then
    say "would install $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into /tmp/site"
  else
    say "installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into /tmp/site (no index, no deps)"
    t0=$(date +%s)
    if ! $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
        "$WHEELS"/*.whl > "$OUTDIR/install.log" 2>&1; then
      tail -5 "$OUTDIR/install.log" >&2
      record install 0 1 "$(( $(date +%s) - t0 ))" '{"benchmark": "install", "stopped": "the wheel install failed; nothing else ran"}'
      FAILED=1; finish
    fi
    record install 1 0 "$(( $(date +%s) - t0 ))" '{"benchmark": "install"}'
  fi
  # Compile-time events (recompiles, graph breaks) into each part's log.
  export TORCH_LOGS="recompiles,graph_breaks"
fi

# ---- preflight: pkg_resources, the watermarker, each family constructs, upstream's T3 runs ----
if ! part preflight 90 $PY scripts/gpu_preflight.py --device "$DEVICE" && [ "$DRY" = 0 ]; then
  say "preflight failed: stopping (its JSON line says which check and the fix)"; finish
fi

# ---- the CUDA test tier, a per-test timeout (skips cleanly without CUDA) -------------------------
part cuda_tests 180 $PY -c "
import json, subprocess, sys
rc = subprocess.call([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '--timeout=90',
                      '-o', 'addopts=-ra', 'tests/gpu'])
print(json.dumps({'benchmark': 'cuda_tests', 'pytest_rc': rc}))
sys.exit(0 if rc in (0, 5) else rc)"

case "$MODE" in
  cpu)
    T3="--device cpu --layers 2 --tokens 8 --repeats 1"
    part t3_english 300 $PY scripts/bench_t3.py $T3 --precision float32,int8
    part t3_variants 300 $PY scripts/bench_t3.py $T3 --variants default,eager
    part t3_turbo 300 $PY scripts/bench_t3.py $T3 --turbo
    part t3_multilingual 300 $PY scripts/bench_t3.py --device cpu --layers 14 --tokens 4 --repeats 1 --multilingual
    ;;
  first)
    # One process: the original timed once, every English step variant on the same weights.
    part t3_english 240 $PY scripts/bench_t3.py --device cuda --tokens 200 --repeats 3 \
      --variants graphs,eager,default,bf16
    # The engine at N = 1 and 8, a warm-up per N (compiles and captures out of the timings).
    part batch_english 200 $PY scripts/bench_batch.py --device cuda --ns 1,8 --skip-original
    ;;
  second)
    part t3_multilingual 120 $PY scripts/bench_t3.py --device cuda --tokens 200 --repeats 2 --multilingual
    part t3_turbo 90 $PY scripts/bench_t3.py --device cuda --tokens 200 --repeats 3 --turbo
    part batch_english 150 $PY scripts/bench_batch.py --device cuda --ns 1,2,4,8,16 --skip-original
    part e2e_english 90 $PY -m chatterbox_accel.cli bench --device cuda --lengths 10 --repeats 2 --no-chart --json-only
    part stream_english 60 $PY scripts/bench_stream.py --device cuda --seconds 10 --voice-seconds 10
    part quality_english 60 $PY scripts/bench_quality.py --model english --seconds 3 --voice-seconds 3 \
      --modes "exact,s3gen steps=5,s3gen cfg off,s3gen bfloat16,preset fast"
    ;;
esac
finish
