#!/usr/bin/env bash
# The one prepared GPU check (< 5 min on an H100): the CUDA tests, then MNIST time to 98% test
# accuracy on that GPU with the in-memory loader on the device. Record its last line, which
# names the GPU, in docs/BENCHMARKS.md.
#
# Usage, from anywhere, on a machine with an NVIDIA GPU and PyTorch:
#   bash benchmarks/gpu_check.sh [MNIST_ROOT]
# MNIST_ROOT (torchvision layout: MNIST/raw/...) defaults to $LARGEBATCH_DATA_ROOT, then
# shared/data, ../shared/data, .gpu_data, data. A root holding only the .gz files is fine: they
# are unpacked to /tmp (torchvision with download=false wants the raw files).
#
# With this workplace's device tool (its working-tree copy has no ../shared; the .gz files are
# 11.6 MB, inside the 64 MiB carry limit), once, here, in the repository root:
#   echo /.gpu_data/ >> .git/info/exclude
#   mkdir -p .gpu_data/MNIST/raw && cp "$LARGEBATCH_DATA_ROOT"/MNIST/raw/*.gz .gpu_data/MNIST/raw/
# then run: command "bash benchmarks/gpu_check.sh .gpu_data", carry [".gpu_data"], timeout_s 420.
#
# Everything it writes goes to $OUT (the device tool's output folder) if set, else
# /tmp/gpu_check: gpu_check.log (all output), summary.json and metrics.jsonl of the MNIST run.
# Exit status: 0 when the tests passed and the run reached 98%, 1 otherwise, 2 without data.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
DEST="${OUT:-/tmp/gpu_check}"
RUN_DIR=/tmp/gpu_check_run  # the run's full output; only three files are copied to $DEST
mkdir -p "$DEST"
LOG="$DEST/gpu_check.log"
: > "$LOG"
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=disabled
say() { echo "== $*" | tee -a "$LOG"; }

find_root() {  # the first candidate that holds MNIST/raw
  for d in "$@"; do
    if [ -n "$d" ] && [ -d "$d/MNIST/raw" ]; then echo "$d"; return 0; fi
  done
  return 1
}

ROOT=$(find_root "${1:-}" "${LARGEBATCH_DATA_ROOT:-}" shared/data ../shared/data .gpu_data data) || {
  say "no MNIST found (pass MNIST_ROOT or set LARGEBATCH_DATA_ROOT)"; exit 2; }
if [ ! -f "$ROOT/MNIST/raw/train-images-idx3-ubyte" ]; then
  mkdir -p /tmp/gpu_check_data/MNIST/raw
  for f in "$ROOT"/MNIST/raw/*-ubyte.gz; do
    gunzip -c "$f" > "/tmp/gpu_check_data/MNIST/raw/$(basename "${f%.gz}")" || exit 2
  done
  ROOT=/tmp/gpu_check_data
fi
ROOT=$(cd "$ROOT" && pwd)
export LARGEBATCH_DATA_ROOT="$ROOT"
say "MNIST root: $ROOT"

say "GPU"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NONE')" 2>&1 | tee -a "$LOG"

say "pytest tests/cuda"
timeout 170 python3 -m pytest -q -rs -p no:cacheprovider tests/cuda 2>&1 | tee -a "$LOG"
TESTS=${PIPESTATUS[0]}
say "pytest exit status: $TESTS"

say "MNIST seed_cnn, batch 60, time to 98% (in-memory loader on the device)"
rm -rf "$RUN_DIR"
timeout 150 python3 -m largebatch train configs/mnist/seed.yaml "data.root=$ROOT" \
  data.download=false data.loader=memory data.on_device=true train.device=cuda \
  train.target_acc=0.98 train.stop_at_target=true train.epochs=5 \
  train.eval_every_samples=6000 log.progress=false "log.out_dir=$RUN_DIR" 2>&1 | tee -a "$LOG"
TRAIN=${PIPESTATUS[0]}
say "train exit status: $TRAIN"
cp "$RUN_DIR/summary.json" "$RUN_DIR/metrics.jsonl" "$DEST/" 2>/dev/null

python3 - "$RUN_DIR" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path
import torch
run = Path(sys.argv[1])
try:
    s = json.loads((run / "summary.json").read_text())
except OSError:
    sys.exit("no summary.json: the run failed")
epochs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()
          if '"kind": "epoch"' in l]
data = sum(e["data_time_s"] for e in epochs)
compute = sum(e["compute_time_s"] for e in epochs)
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
keys = ("reached_target", "time_to_target_s", "steps_to_target", "epochs_to_target",
        "final_val_acc", "train_time_s", "wall_s", "steps", "stop_reason")
print("summary: " + json.dumps({k: s.get(k) for k in keys}))
print(f"loading share of the training loop: {100 * data / max(data + compute, 1e-12):.2f}% "
      f"(data {data:.2f} s, compute {compute:.2f} s)")
ttt = s.get("time_to_target_s")
print(f"RESULT: MNIST seed_cnn batch 60 on {gpu} (torch {torch.__version__}): "
      + (f"98% test accuracy after {ttt:.2f} s of training, {s['steps_to_target']} steps, "
         f"{s['epochs_to_target']:.1f} epochs" if s.get("reached_target")
         else f"98% NOT reached (final {s.get('final_val_acc')})"))
EOF

if [ "$TESTS" -eq 0 ] && [ "$TRAIN" -eq 0 ] && grep -q '"reached_target": true' "$RUN_DIR/summary.json" 2>/dev/null; then
  say "gpu_check: OK"; exit 0
fi
say "gpu_check: FAILED (tests $TESTS, train $TRAIN)"; exit 1
