#!/usr/bin/env bash
# The README's recipe for a torch newer than chatterbox-tts 0.1.7's pin (2.6.0), in a fresh
# virtualenv, then the CPU parity tier on it. .ci/run runs it as its second leg.
#   TORCH_VERSION (default 2.11.0, what the lent GPU machine runs, with its torchaudio)
#   VENV (default .venv-newest-torch); pytest arguments pass through.
#   --install-only: set up the virtualenv and stop (.ci/run does this in the background, while
#   the reference suite runs: the install is mostly download, the suite is CPU).
set -euo pipefail
INSTALL_ONLY=0
if [ "${1:-}" = "--install-only" ]; then INSTALL_ONLY=1; shift; fi
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TORCH_VERSION="${TORCH_VERSION:-2.11.0}"
VENV="${VENV:-$ROOT/.venv-newest-torch}"
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
P="$VENV/bin/python -m pip install -q"
# 1. torch and its torchaudio first; 2. chatterbox without its pins; 3. its other requirements;
# 4. this project without dependency resolution (which would pull chatterbox's torch==2.6.0
#    back in), then its own few requirements.
$P "torch==$TORCH_VERSION" "torchaudio==$TORCH_VERSION"
$P chatterbox-tts==0.1.7 --no-deps
$P transformers==5.2.0 diffusers==0.29.0 librosa s3tokenizer resemble-perth conformer safetensors omegaconf \
   pyloudnorm "setuptools<81"
$P --no-deps "$ROOT"
$P wrapt soundfile matplotlib pytest pytest-timeout
"$VENV/bin/python" -c "import torch, torchaudio; assert torch.__version__.startswith('$TORCH_VERSION'), torch.__version__; print('torch', torch.__version__, 'torchaudio', torchaudio.__version__)"
[ "$INSTALL_ONLY" = 1 ] && exit 0
cd "$ROOT"
# The parity tier: T3 (every CPU kernel, precisions), Turbo, S3Gen modes, config and accelerate.
exec "$VENV/bin/python" -m pytest -q tests/test_t3_parity.py tests/test_kernels.py tests/test_turbo_t3.py \
  tests/test_config.py tests/test_sampling.py tests/test_attention.py "$@"
