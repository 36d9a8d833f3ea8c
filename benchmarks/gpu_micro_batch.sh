#!/usr/bin/env bash
# The prepared GPU check of `batch.micro_size: auto` (~2-4 min on an H100/H200): the CUDA tests
# of the search (tests/cuda/test_micro_batch_cuda.py: real OOMs, no leaked memory, same weights
# as the explicit micro size), then the search itself on two models, each line naming the GPU,
# the size found, its measured peak (torch.cuda.max_memory_allocated) against the limit, the
# trial steps, how many ran out of memory, and the seconds the search took. Record those lines
# in docs/BENCHMARKS.md.
#
# Usage, from anywhere, on a machine with an NVIDIA GPU and PyTorch:
#   bash benchmarks/gpu_micro_batch.sh [MNIST_ROOT]
# MNIST_ROOT (for the end-to-end test; the searches need no data) as in gpu_check.sh:
# $LARGEBATCH_DATA_ROOT, shared/data, ../shared/data, .gpu_data, data (.gz files are unpacked).
# With this workplace's device tool: command "bash benchmarks/gpu_micro_batch.sh .gpu_data",
# carry [".gpu_data"], timeout_s 360 (see gpu_check.sh for preparing .gpu_data).
#
# Writes to $OUT if set, else /tmp/gpu_micro_batch: gpu_micro_batch.log and results.jsonl.
# Exit status: 0 when the tests passed and both searches finished, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
DEST="${OUT:-/tmp/gpu_micro_batch}"
mkdir -p "$DEST"
LOG="$DEST/gpu_micro_batch.log"
: > "$LOG"
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=disabled
say() { echo "== $*" | tee -a "$LOG"; }

for d in "${1:-}" "${LARGEBATCH_DATA_ROOT:-}" shared/data ../shared/data .gpu_data data; do
  if [ -n "$d" ] && [ -d "$d/MNIST/raw" ]; then ROOT="$d"; break; fi
done
if [ -n "${ROOT:-}" ] && [ ! -f "$ROOT/MNIST/raw/train-images-idx3-ubyte" ]; then
  mkdir -p /tmp/gpu_mb_data/MNIST/raw
  for f in "$ROOT"/MNIST/raw/*-ubyte.gz; do
    gunzip -c "$f" > "/tmp/gpu_mb_data/MNIST/raw/$(basename "${f%.gz}")"
  done
  ROOT=/tmp/gpu_mb_data
fi
[ -n "${ROOT:-}" ] && export LARGEBATCH_DATA_ROOT="$(cd "$ROOT" && pwd)"
say "MNIST root: ${LARGEBATCH_DATA_ROOT:-none (the end-to-end test skips)}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"

say "pytest tests/cuda/test_micro_batch_cuda.py"
timeout 200 python3 -m pytest -q -rs -p no:cacheprovider tests/cuda/test_micro_batch_cuda.py \
  2>&1 | tee -a "$LOG"
TESTS=${PIPESTATUS[0]}
say "pytest exit status: $TESTS"

say "searches (fp32 MLP hidden 65536, bf16 IResNet-50 112x112 + 1000-class head)"
timeout 240 python3 - "$DEST/results.jsonl" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys, tempfile, time
import torch
import torch.nn.functional as F
from torch import nn
from largebatch.config import load_config
from largebatch.models.mnist import MLP
from largebatch.models.iresnet import iresnet
from largebatch.plan import micro_candidates
from largebatch.tune import micro_batch as mb
from largebatch.tune.step_memory import cuda_trial

dev = torch.device("cuda")
gpu = torch.cuda.get_device_name(dev)
out = open(sys.argv[1], "w")

def search(name, model, shape, classes, global_size, precision, loss):
    model = model.to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(8, *shape, device=dev)
    y = torch.randint(0, classes, (8,), device=dev)
    cfg = load_config(None, ["batch.micro_size=auto", f"batch.global_size={global_size}",
                             f"train.precision={precision}", "train.device=cuda",
                             f"log.out_dir={tempfile.mkdtemp()}"])
    limit = mb.memory_limit(cfg, dev)
    start = time.perf_counter()
    found, peaks = mb.run_search(micro_candidates(global_size, 1),
                                 cuda_trial(model, opt, loss, x, y, precision, limit))
    secs = time.perf_counter() - start
    row = {"gpu": gpu, "model": name, "precision": precision, "per_rank_batch": global_size,
           "micro_size": found, "peak_gib": round(peaks[found] / 2**30, 2),
           "limit_gib": round(limit / 2**30, 2), "trials": len(peaks),
           "ooms": sum(v is None for v in peaks.values()), "search_s": round(secs, 1),
           "tried": {str(k): None if v is None else round(v / 2**30, 2) for k, v in peaks.items()},
           "allocated_after_gib": round(torch.cuda.memory_allocated(dev) / 2**30, 3)}
    print(json.dumps(row), flush=True)
    out.write(json.dumps(row) + "\n")
    del model, opt
    torch.cuda.empty_cache()

search("mlp-65536", MLP(65536), (1, 28, 28), 10, 393216, "fp32",
       lambda m, a, b: F.nll_loss(m(a), b))
head = nn.Sequential(iresnet("iresnet50", 512), nn.Linear(512, 1000))
search("iresnet50+fc1000", head, (3, 112, 112), 1000, 8192, "bf16",
       lambda m, a, b: F.cross_entropy(m(a).float(), b))
EOF
SEARCH=${PIPESTATUS[0]}
say "search exit status: $SEARCH"
[ "$TESTS" -eq 0 ] && [ "$SEARCH" -eq 0 ]
