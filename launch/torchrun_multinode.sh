#!/usr/bin/env bash
# Multi node with torchrun: run this once on every node, with the same MASTER_ADDR/MASTER_PORT.
#
#   # on node 0 (its address: 10.0.0.1) and on node 1:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29400 bash launch/torchrun_multinode.sh CONFIG ...
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 MASTER_PORT=29400 bash launch/torchrun_multinode.sh CONFIG ...
#
# NNODES          number of nodes (required)
# NODE_RANK       this node's rank, 0..NNODES-1 (required; with c10d the rendezvous may
#                 renumber the nodes: ranks are unique but not guaranteed to equal NODE_RANK)
# MASTER_ADDR     rendezvous host (node 0), reachable from every node (required)
# MASTER_PORT     rendezvous port (default 29400)
# NPROC_PER_NODE  processes per node (default: CUDA devices, else 1)
# RDZV_ID         job id shared by the nodes (default largebatch)
# PYTHON          interpreter (default python3)
set -euo pipefail
PYTHON="${PYTHON:-python3}"
if [ "$#" -lt 1 ]; then
  echo "usage: NNODES=N NODE_RANK=R MASTER_ADDR=HOST [MASTER_PORT=P] $0 CONFIG [key=value ...]" >&2
  exit 2
fi
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
MASTER_PORT="${MASTER_PORT:-29400}"
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE="$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')"
fi
exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK" \
  --nproc_per_node="$NPROC_PER_NODE" --rdzv_backend=c10d \
  --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="${RDZV_ID:-largebatch}" \
  -m largebatch train "$@"
