#!/usr/bin/env bash
# Runs one vlm_jax experiment on every worker of a Cloud TPU VM (single host or pod slice).
#
#   tpu_scripts/launch.sh NAME ZONE -- --config=experiments/clip.py:cc12m_b16 --workdir=gs://bucket/clip
#
# Every worker runs the same command; `jax.distributed.initialize` (config.distributed.mode=always on
# TPU pods) joins them into one job. The repository is copied to the workers and installed with the
# `tpu` extra first. A preempted run is resumed by running the same command again: the trainer
# continues from the latest checkpoint in --workdir.
set -euo pipefail

if [ "$#" -lt 3 ] || [ "$3" != "--" ]; then
  echo "usage: $0 TPU_NAME ZONE -- ARGS_FOR_vlm_jax.main" >&2
  exit 2
fi
name=$1
zone=$2
shift 3
args=$(printf ' %q' "$@")
repo=$(cd "$(dirname "$0")/.." && pwd)

tar -C "$repo" --exclude=.git --exclude=.venv --exclude=workdirs -czf /tmp/vlm_jax.tgz .
gcloud compute tpus tpu-vm scp /tmp/vlm_jax.tgz "$name":/tmp/vlm_jax.tgz --zone="$zone" --worker=all
gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="
  set -e
  mkdir -p ~/vlm_jax && tar -C ~/vlm_jax -xzf /tmp/vlm_jax.tgz && cd ~/vlm_jax
  python3 -m venv ~/venv && . ~/venv/bin/activate
  pip install -q -e '.[tpu]'
  python -m vlm_jax.main$args --config.distributed.mode=always
"
