#!/usr/bin/env bash
# Set up (runtime only: scripts/setup.sh without --dev), then analyse the real all-MiniLM-L6-v2
# checkpoint: a table on stdout, figures in demo-output/plots.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
spectra analyze --demo --plots demo-output/plots "$@"
# A script cannot change the PATH of the shell that ran it: say how to get `spectra` there.
echo "demo: spectra is installed in $PWD/.venv; run '. .venv/bin/activate' to put it on your PATH" >&2
