#!/usr/bin/env bash
# spectra's prepared device check: CUDA against the CPU on every command, and whole-process timings on a
# 7B-shaped checkpoint written locally (nothing is downloaded). See benchmarks/README.md, section gpu_check.
#
#   bash benchmarks/gpu_check.sh                 # one CUDA GPU, LLaMA-2-7B shapes (≈8 min on an H100, ≈45 GB disk)
#   bash benchmarks/gpu_check.sh --cpu --small   # no GPU: tiny checkpoint, PyTorch on the CPU (seconds; CI runs it)
#
# Other flags: --work DIR (data folder, reused when present), --json FILE, --skip-checks, --skip-timings.
# The Python used is $PYTHON, else the repository's .venv, else python3.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then py="$root/.venv/bin/python"; else py="$(command -v python3 || command -v python)"; fi
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
cd "$root"
exec "$py" "$root/benchmarks/gpu_check.py" "$@"
