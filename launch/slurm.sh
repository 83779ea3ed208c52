#!/usr/bin/env bash
# Runs launch.main on every node of a SLURM GPU allocation, one process per node.
#
#   sbatch --nodes=4 --gpus-per-node=8 launch/slurm.sh --config=configs/mor_360m.py \
#       --workdir=/shared/runs/mor_360m [--config.field=value ...]
#
# jax.distributed.initialize() (called when --config.distributed=True) reads the SLURM
# environment (coordinator = first node, process id = SLURM_PROCID), so one task per node
# sees all of that node's GPUs. The workdir must be on a filesystem every node shares.
#SBATCH --ntasks-per-node=1
#SBATCH --job-name=recursive-lm
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: sbatch [slurm options] $0 --config=configs/X.py --workdir=DIR [overrides...]" >&2
  exit 2
fi
repo_dir=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(pwd)}}
cd "$repo_dir"
srun --ntasks-per-node=1 python3 -m launch.main "$@" --config.distributed=True
