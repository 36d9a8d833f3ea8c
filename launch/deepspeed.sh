#!/usr/bin/env bash
# The DeepSpeed launcher (pairs with engine.name=deepspeed, but starts any engine).
#
#   NUM_GPUS=8 bash launch/deepspeed.sh CONFIG engine.name=deepspeed [key=value ...]
#   # CPU (DeepSpeed's CPU accelerator, gloo): same command, NUM_GPUS = processes
#   NUM_GPUS=2 bash launch/deepspeed.sh CONFIG ...
#   # multi node without ssh: run on every node with the same HOSTFILE ("host slots=N" lines)
#   HOSTFILE=hosts NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash launch/deepspeed.sh CONFIG ...
#
# NUM_GPUS     processes per node (--num_gpus, alias --num_accelerators; default: CUDA devices,
#              else 1). On a machine without GPUs DeepSpeed 0.19 picks its CPU accelerator
#              and --num_gpus N starts N CPU processes.
# MASTER_PORT  rendezvous port (default 29500)
# HOSTFILE, NODE_RANK, MASTER_ADDR   multi node, one launcher per node (--no_ssh)
# --no_local_rank: largebatch reads LOCAL_RANK from the environment; DeepSpeed would otherwise
# append --local_rank=N to the command line.
set -euo pipefail
PYTHON="${PYTHON:-python3}"
if [ "$#" -lt 1 ]; then echo "usage: [NUM_GPUS=N] $0 CONFIG [key=value ...]" >&2; exit 2; fi
if [ -z "${NUM_GPUS:-}" ]; then
  NUM_GPUS="$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')"
fi
ARGS=(--num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29500}" --no_local_rank)
if [ -n "${HOSTFILE:-}" ]; then
  : "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
  ARGS+=(--hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR")
fi
exec deepspeed "${ARGS[@]}" --module largebatch train "$@"
