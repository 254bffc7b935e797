#!/usr/bin/env bash
# Ready-to-edit: one MDiCo run on 2 GPU nodes × 4 GPUs (one task per GPU) through Submitit.
# Time limits and preemption are handled: Slurm warns the job (USR2, 120 s before the limit), every
# rank checkpoints at the next step boundary, the job requeues itself and resumes from `latest`.
set -euo pipefail
CONFIG=${1:-colearn_dist/configs/fuel_moisture.yaml}
colearn-dist submit "$CONFIG" \
  --set run_dir=runs/continental/mdico \
  --set slurm.nodes=2 --set slurm.gpus_per_node=4 --set slurm.cpus_per_task=8 --set slurm.mem_gb=32 \
  --set slurm.time_min=720 --set slurm.partition=gpu \
  --set slurm.account=my_project --set slurm.qos=normal --set 'slurm.constraint=a100' \
  --set data.workers=4 --set data.batch_size=256
# colearn-dist status runs/continental/mdico      # job state, last checkpoint, last validation
# colearn-dist submit --resume runs/continental/mdico   # continue in a new allocation
