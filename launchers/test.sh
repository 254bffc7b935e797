#!/usr/bin/env bash
# Installs the project, checks lint, format and types, and runs the whole test suite (the README's
# test command; CI runs it too). Versions of the checkers are pinned in the `test` extra.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launchers/setup.sh
python3 -m ruff check colearn_dist tests benchmarks
python3 -m ruff format --check colearn_dist tests benchmarks
python3 -m mypy  # settings (files, untyped deps) in pyproject.toml
exec python3 -m pytest -q "$@"
