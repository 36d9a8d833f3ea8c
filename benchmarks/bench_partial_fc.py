"""Partial FC head forward + backward: r = 0.1 vs r = 1.0 vs an unsharded full FC, 1 and 2 ranks.

Defaults are the issue's: C = 200,000 classes, d = 512, global batch 1024. Contenders:

- ``full_fc``: a plain ``nn.Linear``-style weight (all C classes on every rank) + F.cross_entropy
  on the rank's own rows; on 2 ranks the weight gradient is all-reduced, as DDP would.
- ``pfc_r1.0`` / ``pfc_r0.1``: ``PartialFC(ArcFace(64, 0.5), d, C, sample_rate)``, classes sharded
  over the ranks, embeddings all-gathered; each forward samples its own classes (no window).

Each (world, contender) cell runs in fresh processes (gloo on CPU, NCCL on GPUs), so its peak
memory is its own: on CPU the peak RSS (the kernel's VmHWM, reset just before) above the RSS
before the head was built, on CUDA ``max_memory_allocated`` above the same point (a tiny twin
of the contender runs first, so code paged in by the first call is not counted). The first
iteration is the warm-up and the memory measurement; the next ``--repeats`` are timed (median, max over the
ranks). The optimizer step is not included. The cells run one after another in one run of the
script; the machine is shared, so compare ratios, not absolute times.

    OMP_NUM_THREADS=1 python3 benchmarks/bench_partial_fc.py                  # CPU, 1 + 2 ranks
    python3 benchmarks/bench_partial_fc.py --device cuda --dtype bf16 --worlds 1
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, median, print_machine, spread, write_json  # noqa: E402

from largebatch.face import ArcFace, PartialFC, fc_memory  # noqa: E402

CONTENDERS = ("full_fc", "pfc_r1.0", "pfc_r0.1")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in bytes."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _reset_peak_rss() -> None:
    """Restart the kernel's RSS high-water mark (VmHWM) at the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class _FullFC:
    """Unsharded baseline: logits = E W^T over all classes, plain cross-entropy."""

    def __init__(self, classes: int, dim: int, device: torch.device, world: int) -> None:
        gen = torch.Generator(device="cpu").manual_seed(0)
        self.weight = (torch.randn(classes, dim, generator=gen) * 0.01).to(device)
        self.weight.requires_grad_(True)
        self.world = world

    def step(self, e: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> None:
        with torch.autocast(e.device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = F.linear(e, self.weight)
        F.cross_entropy(logits.float(), y).backward()
        if self.world > 1:  # what DDP would do with a replicated classifier
            dist.all_reduce(self.weight.grad)
        self.weight.grad = None


class _PFC:
    def __init__(self, classes: int, dim: int, rate: float, device: torch.device) -> None:
        self.head = PartialFC(ArcFace(64.0, 0.5), dim, classes, sample_rate=rate, device=device)

    def step(self, e: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> None:
        self.head(e, y).backward()
        self.head.end_window()  # no optimizer step here: drop the sample and its gradient
        self.head.weight.grad = None


def _build(contender: str, classes: int, dim: int, device: torch.device, world: int) -> Any:
    if contender == "full_fc":
        return _FullFC(classes, dim, device, world)
    return _PFC(classes, dim, float(contender.split("_r")[1]), device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cell(rank: int, world: int, port: int, contender: str, args: Any, out: str) -> None:
    """One (world, contender) cell on one rank: warm-up (memory), then timed iterations."""
    torch.set_num_threads(args.threads)
    device = torch.device(f"cuda:{rank}" if args.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=600))
    dtype, local = DTYPES[args.dtype], args.batch // world
    gen = torch.Generator(device="cpu").manual_seed(1 + rank)
    e = torch.randn(local, args.dim, generator=gen).to(device=device, dtype=dtype)
    e.requires_grad_(True)
    y = torch.randint(0, args.classes, (local,), generator=gen).to(device)
    # a tiny twin first: pages in the kernels' code, so the peak below is the cell's data
    _build(contender, 64 * world, args.dim, device, world).step(e[:4], y[:4] % 64, dtype)
    e.grad = None
    _sync(device)
    if device.type == "cpu":
        _reset_peak_rss()
    rss0 = _status_bytes("VmRSS") if device.type == "cpu" else 0
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    model = _build(contender, args.classes, args.dim, device, world)
    times = []
    for it in range(1 + args.repeats):
        if world > 1:
            dist.barrier()
        _sync(device)
        t0 = time.perf_counter()
        model.step(e, y, dtype)
        e.grad = None
        _sync(device)
        times.append(time.perf_counter() - t0)
        if it == 0:
            peak = (torch.cuda.max_memory_allocated(device) - base if device.type == "cuda"
                    else _status_bytes("VmHWM") - rss0)
    torch.save({"times": times[1:], "peak": peak}, f"{out}/{contender}_w{world}_r{rank}.pt")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cells(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (world, contender) cell, each in fresh processes; per-cell medians."""
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for world in args.worlds:
            for contender in CONTENDERS:
                t0 = time.perf_counter()
                mp.start_processes(_cell, args=(world, _free_port(), contender, args, out),
                                   nprocs=world, start_method="spawn")
                ranks = [torch.load(f"{out}/{contender}_w{world}_r{r}.pt") for r in range(world)]
                per_iter = [max(r["times"][i] for r in ranks) for i in range(args.repeats)]
                rate = 1.0 if contender == "full_fc" else float(contender.split("_r")[1])
                plan = fc_memory(args.classes, args.dim, 1 if contender == "full_fc" else world,
                                 rate, optimizer="none", global_micro_batch=args.batch)
                rows.append({"world": world, "contender": contender,
                             "ms": 1e3 * median(per_iter),
                             "spread_ms": spread([1e3 * t for t in per_iter]),
                             "peak_mb": max(r["peak"] for r in ranks) / 2 ** 20,
                             "weights_mb": plan["weight_bytes"] / 2 ** 20,
                             "cell_s": time.perf_counter() - t0})
                print(f"  world {world} {contender}: {rows[-1]['ms']:.0f} ms, "
                      f"peak {rows[-1]['peak_mb']:.0f} MB/rank", flush=True)
    return rows


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """The table, the ratios and the floors."""
    cell = {(r["world"], r["contender"]): r for r in rows}
    print(markdown_table(["world", "contender", "fwd+bwd ms (median)", "spread ms",
                          "peak MB / rank", "weights MB / rank"],
                         [[r["world"], r["contender"], r["ms"], r["spread_ms"], r["peak_mb"],
                           r["weights_mb"]] for r in rows]))
    ratios, ok = {}, True
    for w in args.worlds:
        full = cell[(w, "full_fc")]
        for c in ("pfc_r1.0", "pfc_r0.1"):
            ratios[f"w{w} full_fc / {c} time"] = full["ms"] / cell[(w, c)]["ms"]
        speed, dense = (ratios[f"w{w} full_fc / {c} time"] for c in ("pfc_r0.1", "pfc_r1.0"))
        ok &= speed >= 4.0
        print(f"world {w}: r=0.1 is {speed:.2f}x faster than the full FC (floor 4x) "
              f"{'PASS' if speed >= 4 else 'FAIL'}; r=1.0 {dense:.2f}x")
    if 1 in args.worlds and 2 in args.worlds:
        for c in CONTENDERS:
            ratio = cell[(1, c)]["peak_mb"] / cell[(2, c)]["peak_mb"]
            ratios[f"{c} peak w1 / w2"] = ratio
            expect = "replicated, batch halves" if c == "full_fc" else "C / world: expect ~2"
            print(f"{c}: peak memory per rank, 1 rank / 2 ranks = {ratio:.2f} ({expect})")
    return {"rows": rows, "ratios": ratios, "floors_ok": bool(ok)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--batch", type=int, default=1024, help="global batch (split over ranks)")
    p.add_argument("--worlds", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2])
    p.add_argument("--repeats", type=int, default=2, help="timed iterations after the warm-up")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per rank")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="embedding / matmul dtype (the softmax reductions stay fp32)")
    p.add_argument("--json", default=None, help="also write the raw results here")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    print_machine({"classes": args.classes, "dim": args.dim, "global_batch": args.batch,
                   "device": args.device, "dtype": args.dtype, "repeats": args.repeats})
    t0 = time.perf_counter()
    result = report(run_cells(args), args)
    print(f"total {time.perf_counter() - t0:.0f} s")
    write_json(args.json, vars(args) | result)
    sys.exit(0 if result["floors_ok"] else 1)


if __name__ == "__main__":
    main()
