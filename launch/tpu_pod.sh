#!/usr/bin/env bash
# Starts the same launch.main command on every worker of a Cloud TPU pod slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE --config=configs/mor_360m.py --workdir=gs://BUCKET/run \
#       [--config.field=value ...]
#
# Each worker runs `python -m launch.main ... --config.distributed=True`, which calls
# jax.distributed.initialize() (TPU workers discover each other automatically). The repo is
# expected at the same path on every worker (e.g. cloned by a startup script) with its
# requirements installed: `pip install -e .`.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: $0 TPU_NAME ZONE --config=configs/X.py --workdir=DIR [overrides...]" >&2
  exit 2
fi
tpu_name=$1; zone=$2; shift 2
repo_dir=${REPO_DIR:-$(cd "$(dirname "$0")/.." && pwd)}
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu_name" --zone "$zone" --worker=all --command \
  "cd $repo_dir && python3 -m launch.main$args --config.distributed=True"
