#!/usr/bin/env bash
# Ready-to-edit: shard → every method × 3 seeds → the tables, as Slurm jobs chained with --after.
# The runs are one array job (one config per element; several CONFIG files, e.g. one per fold, add
# elements); the distillation students form a second array that starts after their fusion teachers.
set -euo pipefail
CONFIG=${1:-colearn_dist/configs/fuel_moisture.yaml}
ARCHIVE=${2:-archives/fuel_moisture.zarr}
SHARDS=shards/sweep
SLURM=(--set slurm.cpus_per_task=2 --set slurm.mem_gb=4 --set slurm.time_min=30 --set slurm.partition=cpu)
job_ids() { awk '/^submitted /{split($2, id, "_"); print id[1]}' | sort -u | tr '\n' ' '; }

SHARD=$(colearn-dist submit --command "shard $ARCHIVE $SHARDS --samples-per-shard 256" "${SLURM[@]}" | job_ids)
TRAIN=$(colearn-dist submit "$CONFIG" --methods mdico,single,fusion,dropout,distill --seeds 0 1 2 --root runs/sweep \
  --set data.shards=$SHARDS "${SLURM[@]}" --after $SHARD | job_ids)
# the wildcard is expanded when the job runs, after training
colearn-dist submit --command "evaluate runs/sweep/*/seed* --out runs/sweep/tables" "${SLURM[@]}" --after $TRAIN
