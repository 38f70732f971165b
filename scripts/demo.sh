#!/usr/bin/env bash
# Set up, then analyse the real all-MiniLM-L6-v2 checkpoint: a table on stdout, figures in demo-output/plots.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
spectra analyze --demo --plots demo-output/plots "$@"
