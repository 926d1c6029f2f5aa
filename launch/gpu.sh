#!/usr/bin/env bash
# Launch a training run on the GPUs of this machine, or on several nodes under SLURM.
#
#   launch/gpu.sh experiments/configs/g2rpo.py:qwen3_math --config.model.checkpoint=/ckpt/Qwen3-1.7B ...
#   sbatch --nodes=2 --gpus-per-node=8 --wrap "srun launch/gpu.sh experiments/configs/g2rpo.py:qwen3_math ..."
#
# One process per node drives all of that node's GPUs. Under SLURM (SLURM_NTASKS > 1)
# jax.distributed.initialize() reads the cluster from the SLURM environment.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 CONFIG [--config.key=value ...]" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
config=$1
shift
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q -r requirements.txt 'jax[cuda12]==0.10.2'
  .venv/bin/pip install -q --no-deps -e .
fi
distributed=False
if [ "${SLURM_NTASKS:-1}" -gt 1 ]; then distributed=True; fi
# Let XLA use most of the GPU memory for the KV cache and activations.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec .venv/bin/python -m g2rpo_jax.train --config="$config" --config.mesh.distributed=$distributed "$@"
