#!/usr/bin/env bash
# Without Submitit: a plain sbatch script. Each srun task is one rank; colearn_dist reads the
# rendezvous from SLURM_PROCID / SLURM_NTASKS / SLURM_JOB_NODELIST. On the USR1 warning every rank
# checkpoints and `train` exits with status 3, and the script requeues the job.
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
srun --kill-on-bad-exit=0 colearn-dist train colearn_dist/configs/fuel_moisture.yaml --set run_dir=runs/direct/mdico
status=$?
if [ "$status" -eq 3 ]; then
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
