#!/usr/bin/env bash
# accelerate launch, with the committed configs in launch/.
#
#   NPROC_PER_NODE=8 bash launch/accelerate.sh CONFIG [key=value ...]           # GPUs
#   ACCELERATE_USE_CPU=1 NPROC_PER_NODE=2 bash launch/accelerate.sh CONFIG ...  # CPU
#   # multi node: on every node, same MASTER_ADDR/MASTER_PORT, its own NODE_RANK
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 NPROC_PER_NODE=8 bash launch/accelerate.sh CONFIG ...
#
# Always --multi_gpu (accelerate's torchrun path). On CPU that needs ACCELERATE_USE_CPU=1;
# `accelerate launch --cpu --num_processes N` starts ONE process (largebatch refuses it).
# NPROC_PER_NODE  processes per node (default: CUDA devices, else 2 on CPU)
# NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (default 29500)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"
if [ "$#" -lt 1 ]; then echo "usage: [NPROC_PER_NODE=N] $0 CONFIG [key=value ...]" >&2; exit 2; fi
CUDA_COUNT="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')"
if [ "${ACCELERATE_USE_CPU:-0}" != 0 ] || [ "$CUDA_COUNT" = 0 ]; then
  export ACCELERATE_USE_CPU=1
  CONFIG_FILE="$HERE/accelerate_cpu.yaml"
  NPROC_PER_NODE="${NPROC_PER_NODE:-2}"
else
  CONFIG_FILE="$HERE/accelerate_multi_gpu.yaml"
  NPROC_PER_NODE="${NPROC_PER_NODE:-$CUDA_COUNT}"
fi
NNODES="${NNODES:-1}"
ARGS=(--config_file "$CONFIG_FILE" --multi_gpu --num_processes "$((NPROC_PER_NODE * NNODES))"
      --num_machines "$NNODES" --main_process_port "${MASTER_PORT:-29500}")
if [ "$NNODES" -gt 1 ]; then
  : "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
  ARGS+=(--machine_rank "$NODE_RANK" --main_process_ip "$MASTER_ADDR")
fi
exec accelerate launch "${ARGS[@]}" -m largebatch train "$@"
