#!/usr/bin/env bash
# Set up the reference stack in a virtualenv (first run only) and run the test suite.
#   ./scripts/test.sh            all tests
#   ./scripts/test.sh -k parity  pytest arguments pass through
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec python -m pytest "$@"
