#!/usr/bin/env bash
# Set up with the test tools (setup.sh --dev), then run the linter, the type checker and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
# shellcheck disable=SC1091
. .venv/bin/activate
ruff check .
mypy
python -m pytest -q -n 2 "$@"
