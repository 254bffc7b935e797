#!/usr/bin/env bash
# The main job on the bundled data: install, import, shard, train every method, evaluate, print the
# per-sensor table. Extra arguments go to `colearn-dist demo` (e.g. --seeds 0 1 2, --quick). Runs
# train JOBS at a time, each pinned to its own core (default: one per core; JOBS=1 on a GPU node).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launchers/setup.sh
exec colearn-dist demo --jobs "${JOBS:-$(nproc)}" "$@"
