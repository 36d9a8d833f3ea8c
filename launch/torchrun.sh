#!/usr/bin/env bash
# Single node, N processes, torchrun (the main path).
#
#   NPROC_PER_NODE=8 bash launch/torchrun.sh CONFIG [key=value ...]
#
# NPROC_PER_NODE  processes on this node (default: CUDA devices, else 1)
# PYTHON          interpreter (default python3)
# Runs: python3 -m torch.distributed.run --standalone --nproc_per_node N -m largebatch train ...
set -euo pipefail
PYTHON="${PYTHON:-python3}"
if [ "$#" -lt 1 ]; then echo "usage: [NPROC_PER_NODE=N] $0 CONFIG [key=value ...]" >&2; exit 2; fi
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE="$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')"
fi
# --standalone: a private c10d rendezvous on a free local port (no MASTER_PORT clashes).
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC_PER_NODE" \
  -m largebatch train "$@"
