#!/usr/bin/env bash
# One command for a lent GPU machine (Python 3.12, torch 2.11, no package index): install what it
# lacks from .gpu/wheels, then run every check that needs a GPU, keep going past a failing part,
# and write one JSON line per figure to $OUT/gpu_check.jsonl (or the folder given as an argument).
#
#   scripts/gpu_check.sh [OUTDIR]           full run on CUDA (aim: under 8 minutes on an H100/H200)
#   scripts/gpu_check.sh --quick [OUTDIR]   English only, shorter runs (aim: under 3 minutes)
#   scripts/gpu_check.sh --cpu [OUTDIR]     the same parts on this CPU at tiny sizes (CI runs it)
#   scripts/gpu_check.sh --dry-run          print what would run, run nothing
#
# Before a GPU session, here:  mkdir -p .gpu/wheels && cp ../shared/gpu-wheels/*.whl .gpu/wheels/
#   && pip download --no-deps -d .gpu/wheels pytest pluggy iniconfig   (.gpu/ is git-ignored)
# then on the device:  run(command="bash scripts/gpu_check.sh", carry=[".gpu"])
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
MODE=gpu; DRY=0; OUTDIR="${OUT:-$ROOT/out}"
for arg in "$@"; do
  case "$arg" in
    --cpu) MODE=cpu ;;
    --quick) MODE=quick ;;
    --dry-run) DRY=1 ;;
    -h|--help) sed -n 2,14p "$0"; exit 0 ;;
    *) OUTDIR="$arg" ;;
  esac
done
mkdir -p "$OUTDIR"
RESULTS="$OUTDIR/gpu_check.jsonl"
: > "$RESULTS"
export HF_HUB_OFFLINE=1 TQDM_DISABLE=1 PYTHONUNBUFFERED=1
cd "$ROOT"
START=$(date +%s)
FAILED=0

say() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" >&2; }

# part NAME CMD...: run CMD, append its last stdout line (the scripts' JSON line) to the results,
# and record a failure as a JSON line of its own instead of stopping.
part() {
  local name="$1"; shift
  say "$name: $*"
  if [ "$DRY" = 1 ]; then return 0; fi
  local log="$OUTDIR/$name.log" t0=$(date +%s) rc
  "$@" > "$log.out" 2> "$log"
  rc=$?
  local last; last=$(grep '^{' "$log.out" | tail -1)
  if [ "$rc" = 0 ] && [ -n "$last" ]; then
    python - "$name" "$(( $(date +%s) - t0 ))" "$last" >> "$RESULTS" <<'PY'
import json, sys
line = json.loads(sys.argv[3]); line.update(part=sys.argv[1], part_seconds=int(sys.argv[2]), ok=True)
print(json.dumps(line))
PY
  else
    FAILED=$((FAILED + 1))
    echo "{\"part\": \"$name\", \"ok\": false, \"rc\": $rc, \"part_seconds\": $(( $(date +%s) - t0 )), \"log\": \"$name.log\"}" >> "$RESULTS"
    say "$name FAILED (rc $rc); last lines of its log:"; tail -5 "$log" >&2
  fi
}

# ---- set-up ----------------------------------------------------------------------------------
if [ "$MODE" = cpu ]; then
  source "$ROOT/scripts/setup_env.sh"   # the project virtualenv (CI has just made it)
  DEVICE=cpu
else
  WHEELS="$ROOT/.gpu/wheels"
  if [ -d "$WHEELS" ]; then
    say "installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into /tmp/site (no index, no deps)"
    [ "$DRY" = 1 ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --target /tmp/site "$WHEELS"/*.whl || say "wheel install failed; going on with what is installed"
    export PYTHONPATH="/tmp/site:$ROOT"
  else
    say "no $WHEELS: assuming chatterbox-tts is importable (see the header for how to bring the wheels)"
    export PYTHONPATH="$ROOT"
  fi
  DEVICE=cuda
fi
PY=python3; [ "$MODE" = cpu ] && PY=python

part env $PY -c "
import json, platform, torch
from chatterbox_accel.benchmark import hardware, versions
print(json.dumps({'benchmark': 'env', 'cuda': torch.cuda.is_available(), 'hardware': hardware(),
                  'device': '$DEVICE', 'python': platform.python_version(), **versions()}))"

# ---- the CUDA test tier (skips cleanly without CUDA) -------------------------------------------
part cuda_tests $PY -c "
import json, subprocess, sys
rc = subprocess.call([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', 'tests/gpu'])
print(json.dumps({'benchmark': 'cuda_tests', 'pytest_rc': rc}))
sys.exit(0 if rc in (0, 5) else rc)"

# ---- T3 decode: original vs each step variant ------------------------------------------------
if [ "$MODE" = cpu ]; then
  T3="--device cpu --layers 2 --tokens 8 --repeats 1"
  part t3_english $PY scripts/bench_t3.py $T3 --precision float32,int8
  part t3_turbo $PY scripts/bench_t3.py $T3 --turbo
  part t3_multilingual $PY scripts/bench_t3.py --device cpu --layers 14 --tokens 4 --repeats 1 --multilingual
else
  N=$([ "$MODE" = quick ] && echo 60 || echo 200)
  part t3_english_graphs $PY scripts/bench_t3.py --device cuda --tokens "$N" --repeats 3
  part t3_english_eager $PY scripts/bench_t3.py --device cuda --tokens "$N" --repeats 3 --no-compile
  part t3_english_bf16 $PY scripts/bench_t3.py --device cuda --tokens "$N" --repeats 3 --dtype bfloat16
  if [ "$MODE" = gpu ]; then
    part t3_multilingual $PY scripts/bench_t3.py --device cuda --tokens "$N" --repeats 2 --multilingual
    part t3_turbo $PY scripts/bench_t3.py --device cuda --tokens "$N" --repeats 3 --turbo
  fi
fi

# ---- end to end, streaming, quality (full-size checkpoints; not at CPU sizes) -----------------
if [ "$MODE" != cpu ]; then
  LEN=$([ "$MODE" = quick ] && echo 3 || echo 10)
  # The batch engine first (issue 11: N = 1..16 against the original sequential generate()).
  NS=$([ "$MODE" = quick ] && echo 1,16 || echo 1,2,4,8,16)
  part batch_english $PY scripts/bench_batch.py --device cuda --ns "$NS"
  [ "$MODE" = gpu ] && part batch_turbo $PY scripts/bench_batch.py --family turbo --device cuda --ns 1,16 --skip-original
  part e2e_english $PY -m chatterbox_accel.cli bench --device cuda --lengths "$LEN" --repeats 2 --no-chart --json-only
  part stream_english $PY scripts/bench_stream.py --device cuda --seconds "$LEN" --voice-seconds 10
  if [ "$MODE" = gpu ]; then
    part e2e_turbo $PY -m chatterbox_accel.cli bench --model turbo --device cuda --lengths 10 --repeats 2 --no-chart --json-only
    part e2e_multilingual $PY -m chatterbox_accel.cli bench --model multilingual --device cuda --lengths 10 --repeats 2 --no-chart --json-only
    part stream_turbo $PY scripts/bench_stream.py --model turbo --device cuda --seconds 10 --voice-seconds 10
    part quality_english $PY scripts/bench_quality.py --model english --seconds 3 --voice-seconds 3 --modes "exact,s3gen steps=5,s3gen cfg off,s3gen bfloat16,preset fast"
  fi
fi

say "done in $(( $(date +%s) - START )) s, $FAILED part(s) failed; results: $RESULTS"
[ "$DRY" = 1 ] || cat "$RESULTS"
# On a GPU every part's outcome is in the results (a failure is a figure too); on the CPU (CI) a
# failing part fails the run, so the script cannot rot before a GPU is lent.
[ "$MODE" = cpu ] && [ "$FAILED" -gt 0 ] && exit 1
exit 0
