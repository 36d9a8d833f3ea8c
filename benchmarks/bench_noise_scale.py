"""What the live noise-scale measurement costs, and how it compares with AdaptDL-style hooks.

Part 1, cost: the MNIST seed net at global batch 600 (micro 150 x accum 4, one process), built
through the public path (``largebatch.train.build.build_run``) three times: ``train.noise_scale``
false ("off"), true ("live"), and false with the AdaptDL-style per-parameter hooks below
attached ("hooks"). Their optimizer steps (``Trainer.train_step``, what the trainer times as
``time_s``) are interleaved in one process: every repeat runs a block of steps of each
contender, in a rotating order, and the script prints per-contender medians of the per-step
time and the per-repeat ratios to "off" (goal for "live": <= 1.02).

Part 2, estimate: least squares with Gaussian inputs x ~ N(0, I_d) and labels
y = x.w* + eps, eps ~ N(0, sigma^2), loss 1/2 (x.w - y)^2, held at w = w* + delta (LR 0, so
the truth does not move). The per-sample gradient is g = x (x.delta - eps), so
G = E[g] = delta and, from the Gaussian fourth moment, E[g g^T] = |delta|^2 I + 2 delta
delta^T + sigma^2 I: tr(Sigma) = (d + 1)|delta|^2 + d sigma^2 and
B_simple = tr(Sigma) / |G|^2 = d + 1 + d sigma^2 / |delta|^2. The hooks baseline and the live
estimator (when ``largebatch.noise.scale`` exists) see the same micro-batches.

    python3 benchmarks/bench_noise_scale.py --data-root "$LARGEBATCH_DATA_ROOT"
    python3 benchmarks/bench_noise_scale.py --repeats 8 --steps 4 --clock cpu
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (SEED_CONFIG, check_data_root, default_data_root, markdown_table,  # noqa: E402
                     median, print_machine, spread)

from largebatch.config import ConfigError, load_config  # noqa: E402
from largebatch.train.build import build_run  # noqa: E402

GLOBAL, MICRO = 600, 150
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


# --------------------------------------------------------------------------------------------
# The baseline: AdaptDL-style per-parameter backward hooks on every micro-batch.
# --------------------------------------------------------------------------------------------
class HookNoiseScale:
    """BASELINE (AdaptDL/Pollux style), written for this benchmark only.

    A tensor hook on every parameter adds the squared norm of that parameter's gradient of the
    current micro-batch (before it is accumulated into ``.grad``) to a per-micro-batch sum;
    after ``len(params)`` hook calls a micro-batch is complete. An optimizer step pre-hook reads
    the accumulated (big-batch) gradient from ``.grad`` and forms the unbiased estimates

        |G|^2   ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
        tr(S)   ~ (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big)

    (McCandlish et al. 2018, App. A), each smoothed by a bias-corrected EMA, then divided.
    The micro-batch loss is weighted by micro/window (the trainer's accumulation), so a hooked
    gradient is (micro/window) x the micro-batch's mean gradient: it is rescaled back.
    """

    def __init__(self, params: list[nn.Parameter], optimizer: torch.optim.Optimizer,
                 micro: int, accum: int, beta: float = 0.9) -> None:
        self.params, self.micro, self.accum, self.beta = params, micro, accum, beta
        self._sum = torch.zeros((), dtype=torch.float64)
        self._calls, self._smalls = 0, []
        self._ema = [0.0, 0.0]  # |G|^2, tr(S)
        self._n = 0
        self.history: list[float] = []
        self.handles = [p.register_hook(self._on_grad) for p in params]
        self.handles.append(optimizer.register_step_pre_hook(self._on_step))

    def _on_grad(self, grad: torch.Tensor) -> None:
        self._sum = self._sum + grad.detach().double().pow(2).sum()
        self._calls += 1
        if self._calls == len(self.params):  # every parameter got this micro-batch's gradient
            self._smalls.append(float(self._sum) * self.accum ** 2)
            self._sum = torch.zeros((), dtype=torch.float64)
            self._calls = 0

    def _on_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        big = sum(float(p.grad.detach().double().pow(2).sum()) for p in self.params
                  if p.grad is not None)
        small = sum(self._smalls) / len(self._smalls)
        self._smalls = []
        b_small, b_big = self.micro, self.micro * self.accum
        g2 = (b_big * big - b_small * small) / (b_big - b_small)
        trace = (small - big) / (1 / b_small - 1 / b_big)
        self._n += 1
        for i, v in enumerate((g2, trace)):
            self._ema[i] = self.beta * self._ema[i] + (1 - self.beta) * v
        corr = 1 - self.beta ** self._n
        g2_hat, tr_hat = self._ema[0] / corr, self._ema[1] / corr
        self.history.append(tr_hat / g2_hat if g2_hat > 0 else math.nan)

    def remove(self) -> None:
        """Detach every hook."""
        for h in self.handles:
            h.remove()


# --------------------------------------------------------------------------------------------
# Part 1: cost on the MNIST seed net.
# --------------------------------------------------------------------------------------------
def make_contender(name: str, data_root: str, out_dir: str) -> tuple[Any, Any]:
    """(trainer, hooks or None) for one contender, built the public way."""
    overrides = [f"batch.global_size={GLOBAL}", f"batch.micro_size={MICRO}",
                 f"data.root={data_root}", "data.download=false", "log.progress=false",
                 f"log.out_dir={out_dir}", "checkpoint.resume=never", "train.epochs=100"]
    if name == "live":
        overrides.append("train.noise_scale=true")
    run = build_run(load_config(SEED_CONFIG, overrides), quiet=True)
    hooks = None
    if name == "hooks":
        hooks = HookNoiseScale(run.engine.parameters(), run.engine.optimizer,
                               MICRO, GLOBAL // MICRO)
    trainer = run.trainer
    trainer.train_loader.set_epoch(0)
    _BATCHES[id(trainer)] = iter(trainer.train_loader)
    return trainer, hooks


#: The micro-batch iterator each contender's steps read from (by trainer id).
_BATCHES: dict[int, Any] = {}


def time_steps(trainer: Any, steps: int, clock: Callable[[], float]) -> list[float]:
    """Seconds per optimizer step for ``steps`` steps (a new epoch when the data runs out)."""
    accum = trainer.plan.accum_steps
    out = []
    for _ in range(steps):
        try:
            t0 = clock()
            trainer.train_step(_BATCHES[id(trainer)], accum, GLOBAL)
        except StopIteration:  # epoch over: restart the loader, redo the step
            trainer.train_loader.set_epoch(1)
            _BATCHES[id(trainer)] = iter(trainer.train_loader)
            t0 = clock()
            trainer.train_step(_BATCHES[id(trainer)], accum, GLOBAL)
        out.append(clock() - t0)
    return out


def probe_cost(trainer: Any, clock: Callable[[], float], repeats: int = 30) -> float:
    """Seconds per step of the live estimator's own tensor work, timed alone: the
    per-micro-batch probe (``NoiseScaleMonitor.micro``: the copy of ``.grad`` before, the
    difference and its norm after) for every micro-batch of a window, plus ``local_values``
    and ``global_sq_norm``. The gradients are the last step's shape (values do not matter).
    Far less noisy on a shared machine than the difference of two whole step times."""
    noise, accum = trainer.noise, trainer.plan.accum_steps
    for p in trainer.engine.parameters():
        p.grad = torch.randn_like(p)
    out = []
    for _ in range(repeats):
        t0 = clock()
        for _ in range(accum):
            with noise.micro(MICRO, GLOBAL):
                pass
        noise.local_values(GLOBAL)
        noise.global_sq_norm()
        out.append(clock() - t0)
    trainer.engine.zero_grad()
    return median(out)


def bench_cost(args: argparse.Namespace, data_root: str) -> dict[str, Any]:
    """Interleaved step times of off / live / hooks; medians and per-repeat ratios."""
    clock = CLOCKS[args.clock]
    names = ["off", "live", "hooks"]
    contenders, notes = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            try:
                contenders[name] = make_contender(name, data_root, f"{tmp}/{name}")
            except ConfigError as exc:  # no train.noise_scale key yet: say so, go on
                notes.append(f"{name}: not measured ({exc})")
        for trainer, _ in contenders.values():  # warm-up: first steps allocate
            time_steps(trainer, 2, clock)
        times = {n: [] for n in contenders}
        order = list(contenders)
        for rep in range(args.repeats):
            turn = order[rep % len(order):] + order[:rep % len(order)]
            for name in turn:
                times[name].append(median(time_steps(contenders[name][0], args.steps, clock)))
        hooks = contenders.get("hooks", (None, None))[1]
        last_hook = hooks.history[-1] if hooks and hooks.history else math.nan
        if "live" in contenders:
            probe_s = probe_cost(contenders["live"][0], clock)
    rows = []
    for name, per_rep in times.items():
        ratios = [t / o for t, o in zip(per_rep, times["off"])]
        rows.append((name, 1e3 * median(per_rep), spread([1e3 * t for t in per_rep]),
                     median(ratios), spread(ratios)))
    print(markdown_table(("contender", f"ms/step ({args.clock}, median)", "spread (ms)",
                          "ratio to off (median)", "ratio spread"), rows))
    for note in notes:
        print(note)
    if "live" in contenders:
        off = median(times["off"])
        print(f"live estimator's own work in isolation (probe around {GLOBAL // MICRO} "
              f"micro-batches + the big-batch norm, no forward/backward): "
              f"{1e3 * probe_s:.3g} ms/step = {100 * probe_s / off:.2f}% of off's step")
    print(f"hooks baseline's last MNIST estimate (B_simple, EMA): {last_hook:.4g}")
    return {"rows": rows, "notes": notes}


# --------------------------------------------------------------------------------------------
# Part 2: the estimate on least squares with a known noise scale.
# --------------------------------------------------------------------------------------------
def least_squares_truth(delta: torch.Tensor, sigma: float) -> float:
    """B_simple = ((d + 1)|delta|^2 + d sigma^2) / |delta|^2 (derived in the module doc)."""
    d, n2 = delta.numel(), float(delta.pow(2).sum())
    return ((d + 1) * n2 + d * sigma ** 2) / n2


def bench_estimate(args: argparse.Namespace) -> dict[str, Any]:
    """Hooks baseline and the live estimator vs the closed form, on the same micro-batches.

    The live estimator is ``largebatch.noise.scale.NoiseScaleMonitor`` on a real
    ``SingleEngine``, driven with the calls and in the order ``Trainer.train_step`` makes
    them; the hooks baseline is attached to the same model and optimizer.
    """
    from largebatch.dist import DistEnv
    from largebatch.engines.single import SingleEngine
    from largebatch.noise.scale import NoiseScaleMonitor
    d, sigma, micro, accum, steps = 16, 2.0, 16, 8, args.ls_steps
    gen = torch.Generator().manual_seed(0)
    w_star = torch.randn(d, generator=gen)
    delta = torch.randn(d, generator=gen)
    delta = delta / delta.norm()
    model = nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_((w_star + delta)[None])
    engine = SingleEngine(DistEnv("none"), torch.device("cpu"))
    engine.setup(model, torch.optim.SGD(model.parameters(), lr=0.0))  # LR 0: truth stays put
    live = NoiseScaleMonitor(engine, True, accum, decay=0.99, say=lambda line: None)
    hooks = HookNoiseScale(engine.parameters(), engine.optimizer, micro, accum, beta=0.99)
    window, live_hist = micro * accum, []
    for _ in range(steps):
        for i in range(accum):
            x = torch.randn(micro, d, generator=gen)
            y = x @ w_star + sigma * torch.randn(micro, generator=gen)
            with engine.accumulate(is_boundary=i == accum - 1), live.micro(micro, window):
                engine.backward(0.5 * (model(x)[:, 0] - y).pow(2).mean() * (micro / window))
        local = live.local_values(window)
        sq_big = live.global_sq_norm()
        engine.step()
        live.update(local, 1, window, sq_big)
        live_hist.append(live.metrics.get("noise_scale"))
    hooks.remove()
    truth = least_squares_truth(delta, sigma)
    out = {"truth": truth}
    print(f"least squares d={d} sigma={sigma} |delta|=1, micro {micro} x accum {accum}, "
          f"{steps} steps, EMA decay 0.99 for both: truth B_simple = {truth:.4g}")
    for name, hist in (("live (NoiseScaleMonitor)", live_hist), ("hooks baseline", hooks.history)):
        tail = [v for v in hist[len(hist) // 2:] if v is not None and math.isfinite(v)]
        est = median(tail)
        out[name] = est
        print(f"  {name}: median over 2nd half {est:.4g} ({100 * (est / truth - 1):+.1f}%), "
              f"final {hist[-1]:.4g}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=default_data_root())
    p.add_argument("--repeats", type=int, default=8, help="interleaved repeats (default 8)")
    p.add_argument("--steps", type=int, default=4, help="steps per block (default 4)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    p.add_argument("--ls-steps", type=int, default=400, help="least-squares steps")
    args = p.parse_args()
    root = str(check_data_root(args.data_root))
    torch.manual_seed(0)
    print_machine({"global": GLOBAL, "micro": MICRO, "repeats": args.repeats,
                   "steps": args.steps, "clock": args.clock})
    bench_cost(args, root)
    bench_estimate(args)


if __name__ == "__main__":
    main()
