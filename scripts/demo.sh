#!/usr/bin/env bash
# Offline demo: set up the reference stack (first run only), then benchmark the original
# chatterbox T3 decode against chatterbox_accel on full-size random weights, side by side.
#   ./scripts/demo.sh [bench_t3.py options, e.g. --tokens 80 --repeats 5]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1 TQDM_DISABLE=1
exec python scripts/bench_t3.py "$@"
