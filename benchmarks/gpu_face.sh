#!/usr/bin/env bash
# The prepared GPU check of the face pipeline (< 8 min on an H100/H200): the GPU's name, the
# face-step benchmark's CUDA case (iresnet50, batch 128, bf16, Partial FC r = 0.1 over 1M
# classes; images/s and peak memory), then the CUDA tests (among them model.sync_bn under DDP).
# Record the RESULT lines, which name the GPU, in docs/BENCHMARKS.md.
#
# Usage, from anywhere, on a machine with an NVIDIA GPU and PyTorch:
#   bash benchmarks/gpu_face.sh [MNIST_ROOT]
# MNIST_ROOT (torchvision layout, raw files or the .gz files) only feeds the MNIST tests of
# tests/cuda, which skip without it; see gpu_check.sh for carrying it with the device tool.
# With the device tool: command "bash benchmarks/gpu_face.sh", timeout_s 580.
#
# Output goes to $OUT if set, else /tmp/gpu_face: gpu_face.log and bench_face_step.json.
# Exit status: 0 when the benchmark ran and the tests passed, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
DEST="${OUT:-/tmp/gpu_face}"
mkdir -p "$DEST"
LOG="$DEST/gpu_face.log"
: > "$LOG"
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=disabled
say() { echo "== $*" | tee -a "$LOG"; }

say "GPU"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NONE')" 2>&1 | tee -a "$LOG"

ROOT="${1:-${LARGEBATCH_DATA_ROOT:-}}"
if [ -n "$ROOT" ] && [ -d "$ROOT/MNIST/raw" ] && [ ! -f "$ROOT/MNIST/raw/train-images-idx3-ubyte" ]; then
  mkdir -p /tmp/gpu_face_data/MNIST/raw
  for f in "$ROOT"/MNIST/raw/*-ubyte.gz; do
    gunzip -c "$f" > "/tmp/gpu_face_data/MNIST/raw/$(basename "${f%.gz}")"
  done
  ROOT=/tmp/gpu_face_data
fi
[ -n "$ROOT" ] && export LARGEBATCH_DATA_ROOT="$(cd "$ROOT" && pwd)"

say "bench_face_step --device cuda (iresnet50, batch 128, bf16, r = 0.1, 1M classes)"
timeout 240 python3 benchmarks/bench_face_step.py --device cuda --warmup 5 --iters 20 \
  --json "$DEST/bench_face_step.json" 2>&1 | tee -a "$LOG"
BENCH=${PIPESTATUS[0]}
say "bench exit status: $BENCH"

say "pytest tests/cuda"
timeout 300 python3 -m pytest -q -rs -p no:cacheprovider tests/cuda 2>&1 | tee -a "$LOG"
TESTS=${PIPESTATUS[0]}
say "pytest exit status: $TESTS"

python3 - "$DEST/bench_face_step.json" <<'PY' 2>&1 | tee -a "$LOG"
import json, sys
import torch
try:
    rows = json.load(open(sys.argv[1]))
except OSError:
    sys.exit("no bench_face_step.json: the benchmark failed")
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
for r in rows:
    print(f"RESULT: face step {r['name']} batch {r['batch']} {r['precision']}, Partial FC "
          f"r=0.1 over {r['classes']:,} classes on {gpu} (torch {torch.__version__}): "
          f"{r['images_per_s']:.0f} images/s, {r['step_ms']:.1f} ms/step, "
          f"peak {r['peak_gib']:.2f} GiB")
PY

if [ "$BENCH" -eq 0 ] && [ "$TESTS" -eq 0 ]; then say "gpu_face: OK"; exit 0; fi
say "gpu_face: FAILED (bench $BENCH, tests $TESTS)"; exit 1
