#!/usr/bin/env bash
# The README's result tables: one bundled dataset, both settings (every sensor at training; the
# paper's S1 + S2), both contexts (calendar; calendar + location), every method, 3 seeds, on the
# geographic test split. One core per dataset:
#   bash launchers/results.sh fuel_moisture & bash launchers/results.sh algae_blooms
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:?dataset: fuel_moisture or algae_blooms}
export OMP_NUM_THREADS=1
[ -d "archives/$name.zarr" ] || colearn-dist import presto "$name" "archives/$name.zarr"
[ -f "shards/$name/manifest.json" ] || colearn-dist shard "archives/$name.zarr" "shards/$name" --samples-per-shard 256 --workers 1
# The configs' context (calendar), then calendar + location: a table each.
for setting in "" _s1s2; do
  for context in "" location; do
    root="runs/results/$name$setting${context:+_$context}"
    extra=()
    [ -n "$context" ] && extra=(--set "model.context=[calendar, location]")
    colearn-dist sweep "colearn_dist/configs/$name$setting.yaml" --seeds 0 1 2 --set train.threads=1 "${extra[@]}" \
      --root "$root" --out "$root/tables" --reference colearn_dist/configs/reference.yaml
  done
done
