#!/usr/bin/env bash
# Installs colearn_dist with its test extras. torch goes first: on this CPU machine the pinned
# version is a local CPU wheel; on a GPU cluster install your CUDA build of torch before this script
# (it keeps an installed torch as it is).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q torch==2.13.0
fi
"$PY" -m pip install -q -e '.[test]'
# DeepSpeed compiles a small CPU op the first time it starts: once here, rather than by the first
# jobs at the same time (a build they interrupt leaves a lock in the user's cache that blocks later jobs).
"$PY" -c "from colearn_dist.launch import build_deepspeed_op; build_deepspeed_op()" >/dev/null 2>&1 ||
  echo "setup.sh: DeepSpeed's CPU op did not build here; the first job builds it" >&2
