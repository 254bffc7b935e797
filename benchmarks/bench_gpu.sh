#!/usr/bin/env bash
# The GPU check (docs in benchmarks/bench_gpu.py): MDiCo on one GPU in bf16 on the bundled data and a
# 1M-sample synthetic archive, batch 32 / 256 / 4096 — samples/s, GPU memory, the loader with the
# node's workers, and a SIGKILL/resume comparison — in under 8 minutes (hard limit below).
#   bash benchmarks/bench_gpu.sh                 # on a GPU node (e.g. srun --gpus=1 bash benchmarks/bench_gpu.sh)
#   bash benchmarks/bench_gpu.sh --device cpu --quick   # the CPU dry run CI exercises
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout --signal=TERM 480 python benchmarks/bench_gpu.py "$@"
