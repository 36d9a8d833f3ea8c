"""``batch.adapt: goodput`` from batch 60 vs fixed batch sizes on the real MNIST: time to 98%.

The race of issue 12: the seed recipe (``configs/mnist/seed.yaml``: seed_cnn, SGD lr 0.02,
momentum 0.5) at fixed global batches, against the same recipe started at batch 60 with
``batch.adapt=goodput`` (micro 30 x accum 2: on one process the window's micro-batches are the
noise scale's small batches), the LR following the linear rule from batch 60. Two families of
fixed batches run next to it, one after the other in this one process:

* ``fixed``: the study's sweep (LR 0.02 at every batch, as ``docs/study`` runs it);
* ``linear``: the same linear LR rule as the adaptive run (LR 0.02 x B / 60), the fairer bar.

Every arm: the same data, seed, evaluation cadence (``--eval-every`` samples, excluded from the
times), ``train.stop_at_target``, at most ``--epochs`` epochs and ``--budget`` training seconds.
Training seconds to the target are measured side by side on this machine, epochs to the target
do not depend on its load. Writes a table, a JSON file and a figure (test accuracy and global
batch against training seconds).

    OMP_NUM_THREADS=2 python3 benchmarks/bench_goodput.py --data-root "$LARGEBATCH_DATA_ROOT" \
        --json docs/goodput/race.json --figure docs/goodput/race.png
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (SEED_CONFIG, check_data_root, default_data_root,  # noqa: E402
                     markdown_table, print_machine, write_json)

from largebatch.config import load_config  # noqa: E402
from largebatch.run import train  # noqa: E402


def arm_overrides(kind: str, batch: int, args: argparse.Namespace, out: Path) -> list[str]:
    """The seed recipe's overrides for one arm (shared keys first)."""
    common = [f"data.root={args.data_root}", "data.download=false", "data.loader=memory",
              f"train.target_acc={args.target}", "train.stop_at_target=true",
              f"train.eval_every_samples={args.eval_every}", f"train.seed={args.seed}",
              f"train.epochs={args.epochs}", f"train.time_budget_s={args.budget}",
              f"log.out_dir={out}", "log.progress=false", "log.every_steps=10",
              "log.wandb.mode=disabled", "checkpoint.resume=never"]
    if kind == "fixed":
        return common + [f"batch.global_size={batch}", f"batch.micro_size={batch}"]
    linear = ["optim.scale_rule=linear", "optim.base_batch=60"]
    if kind == "linear":
        return common + linear + [f"batch.global_size={batch}", f"batch.micro_size={batch}"]
    return common + linear + [
        "batch.global_size=60", "batch.micro_size=30", "batch.adapt=goodput",
        f"batch.adapt_every_steps={args.every}", f"batch.adapt_max_micro={args.max_micro}",
        f"batch.max_global_size={args.max_global}"]


def run_arm(kind: str, batch: int, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Train one arm; its row, with the eval curve and the batch trajectory."""
    name = f"{kind}-{batch}" if kind != "goodput" else "goodput-from-60"
    out = root / name
    cfg = load_config(SEED_CONFIG, arm_overrides(kind, batch, args, out))
    print(f"running {name}: peak LR follows {cfg.optim.scale_rule} ...", flush=True)
    s = train(cfg, quiet=True)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["time_s"], r["val_acc"]) for r in records if r["kind"] == "eval"]
    changes = [(c["time_s"], c["global_size"]) for c in s["plan_changes"]
               if c.get("action") == "adapt"]
    return {"arm": name, "kind": kind, "start_batch": s["plan"]["global_size"],
            "final_batch": changes[-1][1] if changes else s["plan"]["global_size"],
            "peak_lr": s["plan"]["peak_lr"], "final_lr": s["final_lr"],
            "reached": s["reached_target"], "time_to_target_s": s["time_to_target_s"],
            "epochs_to_target": s["epochs_to_target"], "steps_to_target": s["steps_to_target"],
            "best_val_acc": max((a for _, a in evals), default=float("nan")),
            "stop_reason": s["stop_reason"], "evals": evals, "batch_trajectory": changes,
            "plan_changes": s["plan_changes"]}


def table(rows: list[dict[str, Any]], target: float) -> str:
    """One markdown row per arm, with its time relative to the adaptive arm's."""
    pct = f"{100 * target:g}%"
    ref = next((r for r in rows if r["kind"] == "goodput"), None)
    out = []
    for r in rows:
        rel = "-"
        if ref and ref["reached"] and r["reached"] and r is not ref:
            rel = f"{r['time_to_target_s'] / ref['time_to_target_s']:.2f}"
        fmt = (lambda v, spec: "not reached" if v is None else format(v, spec))
        out.append([r["arm"], r["start_batch"], r["final_batch"], f"{r['peak_lr']:.4g}",
                    fmt(r["epochs_to_target"], ".2f"), fmt(r["steps_to_target"], "d"),
                    fmt(r["time_to_target_s"], ".1f"), rel, f"{r['best_val_acc']:.4f}",
                    r["stop_reason"]])
    return markdown_table(["arm", "batch", "final batch", "start LR", f"epochs to {pct}",
                           f"steps to {pct}", f"train s to {pct}", "time / goodput's",
                           "best test acc", "stop"], out)


def figure(rows: list[dict[str, Any]], target: float, path: Path) -> None:
    """Test accuracy and global batch against training seconds, one line per arm."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (acc, bat) = plt.subplots(2, 1, figsize=(8, 8), sharex=True)
    for r in rows:
        style = {"linewidth": 2.5, "color": "black"} if r["kind"] == "goodput" else \
            {"linestyle": "--" if r["kind"] == "fixed" else "-", "alpha": 0.8}
        if r["evals"]:
            t, a = zip(*r["evals"])
            acc.plot(t, a, marker=".", label=r["arm"], **style)
        end = r["evals"][-1][0] if r["evals"] else 0.0
        points = [(0.0, r["start_batch"])] + r["batch_trajectory"] + [(end, r["final_batch"])]
        bat.step([p[0] for p in points], [p[1] for p in points], where="post", **style)
    acc.axhline(target, color="grey", linewidth=0.8)
    acc.set_ylim(max(0.9, target - 0.05), 1.0)
    acc.set_ylabel("test accuracy")
    acc.legend(fontsize=8, ncol=2)
    bat.set_yscale("log")
    bat.set_ylabel("global batch")
    bat.set_xlabel("training seconds (evaluation excluded)")
    fig.suptitle("MNIST seed recipe: batch.adapt=goodput from 60 vs fixed batches")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=default_data_root())
    p.add_argument("--fixed", nargs="*", type=int, default=[60, 600, 6000],
                   help="fixed batches at LR 0.02 (the study's sweep)")
    p.add_argument("--linear", nargs="*", type=int, default=[120, 240, 480, 960],
                   help="fixed batches at LR 0.02 x B / 60")
    p.add_argument("--target", type=float, default=0.98)
    p.add_argument("--eval-every", type=int, default=6000, help="samples between evaluations")
    p.add_argument("--epochs", type=float, default=6.0)
    p.add_argument("--budget", type=float, default=150.0, help="training seconds per arm")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--every", type=int, default=50, help="batch.adapt_every_steps")
    p.add_argument("--max-micro", type=int, default=960, help="batch.adapt_max_micro")
    p.add_argument("--max-global", type=int, default=3840, help="batch.max_global_size")
    p.add_argument("--warmup-steps", type=int, default=300,
                   help="untimed steps before the first arm (0: none)")
    p.add_argument("--out-dir", default=None, help="run folders (default: a temporary one)")
    p.add_argument("--json", default=None)
    p.add_argument("--figure", default=None)
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    """Run the arms (adaptive first, then the fixed ones), print the table and the verdict."""
    args = parse_args(argv)
    args.data_root = str(check_data_root(args.data_root))
    print_machine({"target": args.target, "eval_every_samples": args.eval_every})
    arms = [("goodput", 60)] + [("fixed", b) for b in args.fixed] + \
        [("linear", b) for b in args.linear]
    with tempfile.TemporaryDirectory(prefix="bench_goodput_") as tmp:
        root = Path(args.out_dir or tmp)
        if args.warmup_steps:  # the first run in a process is slower (allocator, caches)
            print(f"warm-up: {args.warmup_steps} untimed steps at batch 60 ...", flush=True)
            train(load_config(SEED_CONFIG, arm_overrides("fixed", 60, args, root / "warmup") +
                              [f"train.max_steps={args.warmup_steps}"]), quiet=True)
        rows = [run_arm(kind, b, args, root) for kind, b in arms]
    print("\n" + table(rows, args.target))
    ref = rows[0]
    fixed = [r for r in rows[1:] if r["reached"]]
    best = min(fixed, key=lambda r: r["time_to_target_s"], default=None)
    beats = ref["reached"] and all(ref["time_to_target_s"] < r["time_to_target_s"] for r in fixed)
    shown = f"{best['arm']} ({best['time_to_target_s']:.1f} s)" if best else "none reached"
    mine = f"{ref['time_to_target_s']:.1f} s" if ref["reached"] else "not reached"
    print(f"\nbest fixed: {shown}; goodput-from-60: {mine}; beats every fixed batch: "
          f"{'YES' if beats else 'NO'}")
    if args.figure:
        figure(rows, args.target, Path(args.figure))
    shown_args = {k: v for k, v in vars(args).items() if k not in ("data_root", "out_dir")}
    write_json(args.json, {"args": shown_args, "rows": rows, "beats_every_fixed": beats})
    return 0


if __name__ == "__main__":
    sys.exit(main())
