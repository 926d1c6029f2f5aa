#!/usr/bin/env bash
# Thin wrapper kept for old command lines: `launch/gpu.sh CONFIG [--config.key=value ...]` is
# `python3 launch/gpu.py --config=CONFIG [--config.key=value ...]` (see that file; it also takes
# --nodes N for SLURM and --dry_run).
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 CONFIG [--config.key=value ...]   (or: python3 launch/gpu.py --help)" >&2
  exit 2
fi
config=$1
shift
exec python3 "$(dirname "$0")/gpu.py" --config="$config" "$@"
