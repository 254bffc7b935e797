#!/usr/bin/env bash
# The README's result tables: one bundled dataset, both settings (every sensor at training; the
# paper's S1 + S2), every method, 3 seeds, on the geographic test split. One core per dataset:
#   bash launchers/results.sh fuel_moisture & bash launchers/results.sh algae_blooms
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:?dataset: fuel_moisture or algae_blooms}
export OMP_NUM_THREADS=1
[ -d "archives/$name.zarr" ] || colearn-dist import presto "$name" "archives/$name.zarr"
[ -f "shards/$name/manifest.json" ] || colearn-dist shard "archives/$name.zarr" "shards/$name" --samples-per-shard 256 --workers 1
for setting in "" _s1s2; do
  colearn-dist sweep "colearn_dist/configs/$name$setting.yaml" --seeds 0 1 2 --set train.threads=1 \
    --root "runs/results/$name$setting" --out "runs/results/$name$setting/tables" --reference colearn_dist/configs/reference.yaml
done
