#!/usr/bin/env bash
# Thin wrapper kept for old command lines: `launch/tpu_pod.sh TPU_NAME ZONE CONFIG [--config.key=value ...]`
# is `python3 launch/tpu.py --tpu TPU_NAME --zone ZONE --config=CONFIG [--config.key=value ...]`
# (see that file; it also creates the slice, syncs the code and has --dry_run). $REPO_DIR, if
# set, is the repository's folder on the workers (--remote_dir).
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG [--config.key=value ...]   (or: python3 launch/tpu.py --help)" >&2
  exit 2
fi
tpu=$1 zone=$2 config=$3
shift 3
exec python3 "$(dirname "$0")/tpu.py" --tpu "$tpu" --zone "$zone" ${REPO_DIR:+--remote_dir "$REPO_DIR"} \
  --config="$config" "$@"
