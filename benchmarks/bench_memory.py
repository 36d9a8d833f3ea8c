"""Resident memory over a long run: 10,000 small steps with logging and checkpoints every 500.

Runs ``python -m largebatch train`` (the mlp, a tiny batch, a small subset) as a real process
and samples its RSS from outside with psutil: after warm-up (step 500, the first checkpoint
written) and at the end (the last step logged). Goal: growth < 5%.

    LARGEBATCH_DATA_ROOT=... OMP_NUM_THREADS=1 python benchmarks/bench_memory.py [--steps N]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


def _last_step(metrics: Path) -> int:
    """The step of the newest train record (0 before the first)."""
    try:
        lines = metrics.read_bytes().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # the line being written
        if rec.get("kind") == "train":
            return int(rec["step"])
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--warmup", type=int, default=500)
    args = ap.parse_args()
    root = os.environ.get("LARGEBATCH_DATA_ROOT", str(REPO / "data"))
    out = Path(tempfile.mkdtemp(prefix="bench_memory_"))
    cmd = [sys.executable, "-m", "largebatch", "train", "configs/mnist/mlp.yaml",
           f"data.root={root}", "data.download=false", "data.subset=640",
           "data.test_subset=500", "batch.global_size=8", "batch.micro_size=8",
           "train.epochs=1000", f"train.max_steps={args.steps}", "train.eval_every_samples=0",
           "log.every_steps=1", "log.progress=false", "checkpoint.every_steps=500",
           "checkpoint.keep=2", f"log.out_dir={out}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_SILENT="true")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    ps, metrics = psutil.Process(proc.pid), out / "metrics.jsonl"
    warm = peak = last = None
    t0 = time.time()
    while proc.poll() is None:
        step = _last_step(metrics)
        try:
            rss = ps.memory_info().rss
        except psutil.NoSuchProcess:
            break
        if step >= args.warmup and warm is None:
            warm = rss
        if warm is not None:
            peak = max(peak or 0, rss)
            if step < args.steps:
                last = rss  # the last sample while still training
        time.sleep(0.2)
    if proc.returncode != 0:
        sys.exit(f"run failed: {proc.stderr.read()[-2000:]}")
    wall = time.time() - t0
    mib = 2 ** 20
    growth = 100.0 * (last - warm) / warm
    print(f"steps {args.steps}, wall {wall:.0f} s, {len(list((out / 'checkpoints').glob('step-*')))}"
          f" sets kept, metrics.jsonl {metrics.stat().st_size / mib:.1f} MiB")
    print(f"RSS after warm-up (step {args.warmup}): {warm / mib:.1f} MiB; at the end: "
          f"{last / mib:.1f} MiB; peak {peak / mib:.1f} MiB; growth {growth:+.2f}% "
          f"(goal < 5%: {'ok' if growth < 5 else 'FAILED'})")


if __name__ == "__main__":
    main()
