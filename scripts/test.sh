#!/usr/bin/env bash
# Set up, then run the whole test suite, the linter and the type checker.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
ruff check .
mypy
python -m pytest -q -n 2 "$@"
