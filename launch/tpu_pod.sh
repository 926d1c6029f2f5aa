#!/usr/bin/env bash
# Launch a training run on every worker of a Cloud TPU VM pod slice (same config as CPU/GPU).
#
#   launch/tpu_pod.sh TPU_NAME ZONE experiments/configs/g2rpo.py:qwen3_math \
#       --config.model.checkpoint=/mnt/ckpt/Qwen3-1.7B --config.data.source=/mnt/data/math.jsonl
#
# Every worker runs the same command; jax.distributed.initialize() (mesh.distributed=True) finds
# the peers. The checkpoint, data and run directory must be on storage all workers see (a
# mounted bucket or NFS). The mesh defaults to full FSDP for the qwen3 presets.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG [--config.key=value ...]" >&2
  exit 2
fi
tpu=$1 zone=$2 config=$3
shift 3
repo_dir=${REPO_DIR:-~/g2rpo-jax}
overrides=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "
  set -e
  cd $repo_dir
  test -x .venv/bin/python || (python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt 'jax[tpu]==0.10.2' && .venv/bin/pip install -q --no-deps -e .)
  .venv/bin/python -m g2rpo_jax.train --config=$config --config.mesh.distributed=True$overrides
"
