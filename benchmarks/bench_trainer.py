"""largebatch's Trainer vs a bare hand-written PyTorch loop: the framework's per-step overhead.

Both contenders train seed_cnn on the real MNIST at batch 600 with SGD(lr 0.02, momentum 0.5),
from the same initial weights, on the same in-memory batches (the same epoch permutation of the
same uint8 tensor, normalised per batch) and with the same dropout masks, so they do the same
arithmetic: the script checks that their final weights agree. The Trainer is built through the
public path (``largebatch.train.build.train`` with a config, ``log.progress=false``); its time is the
epoch records' ``epoch_time_s`` (the whole loop: loader, steps, logging; evaluation excluded).
Repeats alternate which contender runs first, because this machine is noisy and shared;
``--clock cpu`` times both with this thread's CPU time instead (immune to other processes), and
``--model mlp`` (a ~4 ms step) exposes the Trainer's fixed per-step cost.

    python3 benchmarks/bench_trainer.py --data-root "$LARGEBATCH_DATA_ROOT" --repeats 9 --steps 40
    python3 benchmarks/bench_trainer.py --repeats 9 --steps 40 --clock cpu
    python3 benchmarks/bench_trainer.py --repeats 9 --steps 100 --model mlp --clock cpu
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (SEED_CONFIG, check_data_root, default_data_root, markdown_table,  # noqa: E402
                     median, print_machine, read_jsonl, spread, write_json)

import largebatch.train.trainer  # noqa: E402
from largebatch.config import ModelConfig, load_config  # noqa: E402
from largebatch.data.mnist import MEAN, STD  # noqa: E402
from largebatch.models import build_model  # noqa: E402
from largebatch.train.build import train  # noqa: E402

BATCH, LR, MOMENTUM = 600, 0.02, 0.5
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
clock = time.perf_counter  # the bare loop's clock; --clock cpu also swaps the Trainer's


def use_clock(name: str) -> None:
    """Time both loops with wall-clock or this thread's CPU time.

    CPU time is immune to the other processes sharing the cores (they stretch wall-clock time
    of both loops at random); with one torch thread all compute runs on this thread, so its CPU
    time is the work done. The Trainer reads ``time.perf_counter`` through its module's ``time``
    name: we hand it a namespace whose ``perf_counter`` is the chosen clock, so its own timers
    (epoch_time_s, time_s) report in that clock at unchanged boundaries.
    """
    global clock
    clock = CLOCKS[name]
    shim = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time)
                                    if not k.startswith("_")})
    shim.perf_counter = clock
    largebatch.train.trainer.time = shim if name != "wall" else time


@dataclass
class Timing:
    """One contender's run: whole-loop seconds per step, the per-step times, final weights."""

    loop_per_step_s: float
    step_times_s: list[float] = field(default_factory=list)
    final_state: dict[str, torch.Tensor] = field(default_factory=dict)
    data_s: float = 0.0
    compute_s: float = 0.0


def trainer_run(root: Path, steps: int, seed: int, out_dir: Path, model: str,
                extra: tuple[str, ...] = ()) -> Timing:
    """Train ``steps`` steps through ``largebatch.train.build.train``; times come from metrics.jsonl."""
    cfg = load_config(SEED_CONFIG, [
        f"data.root={root}", "data.download=false", "data.test_subset=1000",
        f"batch.global_size={BATCH}", f"batch.micro_size={BATCH}", "optim.name=sgd",
        f"optim.lr={LR}", f"optim.momentum={MOMENTUM}", "train.device=cpu",
        f"model.name={model}", "engine.name=single", f"train.max_steps={steps}",
        f"train.seed={seed}", "train.target_acc=0", "log.progress=false",
        f"log.out_dir={out_dir}", *extra])
    train(cfg, quiet=True)
    records = read_jsonl(out_dir / "metrics.jsonl")
    epochs = [r for r in records if r.get("kind") == "epoch"]
    cum = [r["time_s"] for r in records if r.get("kind") == "train"]
    # time_s is the cumulative train_step time, so its differences are per-step times
    # (they leave out the loop's bookkeeping and logging between steps; epoch_time_s has it).
    step_times = [b - a for a, b in zip([0.0] + cum[:-1], cum)]
    state = torch.load(out_dir / "model.pt", weights_only=True)["model"]
    return Timing(sum(e["epoch_time_s"] for e in epochs) / steps, step_times, state,
                  sum(e["data_time_s"] for e in epochs), sum(e["compute_time_s"] for e in epochs))


def bare_run(images: torch.Tensor, labels: torch.Tensor, steps: int, seed: int,
             model_name: str) -> Timing:
    """The loop a PyTorch user writes by hand, seeded like the Trainer (same init and masks)."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig(name=model_name))
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    torch.manual_seed(seed)  # the Trainer re-seeds (seed + 1000 x rank) before its first step
    model.train()
    t_start = clock()
    g = torch.Generator()
    g.manual_seed(seed)  # epoch 0's permutation, as DistributedSampler draws it
    perm = torch.randperm(len(labels), generator=g)
    stamps = [t_start]
    for i in range(steps):
        idx = perm[i * BATCH:(i + 1) * BATCH]
        x = images[idx].unsqueeze(1).float().div_(255).sub_(MEAN).div_(STD)
        y = labels[idx]
        loss = F.nll_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        stamps.append(clock())
    total = stamps[-1] - t_start
    steps_s = [b - a for a, b in zip(stamps[:-1], stamps[1:])]
    return Timing(total / steps, steps_s, {k: v.detach().clone() for k, v in
                                           model.state_dict().items()})


def max_param_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference between two state dicts with the same keys."""
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def run_pairs(root: Path, images: torch.Tensor, labels: torch.Tensor, args: argparse.Namespace,
              work: Path) -> tuple[list[Timing], list[Timing]]:
    """Warm both up once, then ``repeats`` pairs, alternating which one goes first."""
    extra = tuple(args.override)
    trainer_run(root, 3, args.seed, work / "warm", args.model, extra)
    bare_run(images, labels, 3, args.seed, args.model)
    trainers, bares = [], []
    for r in range(args.repeats):
        order = ("trainer", "bare") if r % 2 == 0 else ("bare", "trainer")
        for who in order:
            if who == "trainer":
                trainers.append(trainer_run(root, args.steps, args.seed, work / f"t{r}",
                                            args.model, extra))
            else:
                bares.append(bare_run(images, labels, args.steps, args.seed, args.model))
        print(f"  repeat {r}: trainer {trainers[-1].loop_per_step_s * 1e3:.2f} ms/step, "
              f"bare {bares[-1].loop_per_step_s * 1e3:.2f} ms/step", flush=True)
    return trainers, bares


def report(trainers: list[Timing], bares: list[Timing], args: argparse.Namespace) -> dict:
    """Print the markdown table and return the raw numbers."""
    t_loop = [t.loop_per_step_s * 1e3 for t in trainers]
    b_loop = [b.loop_per_step_s * 1e3 for b in bares]
    paired = [t / b for t, b in zip(t_loop, b_loop)]
    t_step = median(median(t.step_times_s) * 1e3 for t in trainers)
    b_step = median(median(b.step_times_s) * 1e3 for b in bares)
    diff = max(max_param_diff(t.final_state, b.final_state) for t, b in zip(trainers, bares))
    overhead = median(t_loop) / median(b_loop) - 1
    data_frac = median(t.data_s / (t.data_s + t.compute_s) for t in trainers)
    rows = [("largebatch Trainer", median(t_loop), spread(t_loop), t_step),
            ("bare PyTorch loop", median(b_loop), spread(b_loop), b_step)]
    print()
    print(markdown_table(["loop", "median ms/step (whole loop)", "range over repeats",
                          "median of per-step medians (ms)"], rows))
    print()
    print(f"fixed cost per step (difference of medians): "
          f"{(median(t_loop) - median(b_loop)) * 1e3:+.1f} us")
    print(f"overhead (ratio of medians - 1): {overhead * 100:+.2f}%   "
          f"median of paired ratios - 1: {(median(paired) - 1) * 100:+.2f}%   "
          f"goal <= 3%: {'PASS' if overhead <= 0.03 else 'FAIL'}")
    print(f"same arithmetic: max |trainer - bare| over final weights = {diff:.3g}; "
          f"Trainer's data-wait share of the loop = {data_frac * 100:.2f}%")
    if diff > 1e-6:
        print("WARNING: the two loops ended with different weights, so they did not do the "
              "same work (an override changed the recipe?): the ratio is not like for like")
    return {"batch": BATCH, "steps": args.steps, "repeats": args.repeats,
            "trainer_ms_per_step": t_loop, "bare_ms_per_step": b_loop,
            "trainer_median_step_ms": t_step, "bare_median_step_ms": b_step,
            "overhead": overhead, "paired_ratios": paired, "max_param_diff": diff,
            "clock": args.clock, "model": args.model, "overrides": args.override}


def main() -> None:
    """Parse the arguments, run the interleaved pairs, print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=default_data_root(),
                   help="MNIST root in torchvision layout (default: $LARGEBATCH_DATA_ROOT)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run (<= 100)")
    p.add_argument("--repeats", type=int, default=7, help="interleaved (trainer, bare) pairs")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--model", choices=["seed_cnn", "mlp"], default="seed_cnn",
                   help="mlp: a ~4 ms step that exposes the Trainer's fixed per-step cost")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall-clock, or this thread's CPU time (robust to other processes; "
                        "needs --threads 1)")
    p.add_argument("--override", action="append", default=[],
                   help="extra key=value for the Trainer's config (e.g. log.every_steps=1000)")
    p.add_argument("--json", help="also write the raw numbers to this file")
    args = p.parse_args()
    if not 1 <= args.steps <= 60000 // BATCH:
        sys.exit(f"bench_trainer: error: --steps={args.steps} must be in [1, {60000 // BATCH}]")
    if args.clock == "cpu" and args.threads != 1:
        sys.exit("bench_trainer: error: --clock cpu needs --threads 1 (other threads' work "
                 "would not be counted)")
    torch.set_num_threads(args.threads)
    use_clock(args.clock)
    root = check_data_root(args.data_root)
    print_machine({"batch": BATCH, "model": args.model, "steps": args.steps,
                   "repeats": args.repeats, "clock": args.clock})
    from torchvision.datasets import MNIST
    ds = MNIST(root=str(root), train=True, download=False)
    images, labels = ds.data.contiguous(), ds.targets.contiguous()
    with tempfile.TemporaryDirectory(prefix="bench_trainer_") as tmp:
        trainers, bares = run_pairs(root, images, labels, args, Path(tmp))
    write_json(args.json, report(trainers, bares, args))


if __name__ == "__main__":
    main()
