"""The live gradient noise scale against a least-squares problem whose value is known exactly.

Problem: y = x·w* + eps, x ~ N(0, I_d), eps ~ N(0, s²), per-sample loss ½(x·w − y)², at weights
w with u = w − w*. The per-sample gradient is g = x (x·u − eps), so

    G = E[g] = E[x xᵀ] u = u,                              |G|² = |u|²
    E|g|² = E[|x|² (x·u)²] + s² E|x|² = (d + 2)|u|² + d s²   (rotate u onto e1: E[x1⁴] = 3,
                                                             E[x1² xj²] = 1 for j ≠ 1)
    tr(Σ) = E|g|² − |G|² = (d + 1)|u|² + d s²,      B_simple = tr(Σ) / |G|².

``test_closed_form_matches_monte_carlo`` checks this formula on 200k sampled gradients, so the
reference itself is independent of the code under test. The runs use the real trainer, task
interface and engines (single; DDP over 2 gloo ranks) with optim.lr=1e-6, so w barely moves;
the truth is evaluated at the final weights anyway. d = 64, |u|² = 4, s² = 1: B_simple = 81.

Why these sizes: the EMA (decay 0.95, ~39 effective steps at steady state) leaves the estimate
with a relative spread of about 3-5% here (simulated over 40 seeds: at most 10-15% worst case
for 2 small batches), so a 15% tolerance is meaningful yet robust; a wrong B_small/B_big
convention (e.g. B_big = window of one rank, or forgetting the micro weight) is off by >= 2x.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from largebatch.config import load_config
from largebatch.engines import build_engine
from largebatch.metrics import MetricsLogger
from largebatch.noise.scale import NoiseScaleMonitor
from largebatch.optim import build_optimizer
from largebatch.optim.schedules import build_schedule
from largebatch.plan import make_plan
from largebatch.policies.base import Policies
from largebatch.train.build import setup_runtime
from largebatch.tasks.base import Metric, Task, TaskParts
from largebatch.train.trainer import Trainer
from tests._launch import spawn

D, U2, S2 = 64, 4.0, 1.0
STEPS = 150
TOL = 0.15  # the bar


def closed_form(u: torch.Tensor, s2: float) -> float:
    """B_simple = ((d + 1)|u|² + d s²) / |u|² (derivation in the module docstring)."""
    d, u2 = u.numel(), float(u.double().square().sum())
    return ((d + 1) * u2 + d * s2) / u2


def _w_star() -> torch.Tensor:
    w = torch.randn(D, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    return (w * math.sqrt(U2) / w.norm()).float()  # w0 = 0, so |u|² = |w*|² = U2


class LeastSquaresTask(Task):
    """nn.Linear(d, 1) from w = 0; the loss is the micro-batch mean of ½(x·w − y)²."""

    name = "least_squares"
    metrics = (Metric("val_loss", "min"),)

    def build(self) -> TaskParts:
        model = nn.Linear(D, 1, bias=False)
        with torch.no_grad():
            model.weight.zero_()
        return TaskParts(model)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * (model(x).squeeze(-1) - y).square().mean()

    def evaluate(self, model: nn.Module, loader: Any, engine: Any) -> dict[str, float]:
        return {"val_loss": 0.0}


class GaussianLoader:
    """Fresh Gaussian samples for each micro-batch; a stream of its own per rank and epoch."""

    def __init__(self, micro: int, n_micro: int, w_star: torch.Tensor, rank: int) -> None:
        self.micro, self.n_micro, self.w_star, self.rank, self.epoch = micro, n_micro, w_star, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n_micro

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(1000 * self.epoch + 17 * self.rank + 5)
        for _ in range(self.n_micro):
            x = torch.randn(self.micro, D, generator=gen)
            eps = torch.randn(self.micro, generator=gen) * math.sqrt(S2)
            yield x, x @ self.w_star + eps


def _fit(out: str, world: int, micro: int, accum: int, steps: int = STEPS,
         engine: str = "auto", noise: bool = True) -> dict[str, Any]:
    """Train the least-squares problem with the real trainer; rank 0 returns its records."""
    global_size = micro * accum * world
    cfg = load_config(None, [
        f"batch.global_size={global_size}", f"batch.micro_size={micro}", "optim.name=sgd",
        "optim.lr=1e-6", "optim.momentum=0.0", f"train.max_steps={steps}", "train.epochs=1",
        "train.device=cpu", f"train.noise_scale={str(noise).lower()}", f"engine.name={engine}",
        f"log.out_dir={out}", "log.progress=false", "checkpoint.resume=never"])
    denv, device = setup_runtime(cfg)
    plan = make_plan(cfg, denv.world_size, global_size * steps)
    torch.manual_seed(0)
    task = LeastSquaresTask(cfg)
    model = task.build().model
    eng = build_engine(cfg, denv, device, plan)
    eng.setup(model, build_optimizer(cfg.optim, model, lr=plan.peak_lr))
    schedule = build_schedule(eng.optimizers, cfg.schedule, plan, steps)
    w_star = _w_star()
    loader = GaussianLoader(micro, plan.micro_batches_per_epoch, w_star, denv.rank)
    logger = MetricsLogger(cfg.log, denv.is_main, {})
    noise_monitor = NoiseScaleMonitor(eng, cfg.train.noise_scale, plan.accum_steps,
                                      eng.describe())
    trainer = Trainer(cfg, task, eng, schedule, plan, loader, [], logger, noise_monitor,
                      Policies())
    extra_sizes = []  # the step collective's extra values, step by step
    local_values = noise_monitor.local_values

    def spy(samples: int) -> list[float]:
        values = local_values(samples)
        extra_sizes.append(len(values))
        return values
    noise_monitor.local_values = spy
    summary = trainer.fit()
    logger.close(summary)
    w = eng.unwrapped().weight.detach().reshape(-1).clone()
    if not denv.is_main:
        return {}
    records = [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {"train": [r for r in records if r["kind"] == "train"], "summary": summary,
            "truth": closed_form(w - w_star, S2), "moved": float(w.norm()),
            "extra_sizes": extra_sizes}


def _ddp_fits(rank: int, world: int, out: str) -> list[dict[str, Any]]:
    """Both 2-rank layouts in one launch (a launch's start-up is most of the test's time)."""
    return [_fit(f"{out}/{micro}x{accum}", world, micro, accum, engine="ddp")
            for micro, accum in ((512, 1), (256, 2))]


def _check(result: dict[str, Any], label: str) -> float:
    train, truth = result["train"], result["truth"]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert result["moved"] < 1e-2  # w stayed at w0 = 0 (|w*| = 2): the truth is that of w0
    assert abs(truth - 81.0) < 0.1
    est = train[-1]["noise_scale"]
    print(f"{label}: noise_scale {est:.2f} vs closed form {truth:.2f} "
          f"({est / truth - 1:+.1%}); |G|^2 {train[-1]['grad_sq_norm']:.3f} vs {U2}")
    assert abs(est / truth - 1) <= TOL, (label, est, truth)
    assert train[-1]["critical_batch"] == est
    # each EMA on its own: |G|² = |u|², tr(Σ) = (d+1)|u|² + d s²
    assert abs(train[-1]["grad_sq_norm"] / U2 - 1) <= TOL
    assert abs(train[-1]["grad_trace_cov"] / ((D + 1) * U2 + D * S2) - 1) <= TOL
    assert result["summary"]["final_noise_scale"] == est
    return est


def test_closed_form_matches_monte_carlo():
    """The reference: tr(Cov(g)) of 200k sampled per-sample gradients vs the formula."""
    gen = torch.Generator().manual_seed(3)
    u = -_w_star().double()
    n = 200_000
    x = torch.randn(n, D, generator=gen, dtype=torch.float64)
    eps = torch.randn(n, generator=gen, dtype=torch.float64) * math.sqrt(S2)
    g = x * (x @ u - eps)[:, None]
    trace = float(g.var(dim=0).sum())
    assert abs(trace / ((D + 1) * U2 + D * S2) - 1) < 0.01
    assert float((g.mean(0) - u).square().sum()) < 0.01 * U2  # G = u
    assert abs(closed_form(u, S2) - 81.0) < 1e-5  # w* is float32


def test_single_process_with_accumulation(tmp_path):
    """One process, micro 256 x accum 4: small batch 256, big batch the window of 1024."""
    _check(_fit(str(tmp_path / "run"), 1, 256, 4), "world 1, accum 4")


def test_two_ranks_with_and_without_accumulation(tmp_path):
    """DDP over 2 gloo ranks, micro 512 x accum 1 and 256 x accum 2: small batch = one rank's
    window (512), big = the global batch (1024)."""
    for result, label in zip(spawn(_ddp_fits, 2, str(tmp_path), timeout=150)[0],
                             ("world 2, micro 512 x accum 1", "world 2, micro 256 x accum 2")):
        _check(result, label)


def test_one_process_without_accumulation_says_so_once_and_logs_nothing(tmp_path, capsys):
    result = _fit(str(tmp_path / "run"), 1, 256, 1, steps=5)
    lines = [l for l in capsys.readouterr().out.splitlines() if "noise_scale" in l]
    assert len(lines) == 1 and "needs gradient accumulation" in lines[0], lines
    assert len(result["train"]) == 5
    assert not any("noise_scale" in r for r in result["train"])
    assert result["summary"]["final_noise_scale"] is None


def test_off_by_default_adds_nothing(tmp_path):
    """Off (the default): nothing joins the step's collective, no key in records or summary."""
    assert load_config(None, []).train.noise_scale is False
    on = _fit(str(tmp_path / "on"), 1, 256, 2, steps=3)
    off = _fit(str(tmp_path / "off"), 1, 256, 2, steps=3, noise=False)
    assert on["extra_sizes"] == [2] * 3 and off["extra_sizes"] == [0] * 3
    assert all("noise_scale" in r for r in on["train"])
    assert not any(k in r for r in off["train"] for k in
                   ("noise_scale", "grad_sq_norm", "grad_trace_cov", "critical_batch"))
    assert not any("noise" in k or "critical" in k for k in off["summary"])
