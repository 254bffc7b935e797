#!/usr/bin/env bash
# Without Submitit: a plain sbatch script. Each srun task is one rank; colearn_dist reads the
# rendezvous from SLURM_PROCID / SLURM_NTASKS / SLURM_JOB_NODELIST. On the USR1 warning every rank
# checkpoints and `train` exits with status 3, and the script requeues the job; on `scancel` it
# checkpoints and exits with status 4, and the job ends (`sbatch` it again to continue).
# `train` catches USR1 from its first moment, so a warning during start-up is not fatal either.
# Usage: sbatch launchers/sbatch_direct.sh [CONFIG [--set KEY=VALUE ...]]
#   (default: colearn_dist/configs/fuel_moisture.yaml into runs/direct/mdico; sbatch options on the command line
#   override the #SBATCH lines, e.g. sbatch --nodes=1 --gpus-per-node=0 launchers/sbatch_direct.sh)
#SBATCH --job-name=colearn
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --signal=USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
set -uo pipefail
if [ $# -eq 0 ]; then set -- colearn_dist/configs/fuel_moisture.yaml --set run_dir=runs/direct/mdico; fi
srun --kill-on-bad-exit=0 colearn-dist train "$@"
status=$?
if [ "$status" -eq 3 ]; then
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
