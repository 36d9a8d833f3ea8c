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
do not depend on its load. ``--rounds N`` runs every arm N times (round r at seed + r, the
arms' order rotated by r, so that the machine's drift does not always hit the same arm) and
judges on the medians. Writes the tables, a JSON file and a figure (the first round: test
accuracy and global batch against training seconds).

    OMP_NUM_THREADS=2 python3 benchmarks/bench_goodput.py --data-root "$LARGEBATCH_DATA_ROOT" \
        --rounds 3 --json docs/goodput/race.json --figure docs/goodput/race.png
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (SEED_CONFIG, check_data_root, default_data_root,  # noqa: E402
                     markdown_table, print_machine, write_json)

from largebatch.config import load_config  # noqa: E402
from largebatch.train.build import train  # noqa: E402


def arm_overrides(kind: str, batch: int, args: argparse.Namespace, out: Path) -> list[str]:
    """The seed recipe's overrides for one arm (shared keys first)."""
    common = [f"data.root={args.data_root}", "data.download=false", "data.loader=memory",
              f"train.target_acc={args.target}", "train.stop_at_target=true",
              f"train.eval_every_samples={args.eval_every}",
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


def run_arm(kind: str, batch: int, args: argparse.Namespace, root: Path,
            seed: int) -> dict[str, Any]:
    """Train one arm at ``seed``; its row, with the eval curve and the batch trajectory."""
    name = f"{kind}-{batch}" if kind != "goodput" else "goodput-from-60"
    out = root / f"{name}-seed{seed}"
    cfg = load_config(SEED_CONFIG, arm_overrides(kind, batch, args, out) +
                      [f"train.seed={seed}"])
    print(f"running {name} (seed {seed}): peak LR follows {cfg.optim.scale_rule} ...",
          flush=True)
    s = train(cfg, quiet=True)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["time_s"], r["val_acc"]) for r in records if r["kind"] == "eval"]
    changes = [(c["time_s"], c["global_size"]) for c in s["plan_changes"]
               if c.get("action") == "adapt"]
    return {"arm": name, "kind": kind, "seed": seed, "start_batch": s["plan"]["global_size"],
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


def _median(values: list[Optional[float]]) -> Optional[float]:
    """The median with "not reached" (None) counted as slower than anything; None if it is."""
    m = statistics.median([math.inf if v is None else v for v in values])
    return None if math.isinf(m) else m


def medians(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per arm over the rounds: the rounds' times and epochs to the target (None: not
    reached), their medians (a round that missed the target counts as the slowest), how many
    reached it."""
    out = []
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = [r for r in rows if r["arm"] == arm]
        times = [r["time_to_target_s"] for r in mine]
        epochs = [r["epochs_to_target"] for r in mine]
        out.append({"arm": arm, "kind": mine[0]["kind"], "rounds": len(mine),
                    "reached": sum(r["reached"] for r in mine), "times_s": times,
                    "epochs": epochs, "median_time_s": _median(times),
                    "median_epochs": _median(epochs)})
    return out


def median_table(summary: list[dict[str, Any]], target: float) -> str:
    """One markdown row per arm: the rounds' times, their median, and it over goodput's."""
    pct = f"{100 * target:g}%"
    ref = next(m for m in summary if m["kind"] == "goodput")
    cell = (lambda v, spec: "-" if v is None else format(v, spec))
    rows = []
    for m in summary:
        rel = "-"
        if m is not ref and m["median_time_s"] and ref["median_time_s"]:
            rel = f"{m['median_time_s'] / ref['median_time_s']:.2f}"
        rows.append([m["arm"], f"{m['reached']}/{m['rounds']}",
                     " / ".join(cell(t, ".1f") for t in m["times_s"]),
                     cell(m["median_time_s"], ".1f"),
                     " / ".join(cell(e, ".2f") for e in m["epochs"]),
                     cell(m["median_epochs"], ".2f"), rel])
    return markdown_table(["arm", f"reached {pct}", "train s per round", "median s",
                           "epochs per round", "median epochs", "median / goodput's"], rows)


def verdict(summary: list[dict[str, Any]], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per family of fixed arms (``fixed``: the study's sweep; ``linear``: the same LR rule as
    goodput): whether goodput's median beats every arm's median, and the rounds in which it
    beat every arm of the family."""
    ref = next(m for m in summary if m["kind"] == "goodput")
    out: dict[str, Any] = {"rounds": len({r["seed"] for r in rows})}
    for kind in ("fixed", "linear"):
        others = [m for m in summary if m["kind"] == kind]
        if not others:
            continue
        out[f"beats_every_{kind}_median"] = ref["median_time_s"] is not None and all(
            m["median_time_s"] is None or ref["median_time_s"] < m["median_time_s"]
            for m in others)
        wins = 0
        for seed in dict.fromkeys(r["seed"] for r in rows):
            mine = [r for r in rows if r["seed"] == seed]
            g = next(r for r in mine if r["kind"] == "goodput")
            wins += bool(g["reached"] and all(not r["reached"] or g["time_to_target_s"] <
                                              r["time_to_target_s"]
                                              for r in mine if r["kind"] == kind))
        out[f"rounds_beating_every_{kind}"] = wins
    return out


def report(rows: list[dict[str, Any]], args: argparse.Namespace, n_arms: int,
           run_args: Optional[dict[str, Any]] = None) -> None:
    """The medians table and the verdicts on stdout; the figure (the first round's
    ``n_arms`` rows) and the JSON file, with ``run_args`` (default: ``args``) as the run's."""
    summary = medians(rows)
    result = verdict(summary, rows)
    print("\n" + median_table(summary, args.target))
    ref = next(m for m in summary if m["kind"] == "goodput")
    shown = "not reached" if ref["median_time_s"] is None else f"{ref['median_time_s']:.1f} s"
    print(f"\ngoodput-from-60: median {shown} over {result['rounds']} round(s)")
    for kind, what in (("fixed", "the study's fixed batches (LR 0.02)"),
                       ("linear", "the fixed batches with goodput's linear LR rule")):
        if f"beats_every_{kind}_median" in result:
            print(f"  vs {what}: beats every median: "
                  f"{'YES' if result[f'beats_every_{kind}_median'] else 'NO'}; beat them all in "
                  f"{result[f'rounds_beating_every_{kind}']}/{result['rounds']} rounds")
    if args.figure:
        figure(rows[:n_arms], args.target, Path(args.figure))
    shown_args = run_args or {k: v for k, v in vars(args).items()
                              if k not in ("data_root", "out_dir", "report")}
    write_json(args.json, {"args": shown_args, "rows": rows, "medians": summary, **result})


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
    p.add_argument("--seed", type=int, default=1, help="the first round's seed")
    p.add_argument("--rounds", type=int, default=1,
                   help="rounds of every arm, round r at seed + r, the arms' order rotated "
                        "by r (so no arm always runs first or last); medians over rounds")
    p.add_argument("--every", type=int, default=50, help="batch.adapt_every_steps")
    p.add_argument("--max-micro", type=int, default=960, help="batch.adapt_max_micro")
    p.add_argument("--max-global", type=int, default=3840, help="batch.max_global_size")
    p.add_argument("--warmup-steps", type=int, default=300,
                   help="untimed steps before the first arm (0: none)")
    p.add_argument("--out-dir", default=None, help="run folders (default: a temporary one)")
    p.add_argument("--report", default=None, metavar="JSON",
                   help="train nothing: re-render the tables, verdicts and figure from the "
                        "rows of an earlier run's --json file")
    p.add_argument("--json", default=None)
    p.add_argument("--figure", default=None)
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    """Run the rounds of arms, print the tables and the verdicts."""
    args = parse_args(argv)
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        rows = saved["rows"]
        report(rows, args, sum(r["seed"] == rows[0]["seed"] for r in rows), saved["args"])
        return 0
    args.data_root = str(check_data_root(args.data_root))
    print_machine({"target": args.target, "eval_every_samples": args.eval_every})
    arms = [("goodput", 60)] + [("fixed", b) for b in args.fixed] + \
        [("linear", b) for b in args.linear]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench_goodput_") as tmp:
        root = Path(args.out_dir or tmp)
        if args.warmup_steps:  # the first run in a process is slower (allocator, caches)
            print(f"warm-up: {args.warmup_steps} untimed steps at batch 60 ...", flush=True)
            train(load_config(SEED_CONFIG, arm_overrides("fixed", 60, args, root / "warmup") +
                              [f"train.max_steps={args.warmup_steps}"]), quiet=True)
        for r in range(args.rounds):
            order = arms[r % len(arms):] + arms[:r % len(arms)]
            done = [run_arm(kind, b, args, root, args.seed + r) for kind, b in order]
            rows += sorted(done, key=lambda row: arms.index((row["kind"], row["start_batch"])))
            print(f"\nround {r + 1} (seed {args.seed + r}):\n" +
                  table(rows[-len(arms):], args.target), flush=True)
    report(rows, args, len(arms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
