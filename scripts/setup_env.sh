#!/usr/bin/env bash
# Create (if missing) the project virtualenv on the reference stack and install chatterbox-accel
# into it. Sourced by test.sh and demo.sh. VENV overrides the location (default .venv).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating virtualenv $VENV with $PY" >&2
  "$PY" -m venv "$VENV"
fi
# The reference stack: what chatterbox-tts 0.1.7 resolves (torch 2.6.0, transformers 5.2.0),
# plus setuptools<81 for resemble-perth's pkg_resources import.
"$VENV/bin/python" -m pip install -q "chatterbox-tts==0.1.7" "setuptools<81"
# A regular (non-editable) install, so the CHATTERBOX_ACCEL=1 .pth hook is in site-packages.
"$VENV/bin/python" -m pip install -q "$ROOT[test,serve,ray]"
export PATH="$VENV/bin:$PATH"
