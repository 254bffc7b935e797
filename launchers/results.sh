#!/usr/bin/env bash
# The README's result tables for one bundled dataset, on its geographic test split, 3 seeds, the
# shipped configs (settings chosen without the test split): every sensor at training with the
# calendar (MDiCo, the single-sensor model, fine-tuned Presto per sensor), the same with calendar +
# location (MDiCo, single), and the paper's S1 + S2 setting (MDiCo; its single-sensor rows are those
# of the first table). The reference column is the month + sensor random forest of
# benchmarks/bench_rf.py (colearn_dist/configs/reference.yaml). Runs train JOBS at a time (default:
# one per core, each pinned to its core):
#   bash launchers/results.sh fuel_moisture; bash launchers/results.sh algae_blooms
# The cross-validated tables: launchers/crossval.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:?dataset: fuel_moisture or algae_blooms}
export OMP_NUM_THREADS=1
[ -d "archives/$name.zarr" ] || colearn-dist import presto "$name" "archives/$name.zarr"
[ -f "shards/$name/manifest.json" ] || colearn-dist shard "archives/$name.zarr" "shards/$name" --samples-per-shard 256 --workers 1
ref=colearn_dist/configs/reference.yaml
sweep() { colearn-dist sweep "$@" --seeds 0 1 2 --jobs "${JOBS:-$(nproc)}" --reference "$ref"; }
sweep "colearn_dist/configs/$name.yaml" --methods mdico,single,presto --root "runs/results/$name"
sweep "colearn_dist/configs/$name.yaml" --methods mdico,single --set "model.context=[calendar, location]" --root "runs/results/${name}_location"
sweep "colearn_dist/configs/${name}_s1s2.yaml" --methods mdico --root "runs/results/${name}_s1s2"
