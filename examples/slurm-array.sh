#!/bin/bash
# One sweep as a SLURM job array: each task runs its share of the matrix (--shard auto reads
# SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT), then one job merges the shards:
#   sbatch examples/slurm-array.sh
#   sbatch --dependency=afterok:<array job id> --wrap "loopscope merge runs/sweep runs/sweep-shard*"
#SBATCH --job-name=loopscope
#SBATCH --array=0-3
#SBATCH --gpus=1
#SBATCH --time=04:00:00
loopscope run --profile datacenter-gpu --shard auto --out "runs/sweep-shard${SLURM_ARRAY_TASK_ID}"
