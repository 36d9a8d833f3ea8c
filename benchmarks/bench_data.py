"""Data path: largebatch's in-memory loader vs torchvision's DataLoader(ToTensor + Normalize).

Part 1 times one epoch of batches (the whole 60k training split, shuffled, normalised) from
``largebatch.data.MemoryLoader`` and from the original study's set-up,
``DataLoader(MNIST(transform=Compose([ToTensor(), Normalize(...)])), shuffle=True)``, at
several batch sizes; contenders alternate inside every repeat and the medians are reported.
Part 2 trains seed_cnn through ``largebatch.train.build.train`` with the in-memory loader for a fixed
number of steps and reports the share of the loop spent waiting for data (the Trainer's
data-wait vs compute split of its epoch record).

    python3 benchmarks/bench_data.py --data-root "$LARGEBATCH_DATA_ROOT" --repeats 3
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (SEED_CONFIG, check_data_root, default_data_root, markdown_table,  # noqa: E402
                     median, print_machine, read_jsonl, spread, write_json)

from largebatch.config import load_config  # noqa: E402
from largebatch.data import MemoryLoader  # noqa: E402
from largebatch.data.mnist import MEAN, STD  # noqa: E402
from largebatch.train.build import train  # noqa: E402

# Steps per training measurement in part 2: about the same number of samples at every size.
FRACTION_STEPS = {60: 200, 600: 30, 6000: 4}


def time_epoch(make_batches: Callable[[], Iterable], limit: int = 0) -> tuple[float, int]:
    """Seconds to draw batches (all, or until ``limit`` samples); returns (seconds, samples)."""
    t0 = time.perf_counter()
    n = 0
    for _, y in make_batches():
        n += len(y)
        if limit and n >= limit:
            break
    return time.perf_counter() - t0, n


def memory_factory(images: torch.Tensor, labels: torch.Tensor, batch: int,
                   seed: int) -> Callable[[], Iterable]:
    """A new epoch of the in-memory loader each call (epoch counter advances like training)."""
    loader = MemoryLoader(images, labels, batch, rank=0, world=1, seed=seed, shuffle=True)
    state = {"epoch": 0}

    def epoch() -> Iterable:
        loader.set_epoch(state["epoch"])
        state["epoch"] += 1
        return iter(loader)
    return epoch


def torch_factory(root: Path, batch: int, workers: int) -> Callable[[], Iterable]:
    """The original study's loader; iterating it afresh is what one epoch costs there."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((MEAN,), (STD,))])
    ds = datasets.MNIST(root=str(root), train=True, download=False, transform=tf)
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers)
    return lambda: iter(loader)


def epoch_times(root: Path, images: torch.Tensor, labels: torch.Tensor,
                args: argparse.Namespace) -> dict[str, dict[int, list[float]]]:
    """Seconds per epoch, per contender and batch size; contenders alternate in each repeat."""
    makers = {"memory": lambda b: memory_factory(images, labels, b, args.seed)}
    for w in args.workers:
        makers[f"torch_w{w}"] = lambda b, w=w: torch_factory(root, b, w)
    times: dict[str, dict[int, list[float]]] = {k: {b: [] for b in args.batches} for k in makers}
    for batch in args.batches:
        factories = {k: make(batch) for k, make in makers.items()}
        time_epoch(factories["memory"])  # warm-up: first indexing, allocator
        for r in range(args.repeats):
            names = list(factories) if r % 2 == 0 else list(reversed(factories))
            for name in names:
                limit = args.torch_limit if name.startswith("torch") else 0
                sec, n = time_epoch(factories[name], limit)
                times[name][batch].append(sec * len(labels) / n)  # per full epoch
            print(f"  batch {batch} repeat {r}: " + ", ".join(
                f"{k} {v[batch][-1]:.3f}s" for k, v in times.items()), flush=True)
    return times


def epoch_table(times: dict[str, dict[int, list[float]]], batches: list[int]) -> str:
    """Markdown: median seconds per epoch for each contender, and the speedups."""
    torch_names = [k for k in times if k != "memory"]
    header = ["batch", "memory s/epoch (range)"]
    header += [f"{k} s/epoch (range)" for k in torch_names]
    header += [f"speedup vs {k}" for k in torch_names]
    rows = []
    for b in batches:
        mem = median(times["memory"][b])
        row = [b, f"{mem:.4f} ({spread(times['memory'][b])})"]
        row += [f"{median(times[k][b]):.3f} ({spread(times[k][b])})" for k in torch_names]
        row += [f"{median(times[k][b]) / mem:.0f}x" for k in torch_names]
        rows.append(row)
    return markdown_table(header, rows)


def loading_fraction(root: Path, batch: int, steps: int, seed: int, loader: str,
                     work: Path) -> tuple[float, float, float]:
    """Train ``steps`` steps at ``batch``; returns (data s, compute s, data share of the loop)."""
    out = work / f"frac_{loader}_{batch}"
    cfg = load_config(SEED_CONFIG, [
        f"data.root={root}", "data.download=false", "data.test_subset=1000",
        f"data.loader={loader}", f"batch.global_size={batch}", f"batch.micro_size={batch}",
        "train.device=cpu", "engine.name=single", f"train.max_steps={steps}",
        f"train.seed={seed}", "train.target_acc=0", "log.progress=false", f"log.out_dir={out}"])
    train(cfg, quiet=True)
    epochs = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("kind") == "epoch"]
    data = sum(e["data_time_s"] for e in epochs)
    compute = sum(e["compute_time_s"] for e in epochs)
    return data, compute, data / (data + compute)


def fraction_rows(root: Path, args: argparse.Namespace, work: Path) -> tuple[list, dict]:
    """Median loading share per batch size for the in-memory loader (and torch's, if asked)."""
    rows, raw = [], {}
    loaders = ["memory"] + (["torch"] if args.torch_fraction else [])
    for batch in args.batches:
        steps = FRACTION_STEPS.get(batch, max(1, 12000 // batch))
        for loader in loaders:
            reps = args.repeats if loader == "memory" else 1
            runs = [loading_fraction(root, batch, steps, args.seed, loader, work)
                    for _ in range(reps)]
            share = median(r[2] for r in runs)
            raw[f"{loader}_{batch}"] = runs
            rows.append([batch, loader, steps, median(r[0] for r in runs) / steps * 1e3,
                         median(r[1] for r in runs) / steps * 1e3, f"{share * 100:.2f}%"])
            print(f"  fraction batch {batch} {loader}: {share * 100:.2f}%", flush=True)
    return rows, raw


def main() -> None:
    """Parse the arguments, run both parts, print the markdown tables."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=default_data_root(),
                   help="MNIST root in torchvision layout (default: $LARGEBATCH_DATA_ROOT)")
    p.add_argument("--batches", type=int, nargs="+", default=[60, 600, 6000])
    p.add_argument("--workers", type=int, nargs="*", default=[0],
                   help="DataLoader num_workers values to compare (the original used 0; "
                        "none: time the in-memory loader only)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--torch-limit", type=int, default=0,
                   help="time torch's loader on this many samples and scale to an epoch (0 = all)")
    p.add_argument("--torch-fraction", action="store_true",
                   help="also measure the loading share when training with data.loader=torch")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", help="also write the raw numbers to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    root = check_data_root(args.data_root)
    print_machine({"repeats": args.repeats, "workers": args.workers})
    from torchvision.datasets import MNIST
    ds = MNIST(root=str(root), train=True, download=False)
    images, labels = ds.data.contiguous(), ds.targets.contiguous()
    times = epoch_times(root, images, labels, args)
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        rows, raw = fraction_rows(root, args, Path(tmp))
    print("\nEpoch of batches (60k samples, shuffled, normalised), median over repeats:\n")
    print(epoch_table(times, args.batches))
    print("\nLoading share of the training loop, seed_cnn on CPU through largebatch.train.build.train:\n")
    print(markdown_table(["batch", "loader", "steps", "data ms/step", "compute ms/step",
                          "data share"], rows))
    write_json(args.json, {"epoch_s": {k: {str(b): v for b, v in d.items()}
                                       for k, d in times.items()},
                           "fraction": raw, "torch_limit": args.torch_limit})


if __name__ == "__main__":
    main()
