#!/usr/bin/env bash
# Offline demo: set up the reference stack (first run only), then, on random weights in the
# official layout (no download):
#   1. the T3 decode benchmark, original vs chatterbox_accel (exact float32, and int8 weights),
#      full-size, side by side;
#   2. `chatterbox-accel bench`: whole generate() per stage, original vs accelerated, with a
#      PNG chart written to ./chatterbox_accel_bench.png.
# DEMO_TOKENS / DEMO_LENGTHS / DEMO_REPEATS adjust the work (defaults take ~10 min on 2 CPU cores).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1 TQDM_DISABLE=1
python scripts/bench_t3.py --tokens "${DEMO_TOKENS:-40}" --repeats "${DEMO_REPEATS:-3}" --precision float32,int8
chatterbox-accel bench --lengths "${DEMO_LENGTHS:-1}" --repeats "${DEMO_REPEATS:-3}" \
  --chart "$ROOT/chatterbox_accel_bench.png"
