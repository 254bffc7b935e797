#!/usr/bin/env bash
# The README's cross-validated table for one bundled dataset: every sample pooled and split into k
# grouped folds (sites / location cells), MDiCo and the single-sensor model of every sensor trained
# per fold (seed 0), one table over folds with paired differences, wins and a Wilcoxon test. Runs
# train JOBS at a time (default: one per core, each pinned to its core); an interrupted
# experiment continues where it stopped.
#   bash launchers/crossval.sh fuel_moisture 10
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:?dataset: fuel_moisture or algae_blooms}
folds=${2:-10}
export OMP_NUM_THREADS=1
[ -d "archives/$name.zarr" ] || colearn-dist import presto "$name" "archives/$name.zarr"
colearn-dist crossval "colearn_dist/configs/$name.yaml" "archives/$name.zarr" --root "runs/crossval/$name" --folds "$folds" \
  --methods mdico,single --seeds 0 --jobs "${JOBS:-$(nproc)}"
