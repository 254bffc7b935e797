#!/usr/bin/env bash
# Installs the project and runs the whole test suite (the README's test command; CI runs it too).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launchers/setup.sh
exec python3 -m pytest -q "$@"
