#!/usr/bin/env bash
# Installs the project, checks lint and format, and runs the whole test suite (the README's
# test command; CI runs it too). Versions of the checkers are pinned in the `test` extra.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launchers/setup.sh
python3 -m ruff check colearn_dist tests benchmarks
python3 -m ruff format --check colearn_dist tests benchmarks
exec python3 -m pytest -q "$@"
