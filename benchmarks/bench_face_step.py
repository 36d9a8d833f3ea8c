"""Images per second of the whole face step, single process: backbone + Partial FC head,
forward + backward + both optimizer steps (torch SGD on the backbone, PartialFCSGD on the head).

The step is the face task's own path (``FaceTask.build``/``begin_window``/``loss`` and
``sharded_optimizer``), under ``torch.autocast`` at bf16 as the engine would wrap it. Each case
runs ``--warmup`` untimed steps, then ``--iters`` timed ones (median, spread); the batch is
fixed random images with random labels (data loading is not part of the step).

    OMP_NUM_THREADS=1 python3 benchmarks/bench_face_step.py            # CPU: tiny_face, iresnet50
    python3 benchmarks/bench_face_step.py --device cuda                # GPU: the issue's case

CPU cases (fp32): tiny_face (16 x 16 images, d = 32) and iresnet50 (112 x 112, d = 512) at
batch ``--batch`` (default 8) over ``--classes`` (default 10,000) at r = 0.1. CUDA case:
iresnet50 at batch 128, bf16 autocast, r = 0.1 over 1,000,000 classes, d = 512, plus the
peak memory (``max_memory_allocated``) and the GPU's name.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, median, print_machine, spread, write_json  # noqa: E402

from largebatch.config import load_config  # noqa: E402
from largebatch.optim import build_optimizer  # noqa: E402
from largebatch.tasks.face import FaceTask  # noqa: E402


def _case(name: str, model: str, batch: int, classes: int, precision: str, image: int,
          dim: int, channels_last: bool = False) -> dict[str, Any]:
    return dict(name=name, model=model, batch=batch, classes=classes, precision=precision,
                image=image, dim=dim, channels_last=channels_last)


def cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The CPU pair, or the issue's GPU case (with and without channels-last)."""
    if args.device == "cuda":
        return [_case("iresnet50", "iresnet50", 128, 1_000_000, "bf16", 112, 512),
                _case("iresnet50 channels_last", "iresnet50", 128, 1_000_000, "bf16", 112, 512,
                      channels_last=True)]
    return [_case("tiny_face", "tiny_face", args.batch, args.classes, "fp32", 16, 32),
            _case("iresnet50", "iresnet50", args.batch, args.classes, "fp32", 112, 512)]


def run_case(case: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Build the task's parts on the device, then time whole steps."""
    device = torch.device(args.device)
    cfg = load_config(None, [
        "task.name=face", "data.name=synthetic_faces", f"model.name={case['model']}",
        f"model.channels_last={str(case['channels_last']).lower()}",
        f"face.image_size={case['image']}", f"face.embedding_size={case['dim']}",
        f"face.num_classes={case['classes']}", f"face.sample_rate={args.sample_rate}",
        "optim.momentum=0.9", "optim.weight_decay=0.0005", "train.seed=0"])
    torch.manual_seed(0)
    task = FaceTask(cfg)
    parts = task.build()
    model, head = parts.model.to(device), parts.sharded[0].to(device)
    opt = build_optimizer(cfg.optim, model, lr=0.1)
    head_opt = task.sharded_optimizer(head, lr=0.1)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(case["batch"], 3, case["image"], case["image"], generator=gen).to(device)
    y = torch.randint(0, case["classes"], (case["batch"],), generator=gen).to(device)
    dtype = {"fp32": None, "bf16": torch.bfloat16}[case["precision"]]

    def step() -> None:
        task.begin_window([y])
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = task.loss(model, x, y)
        loss.backward()
        opt.step()
        head_opt.step()
        opt.zero_grad(set_to_none=True)
        head_opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    row = dict(case, step_ms=1e3 * median(times), spread_ms=spread([1e3 * t for t in times]),
               images_per_s=case["batch"] / median(times))
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, default=8, help="CPU cases' batch (GPU: 128)")
    p.add_argument("--classes", type=int, default=10_000, help="CPU cases' classes (GPU: 1M)")
    p.add_argument("--sample-rate", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_face_step: error: --device cuda but torch sees no CUDA device")
    extra = {"warmup": args.warmup, "iters": args.iters, "sample_rate": args.sample_rate}
    if args.device == "cuda":
        extra["gpu"] = torch.cuda.get_device_name(0)
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its kernels
    print_machine(extra)
    rows = []
    for case in cases(args):
        rows.append(run_case(case, args))
        print(f"  {case['name']}: {rows[-1]['images_per_s']:.1f} images/s", flush=True)
    header = ["backbone", "batch", "classes", "precision", "step ms (median)", "spread ms",
              "images/s"]
    table = [[r["name"], r["batch"], r["classes"], r["precision"], r["step_ms"], r["spread_ms"],
              r["images_per_s"]] for r in rows]
    if args.device == "cuda":
        header.append("peak GiB")
        for line, r in zip(table, rows):
            line.append(r["peak_gib"])
    print(markdown_table(header, table))
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
