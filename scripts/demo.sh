#!/usr/bin/env bash
# Offline demo: set up the reference stack (first run only), then scripts/demo.py on random
# weights in the official layout (no download): one utterance, streaming's first audio, a batch
# of 4 and preset="fast", each side by side with the original on the same weights; a table, a
# chart (./chatterbox_accel_demo.png) and one JSON line. ~6-9 minutes on 2 CPU cores the first
# time (it writes a 3 GB checkpoint once, to $CHATTERBOX_ACCEL_CACHE or ~/.cache/chatterbox_accel).
# DEMO_SECONDS / DEMO_N / DEMO_VOICE_SECONDS adjust the work.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1 TQDM_DISABLE=1
python scripts/demo.py --chart "$ROOT/chatterbox_accel_demo.png"
