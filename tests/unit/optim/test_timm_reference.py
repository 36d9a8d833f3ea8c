"""largebatch's LARS/LAMB against timm's ``Lars``/``Lamb`` (an independent implementation).

Every case builds ours the way a run does, ``build_optimizer(load_config(...).optim, model)``
(so the config keys, their defaults, ``param_groups`` and the optimizer are all under test),
and timm's on ``timm.optim.param_groups_weight_decay`` of an identical model, with only the
keyword arguments the case names (so timm's own defaults stand in for ours). Both take
``STEPS`` steps on the same fixed random gradients under an LR that changes every step, in
float64: the 1e-6 tolerance then measures agreement of the algorithms, not rounding.
Each option is also shown to change timm's trajectory, so a key that ours ignored would fail.
The compiled (``fused``) step is checked on a few cases that together cover every option,
since each distinct option set compiles its own graph.
"""
from __future__ import annotations

from typing import Any, Callable

import pytest
import timm.optim as timm_optim  # a dev dependency: missing, the file fails instead of skipping
import torch
from torch import nn

from largebatch.config import load_config
from largebatch.optim import build_optimizer

STEPS = 50
TOL = 1e-6
MOVED = 1e-4  # an option "changes the step" when timm's weights end this far from the base


class Net(nn.Module):
    """A 4-D conv weight, two linear layers with 1-D biases (one weight of large norm, so that
    LAMB's ratio exceeds 1 and the trust clip bites) and a tensor that never gets a gradient."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(2, 3, 2, bias=False)
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)
        self.unused = nn.Parameter(torch.zeros(2, 2))
        scales = {"fc1.weight": 8.0}
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * scales.get(name, 1.0))
        self.double()


GRAD_SCALE = {"conv.weight": 1.0, "fc1.weight": 0.05, "fc1.bias": 2.0, "fc2.weight": 1.0,
              "fc2.bias": 0.5}  # fc1.weight: a small gradient, so LARC's clip bites there


def set_grads(model: nn.Module, step: int) -> None:
    """Fixed random gradients per step, the same for both optimizers ("unused" keeps None)."""
    gen = torch.Generator().manual_seed(1000 + step)
    for name, p in model.named_parameters():
        if name in GRAD_SCALE:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype) * GRAD_SCALE[name]


def train(make: Callable[[nn.Module], torch.optim.Optimizer], base_lr: float) -> list[torch.Tensor]:
    """Final weights after STEPS steps, LR ramping from 0.5x to 1.5x ``base_lr``."""
    model = Net()
    opt = make(model)
    for k in range(STEPS):
        set_grads(model, k)
        for group in opt.param_groups:
            group["lr"] = base_lr * (0.5 + k / STEPS)
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def ours(name: str, overrides: list[str], fused: bool = False):
    """Our optimizer exactly as ``largebatch train`` builds it from these keys."""
    keys = [f"optim.name={name}", *overrides] + (["optim.fused=true"] if fused else [])
    cfg = load_config(None, keys)
    return lambda model: build_optimizer(cfg.optim, model, lr=1.0)


def timm_lars(wd: float, **kw: Any):
    return lambda model: timm_optim.Lars(timm_optim.param_groups_weight_decay(model, wd),
                                         lr=1.0, **kw)


def timm_lamb(wd: float, **kw: Any):
    return lambda model: timm_optim.Lamb(timm_optim.param_groups_weight_decay(model, wd),
                                         lr=1.0, **kw)


# case -> (our keys beyond optim.name, timm's keyword arguments, weight decay)
WD = ["optim.weight_decay=0.01"]
LARS_CASES: dict[str, tuple[list[str], dict[str, Any], float]] = {
    "base": (["optim.momentum=0.9", "optim.trust_coef=0.02", *WD],
             dict(momentum=0.9, trust_coeff=0.02), 0.01),
    "no_momentum": (["optim.trust_coef=0.02", *WD], dict(trust_coeff=0.02), 0.01),
    "nesterov": (["optim.momentum=0.9", "optim.nesterov=true", "optim.trust_coef=0.02", *WD],
                 dict(momentum=0.9, nesterov=True, trust_coeff=0.02), 0.01),
    "dampening": (["optim.momentum=0.9", "optim.dampening=0.3", "optim.trust_coef=0.02", *WD],
                  dict(momentum=0.9, dampening=0.3, trust_coeff=0.02), 0.01),
    "trust_clip": (["optim.momentum=0.9", "optim.trust_clip=true", "optim.trust_coef=0.02", *WD],
                   dict(momentum=0.9, trust_clip=True, trust_coeff=0.02), 0.01),
    "always_adapt": (["optim.momentum=0.9", "optim.always_adapt=true", "optim.trust_coef=0.02",
                      *WD], dict(momentum=0.9, always_adapt=True, trust_coeff=0.02), 0.01),
    "trust_eps": (["optim.momentum=0.9", "optim.trust_eps=0.5", "optim.trust_coef=0.02", *WD],
                  dict(momentum=0.9, eps=0.5, trust_coeff=0.02), 0.01),
    "no_decay_timm_rule": (["optim.momentum=0.9", "optim.adapt_rule=timm"],
                           dict(momentum=0.9), 0.0),
    "no_decay_timm_rule_always_adapt": (
        ["optim.momentum=0.9", "optim.adapt_rule=timm", "optim.always_adapt=true",
         "optim.trust_coef=0.02"], dict(momentum=0.9, always_adapt=True, trust_coeff=0.02), 0.0),
    "decay_timm_rule": (["optim.momentum=0.9", "optim.adapt_rule=timm", "optim.trust_coef=0.02",
                         *WD], dict(momentum=0.9, trust_coeff=0.02), 0.01),
}
LAMB_CASES: dict[str, tuple[list[str], dict[str, Any], float]] = {
    "base": (WD, {}, 0.01),  # eps 1e-6 and max_grad_norm 1.0: both ours and timm's defaults
    "trust_clip": (["optim.trust_clip=true", *WD], dict(trust_clip=True), 0.01),
    "always_adapt": (["optim.always_adapt=true", *WD], dict(always_adapt=True), 0.01),
    "no_grad_clip": (["optim.max_grad_norm=0", *WD], dict(max_grad_norm=None), 0.01),
    "grad_clip_5": (["optim.max_grad_norm=5", *WD], dict(max_grad_norm=5.0), 0.01),
    "no_bias_correction": (["optim.bias_correction=false", *WD], dict(bias_correction=False), 0.01),
    "no_grad_averaging": (["optim.grad_averaging=false", *WD], dict(grad_averaging=False), 0.01),
    "decoupled_decay": (["optim.decoupled_decay=true", "optim.weight_decay=0.1"],
                        dict(decoupled_decay=True), 0.1),
    "betas_eps": (["optim.betas=[0.8,0.99]", "optim.eps=0.001", *WD],
                  dict(betas=(0.8, 0.99), eps=1e-3), 0.01),
    "no_decay_timm_rule": (["optim.adapt_rule=timm"], {}, 0.0),
    "no_decay_timm_rule_always_adapt": (["optim.adapt_rule=timm", "optim.always_adapt=true"],
                                        dict(always_adapt=True), 0.0),
}
OPTIMIZERS = {"lars": (LARS_CASES, timm_lars, 0.5), "lamb": (LAMB_CASES, timm_lamb, 0.02)}
ALL = [(name, case) for name, (cases, _, _) in OPTIMIZERS.items() for case in cases]


def pair(name: str, case: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(ours, timm's) final weights for one case of ``OPTIMIZERS[name]``."""
    cases, timm_factory, lr = OPTIMIZERS[name]
    keys, kw, wd = cases[case]
    return train(ours(name, keys), lr), train(timm_factory(wd, **kw), lr)


@pytest.mark.parametrize("name,case", ALL)
def test_foreach_equals_timm(name: str, case: str) -> None:
    got, ref = pair(name, case)
    assert max_diff(got, ref) <= TOL, (name, case, max_diff(got, ref))
    assert max_diff(ref, [p.detach() for p in Net().parameters()]) > 1e-2  # it did move


# decay_timm_rule: with weight decay both rules adapt the same tensors, so it is timm's base.
@pytest.mark.parametrize("name,case", [c for c in ALL if c[1] not in ("base", "decay_timm_rule")])
def test_each_option_changes_timms_step(name: str, case: str) -> None:
    """The cases are not vacuous: each ends away from the base case, even in timm."""
    cases, timm_factory, lr = OPTIMIZERS[name]
    base_kw, base_wd = cases["base"][1:]
    kw, wd = cases[case][1:]
    assert max_diff(train(timm_factory(wd, **kw), lr),
                    train(timm_factory(base_wd, **base_kw), lr)) > MOVED


# Together these cover every option of both on the compiled path (one graph each, ~15 s
# cold; the coupled-decay LAMB graph is test_lars_lamb.py::test_fused_equals_foreach's).
FUSED_CASES: dict[tuple[str, str], tuple[list[str], dict[str, Any], float]] = {
    ("lars", "nesterov_clip_always_adapt"): (
        ["optim.momentum=0.9", "optim.nesterov=true", "optim.trust_clip=true",
         "optim.always_adapt=true", "optim.trust_coef=0.02", *WD],
        dict(momentum=0.9, nesterov=True, trust_clip=True, always_adapt=True, trust_coeff=0.02),
        0.01),
    ("lars", "dampening_timm_rule"): (
        ["optim.momentum=0.9", "optim.dampening=0.3", "optim.adapt_rule=timm",
         "optim.trust_coef=0.02", *WD], dict(momentum=0.9, dampening=0.3, trust_coeff=0.02), 0.01),
    ("lamb", "decoupled_clip_always_adapt_raw_moments"): (
        ["optim.decoupled_decay=true", "optim.trust_clip=true", "optim.always_adapt=true",
         "optim.bias_correction=false", "optim.grad_averaging=false", "optim.weight_decay=0.1"],
        dict(decoupled_decay=True, trust_clip=True, always_adapt=True, bias_correction=False,
             grad_averaging=False), 0.1),
}


@pytest.mark.parametrize("name,case", list(FUSED_CASES))
def test_fused_equals_timm(name: str, case: str) -> None:
    """The compiled step, 50 steps with a new LR (and new first-step flags) each: one graph."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()  # count this case's graphs even if another test compiled them
    _, timm_factory, lr = OPTIMIZERS[name]
    keys, kw, wd = FUSED_CASES[(name, case)]
    before = counters["stats"]["unique_graphs"]
    got = train(ours(name, keys, fused=True), lr)
    assert counters["stats"]["unique_graphs"] - before == 1  # no recompile per step
    assert max_diff(got, train(timm_factory(wd, **kw), lr)) <= TOL


def test_rank_rule_without_decay_is_timm_with_always_adapt_on_the_nd_group() -> None:
    """The documented difference: with weight_decay=0, our default rule still adapts the N-D
    tensors (timm adapts nothing), i.e. it equals timm with always_adapt on that group only."""
    for name, (_, timm_factory, lr) in OPTIMIZERS.items():
        keys = ["optim.momentum=0.9"] if name == "lars" else []
        got = train(ours(name, keys), lr)
        kw = dict(momentum=0.9) if name == "lars" else {}
        plain = train(timm_factory(0.0, **kw), lr)
        assert max_diff(got, plain) > MOVED, name

        def split(model: nn.Module) -> torch.optim.Optimizer:
            nd = [p for p in model.parameters() if p.ndim > 1]
            one = [p for p in model.parameters() if p.ndim <= 1]
            groups = [{"params": nd, "weight_decay": 0.0, "always_adapt": True},
                      {"params": one, "weight_decay": 0.0}]
            cls = timm_optim.Lars if name == "lars" else timm_optim.Lamb
            return cls(groups, lr=1.0, **kw)
        assert max_diff(got, train(split, lr)) <= TOL, name
