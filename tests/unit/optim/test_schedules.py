"""LR schedule: warmup and main schedules against closed forms and torch's schedulers; plateau
decisions against torch's ReduceLROnPlateau, including two real gloo ranks."""
from __future__ import annotations

import io
from types import SimpleNamespace
from typing import Optional

import pytest
import torch
import torch.distributed as dist
from torch.optim import lr_scheduler as tls

from largebatch.config import ConfigError, PlateauConfig, ScheduleConfig
from largebatch.optim.schedules import LRSchedule, build_schedule
from largebatch.plan import BatchPlan
from tests._launch import spawn

PEAK = 0.4


def make_plan(peak: float = PEAK, warmup: int = 0) -> BatchPlan:
    """A plan whose only fields the schedule reads are the peak LR and the warmup steps."""
    return BatchPlan(global_size=240, micro_size=60, accum_steps=4, world_size=1,
                     dataset_size=2400, drop_last=False, base_lr=peak, scale_rule="none",
                     base_batch=240, peak_lr=peak, warmup_steps=warmup)


def make_opt(lr: float = PEAK, groups: int = 1) -> torch.optim.Optimizer:
    params = [{"params": [torch.nn.Parameter(torch.zeros(1))]} for _ in range(groups)]
    return torch.optim.SGD(params, lr=lr)


def make_schedule(cfg: ScheduleConfig, warmup: int = 0, total: int = 100,
                  reduce_mean=None, groups: int = 1) -> LRSchedule:
    return build_schedule(make_opt(groups=groups), cfg, make_plan(warmup=warmup), total,
                          reduce_mean)


def lrs_of(sched: LRSchedule, steps: int) -> list[float]:
    """The LR used by each of the next ``steps`` optimizer steps."""
    out = []
    for _ in range(steps):
        out.append(sched.lr)
        sched.step()
    return out


def torch_lrs(make, steps: int) -> list[float]:
    """The same for a torch scheduler built by ``make(optimizer)`` on an optimizer at PEAK."""
    opt = make_opt()
    sched = make(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


# ---- warmup and main schedules -----------------------------------------------------------------
def test_warmup_matches_linear_lr_and_closed_form() -> None:
    w, s = 10, 0.1
    ours = lrs_of(make_schedule(ScheduleConfig(warmup_steps=w, warmup_start_factor=s), w), 15)
    ref = torch_lrs(lambda o: tls.LinearLR(o, start_factor=s, end_factor=1.0, total_iters=w), 15)
    assert ours == pytest.approx(ref, rel=1e-12)
    assert ours == pytest.approx([PEAK * (s + (1 - s) * min(k, w) / w) for k in range(15)],
                                 rel=1e-12)
    assert ours[0] == pytest.approx(0.04) and ours[w] == PEAK


def test_warmup_from_zero() -> None:
    ours = lrs_of(make_schedule(ScheduleConfig(warmup_steps=4), 4), 6)
    assert ours == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.4], abs=1e-15)


@pytest.mark.parametrize("min_lr", [0.0, 0.01])
def test_cosine_after_warmup_matches_torch(min_lr: float) -> None:
    w, total = 5, 45
    t_max = total - w
    sched = make_schedule(ScheduleConfig(name="cosine", warmup_steps=w, min_lr=min_lr), w, total)
    ours = lrs_of(sched, total + 5)
    ref = torch_lrs(lambda o: tls.CosineAnnealingLR(o, T_max=t_max, eta_min=min_lr), t_max + 1)
    assert ours[w:total + 1] == pytest.approx(ref, rel=1e-9, abs=1e-15)
    assert ours[w + t_max // 2] == pytest.approx((PEAK + min_lr) / 2, rel=1e-12)
    assert ours[total:] == pytest.approx([min_lr] * 5, abs=1e-15)  # stays at the floor
    assert ours[w - 1] == pytest.approx(PEAK * (w - 1) / w)


def test_step_milestones_after_warmup_match_multistep() -> None:
    w, milestones, gamma = 3, [4, 9, 9], 0.5  # repeated milestone decays twice, like torch
    sched = make_schedule(ScheduleConfig(name="step", warmup_steps=w, milestones=milestones,
                                         gamma=gamma), w)
    ours = lrs_of(sched, w + 15)
    ref = torch_lrs(lambda o: tls.MultiStepLR(o, milestones=milestones, gamma=gamma), 15)
    assert ours[w:] == pytest.approx(ref, rel=1e-12)
    assert ours[w + 3] == PEAK and ours[w + 4] == PEAK * 0.5 and ours[w + 9] == PEAK * 0.125


@pytest.mark.parametrize("power", [1.0, 2.0, 0.5])
def test_poly_matches_polynomial_lr(power: float) -> None:
    total = 30
    ours = lrs_of(make_schedule(ScheduleConfig(name="poly", power=power), 0, total), total + 3)
    ref = torch_lrs(lambda o: tls.PolynomialLR(o, total_iters=total, power=power), total + 3)
    assert ours == pytest.approx(ref, rel=1e-9, abs=1e-15)
    assert ours[total:] == [0.0] * 3


def test_poly_with_floor_closed_form() -> None:
    w, total, floor = 2, 12, 0.1
    sched = make_schedule(ScheduleConfig(name="poly", power=2.0, warmup_steps=w, min_lr=floor),
                          w, total)
    ours = lrs_of(sched, total + 2)
    expect = [floor + (PEAK - floor) * (1 - min(t, 10) / 10) ** 2 for t in range(12)]
    assert ours[w:] == pytest.approx(expect, rel=1e-12)


def test_every_param_group_gets_the_lr() -> None:
    sched = make_schedule(ScheduleConfig(warmup_steps=4), 4, groups=3)
    sched.step()
    assert [g["lr"] for g in sched.optimizer.param_groups] == [pytest.approx(0.1)] * 3


# ---- plateau -----------------------------------------------------------------------------------
PLATEAU_CASES = {
    "rel_min": dict(factor=0.5, patience=2),
    "abs_min": dict(factor=0.5, patience=1, threshold=0.02, threshold_mode="abs"),
    "max_rel": dict(mode="max", factor=0.3, patience=1, threshold=0.01),
    "max_abs": dict(mode="max", factor=0.5, patience=0, threshold=0.02, threshold_mode="abs"),
    "cooldown": dict(factor=0.5, patience=0, cooldown=2),
    "min_lr": dict(factor=0.1, patience=0, min_lr=0.003),
    "eps": dict(factor=0.9, patience=0, eps=0.05),  # changes below eps are not applied
}
METRICS = [1.0, 0.9, 0.95, 0.92, 0.91, 0.9, 0.7, 0.72, 0.71, 0.7, 0.69, 0.695, 0.7, 0.68,
           0.68, 0.9, 0.9, float("nan"), 0.6, 0.6, 0.6, 0.61, 0.59, 0.6, 0.6, 0.6]


def torch_plateau_lrs(metrics: list[float], **kw) -> list[float]:
    """torch's LR after each evaluation."""
    opt = make_opt()
    sched = tls.ReduceLROnPlateau(opt, **kw)
    out = []
    for m in metrics:
        sched.step(m)
        out.append(opt.param_groups[0]["lr"])
    return out


def ours_plateau(metrics: list[float], steps_between: int = 3, warmup: int = 0,
                 **kw) -> tuple[list[float], list[Optional[str]]]:
    """Our LR and action after each evaluation, with optimizer steps in between."""
    sched = make_schedule(ScheduleConfig(name="plateau", warmup_steps=warmup,
                                         plateau=PlateauConfig(**kw)), warmup)
    lrs, actions = [], []
    for m in metrics:
        lrs_of(sched, steps_between)
        actions.append(sched.on_eval(m))
        lrs.append(sched.lr)
    return lrs, actions


@pytest.mark.parametrize("case", list(PLATEAU_CASES))
def test_plateau_decisions_equal_torch(case: str) -> None:
    kw = PLATEAU_CASES[case]
    metrics = [1 - m if kw.get("mode") == "max" else m for m in METRICS]
    ref = torch_plateau_lrs(metrics, **kw)
    lrs, actions = ours_plateau(metrics, **kw)
    assert lrs == pytest.approx(ref, rel=1e-12)
    lowered = [i for i in range(len(ref)) if ref[i] < (ref[i - 1] if i else PEAK)]
    assert [i for i, a in enumerate(actions) if a == "reduce_lr"] == lowered
    assert set(actions) <= {None, "reduce_lr"}
    if case == "eps":
        assert lowered == [] and lrs[-1] == PEAK  # the scripted run never changes the LR
    else:
        assert len(lowered) >= 2  # the sequence really exercises the logic
    if kw.get("threshold_mode") == "abs":  # the sequence tells an abs from a rel threshold
        assert torch_plateau_lrs(metrics, **{**kw, "threshold_mode": "rel"}) != ref
    if case == "min_lr":
        assert lrs[-1] == pytest.approx(0.003)


def test_no_decisions_during_warmup() -> None:
    calls = []

    def mean(x: float) -> float:
        calls.append(x)
        return x

    w = 10
    sched = make_schedule(ScheduleConfig(name="plateau", warmup_steps=w,
                                         plateau=PlateauConfig(factor=0.5, patience=0)), w,
                          reduce_mean=mean)
    for k in range(w):  # an evaluation after every warmup step, each a non-improvement
        assert sched.on_eval(5.0 + k) is None
        assert sched.lr == pytest.approx(PEAK * k / w)
        sched.step()
    assert calls == [] and sched.plateau.num_evals == 0  # ignored, not even averaged
    post = [1.0, 2.0, 3.0, 0.5, 0.6]
    got = []
    for m in post:
        sched.on_eval(m)
        got.append(sched.lr)
    assert calls == post
    assert got == pytest.approx(torch_plateau_lrs(post, factor=0.5, patience=0), rel=1e-12)


@pytest.mark.parametrize("name", ["constant", "cosine", "step"])
def test_on_eval_is_a_noop_for_other_schedules(name: str) -> None:
    calls = []
    cfg = ScheduleConfig(name=name, milestones=[50], plateau=PlateauConfig(patience=0))
    sched = make_schedule(cfg, reduce_mean=lambda x: calls.append(x) or x)
    lrs_of(sched, 3)
    before = sched.lr
    assert [sched.on_eval(m) for m in (1.0, 2.0, 3.0)] == [None] * 3
    assert sched.lr == before and calls == []


def test_grow_batch_action_then_reduce_lr_fallback() -> None:
    kw = dict(factor=0.5, patience=1, min_lr=0.06, action="grow_batch")
    metrics = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    lrs, actions = ours_plateau(metrics, **kw)
    # torch would reduce at evals 2, 4, 6: those are the plateaus we report, LR untouched.
    assert [i for i, a in enumerate(actions) if a == "grow_batch"] == [2, 4, 6]
    assert lrs == [PEAK] * len(metrics)
    sched = make_schedule(ScheduleConfig(name="plateau", plateau=PlateauConfig(**kw)))
    got = []
    for _ in range(4):
        got.append(sched.reduce_lr())
    assert got == [True, True, True, False]  # 0.2, 0.1, floor 0.06, then nothing left
    assert sched.lr == pytest.approx(0.06)


def test_reduce_lr_composes_with_warmup_and_cosine() -> None:
    w, total = 4, 24
    cfg = ScheduleConfig(name="cosine", warmup_steps=w, plateau=PlateauConfig(factor=0.5))
    plain = lrs_of(make_schedule(cfg, w, total), total)
    sched = make_schedule(cfg, w, total)
    lrs_of(sched, 2)
    assert sched.reduce_lr()
    got = [plain[0], plain[1]] + lrs_of(sched, total - 2)
    assert got[2:] == pytest.approx([0.5 * x for x in plain[2:]], rel=1e-12)


@pytest.mark.parametrize("name", ["plateau", "cosine"])
def test_state_dict_round_trip_equals_uninterrupted(name: str) -> None:
    cfg = ScheduleConfig(name=name, warmup_steps=3, warmup_start_factor=0.2,
                         plateau=PlateauConfig(factor=0.5, patience=1, cooldown=1))
    metrics = [1.0, 0.8, 0.85, 0.9, 0.79, 0.8, 0.8, 0.81, 0.7, 0.75, 0.76, 0.77]

    def drive(sched: LRSchedule, ms: list[float]) -> list[float]:
        out = []
        for m in ms:
            out += lrs_of(sched, 2)
            sched.on_eval(m)
            out.append(sched.lr)
        return out

    full = drive(make_schedule(cfg, 3, 30), metrics)
    first = make_schedule(cfg, 3, 30)
    head = drive(first, metrics[:5])
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)  # through a real checkpoint serialisation
    buf.seek(0)
    resumed = make_schedule(cfg, 3, 30)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert resumed.lr == first.lr
    assert head + drive(resumed, metrics[5:]) == full  # bit-identical
    if name == "plateau":
        assert min(full) < PEAK * 0.5  # decisions happened on both sides of the cut


@pytest.mark.parametrize("override, key", [
    (dict(warmup_start_factor=1.5), "schedule.warmup_start_factor=1.5"),
    (dict(name="step"), "schedule.milestones"),
    (dict(milestones=[-1]), "schedule.milestones=[-1]"),
    (dict(plateau=PlateauConfig(patience=-1)), "schedule.plateau.patience=-1"),
    (dict(plateau=PlateauConfig(factor=1.0)), "schedule.plateau.factor=1.0"),
    (dict(name="cosine", total_steps=5, warmup_steps=5), "schedule.total_steps=5"),
])
def test_bad_values_raise_config_error(override: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        make_schedule(ScheduleConfig(**override), warmup=override.get("warmup_steps", 0))


# ---- two real ranks ----------------------------------------------------------------------------
TWO_RANK_PLATEAU = dict(factor=0.5, patience=1, cooldown=1, threshold=0.01)
# The mean plateaus twice; each rank alone sees a different, noisier sequence.
_MEAN = [1.0, 0.8, 0.8, 0.8, 0.8, 0.6, 0.6, 0.6, 0.6, 0.6, 0.5, 0.5]
_NOISE = [0.0, 0.3, -0.3, 0.2, -0.25, 0.1, -0.2, 0.3, -0.1, 0.2, -0.1, 0.05]
LOCAL = [[m + d for m, d in zip(_MEAN, _NOISE)], [m - d for m, d in zip(_MEAN, _NOISE)]]


def _rank_main(rank: int, world: int) -> list[float]:
    """One rank: its own metrics, reduce_mean through a real all_reduce; returns its LRs."""

    def reduce_mean(x: float) -> float:
        t = torch.tensor([x], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t) / world

    # The schedule only touches param_groups; a real torch optimizer would cost each rank
    # seconds of torch._dynamo import, which is irrelevant to the decision logic tested here.
    groups = SimpleNamespace(param_groups=[{"lr": PEAK}])
    cfg = ScheduleConfig(name="plateau", warmup_steps=2, plateau=PlateauConfig(**TWO_RANK_PLATEAU))
    sched = LRSchedule(groups, cfg, make_plan(warmup=2), 100, reduce_mean)
    lrs = []
    sched.on_eval(LOCAL[rank][0] * 100)  # during warmup: ignored on both ranks (no collective)
    lrs_of(sched, 2)
    for m in LOCAL[rank]:
        sched.on_eval(m)
        lrs.append(sched.lr)
        lrs_of(sched, 1)
    return lrs


def test_two_gloo_ranks_decide_identically_on_the_mean() -> None:
    r0, r1 = spawn(_rank_main, 2, timeout=60)
    assert r0 == r1  # bit-identical on both ranks
    mean = [(a + b) / 2 for a, b in zip(*LOCAL)]
    assert r0 == pytest.approx(torch_plateau_lrs(mean, **TWO_RANK_PLATEAU), rel=1e-12)
    assert min(r0) < PEAK
    for local in LOCAL:  # the test can fail: either rank's own sequence decides differently
        assert torch_plateau_lrs(local, **TWO_RANK_PLATEAU) != pytest.approx(r0, rel=1e-12)
