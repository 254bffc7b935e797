#!/usr/bin/env bash
# Ready-to-edit: every method × 3 seeds as Slurm array jobs (one config per element). The
# distillation students form a second array that starts after the first (their fusion teachers).
# Evaluate when both are done:  colearn-dist evaluate runs/sweep/*/seed* --out runs/sweep/tables
set -euo pipefail
CONFIG=${1:-configs/fuel_moisture.yaml}
colearn-dist submit "$CONFIG" --methods mdico,single,fusion,dropout,distill --seeds 0 1 2 --root runs/sweep \
  --set slurm.cpus_per_task=2 --set slurm.mem_gb=4 --set slurm.time_min=30 --set slurm.partition=cpu
