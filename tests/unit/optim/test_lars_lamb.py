"""LARS and LAMB against straightforward per-parameter references of their formulas.

The references below are the formulas of the module docstrings of ``largebatch.optim.lars`` /
``lamb`` written as the obvious per-tensor loop with Python-float trust ratios; the benchmark
(``benchmarks/bench_optim.py``) times them as the baseline. Reference comparisons run in
float64, so that the 1e-6 tolerance measures agreement of the formulas, not float32 rounding
of weights of size ~50 (needed to make LAMB's trust clip bite); float32 is covered by the
torch SGD/Adam comparisons and the fused-vs-foreach test.
"""
from __future__ import annotations

import io
import math
from typing import Any, Callable, Optional

import pytest
import torch
from torch import nn

from largebatch.optim.lamb import LAMB
from largebatch.optim.lars import LARS
from largebatch.optim.param_groups import param_groups
from tests._launch import spawn

STEPS = 20
TOL = 1e-6


# ---- references: one tensor at a time, Python floats for the norms ------------------------
class RefLARS:
    """Per-parameter LARS (torch-SGD form, LARC clip, ratio 1 on zero norms), in-place ops
    as a careful per-tensor implementation (timm-style) would have them."""

    def __init__(self, groups: list[dict[str, Any]], **defaults: Any) -> None:
        self.param_groups = [{**defaults, "adapt": True, **g} for g in groups]
        self.bufs: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def step(self) -> None:
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    self._one(p, g)

    def _one(self, p: torch.Tensor, g: dict[str, Any]) -> None:
        lr, wd = g["lr"], g["weight_decay"]
        d = p.grad.add(p, alpha=wd)
        if g["adapt"] or g["always_adapt"]:
            w_norm, g_norm = float(p.norm()), float(p.grad.norm())
            ratio = g["trust_coef"] * w_norm / (g_norm + wd * w_norm + g["eps"])
            ratio = ratio if w_norm > 0 and g_norm > 0 else 1.0
            if g["trust_clip"]:  # after the zero-norm fallback (timm's order)
                ratio = min(ratio / lr, 1.0)
            d.mul_(ratio)
        if g["momentum"] != 0:
            buf = self.bufs.setdefault(id(p), torch.zeros_like(p))
            d = buf.mul_(g["momentum"]).add_(d)
        p.add_(d, alpha=-lr)


class RefLAMB:
    """Per-parameter LAMB (Adam moments with bias correction, decoupled decay, trust ratio)."""

    def __init__(self, groups: list[dict[str, Any]], max_grad_norm: float = 0.0,
                 **defaults: Any) -> None:
        self.param_groups = [{**defaults, "adapt": True, **g} for g in groups]
        self.max_grad_norm = max_grad_norm
        self.state: dict[int, dict[str, Any]] = {}

    @torch.no_grad()
    def step(self) -> None:
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        scale = 1.0
        if self.max_grad_norm > 0:
            total = math.sqrt(sum(float(p.grad.norm()) ** 2 for p in params))
            scale = 1.0 / max(1.0, total / self.max_grad_norm)  # timm's divisor
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    self._one(p, g, scale)

    def _one(self, p: torch.Tensor, g: dict[str, Any], scale: float) -> None:
        (b1, b2), grad = g["betas"], p.grad * scale if scale != 1.0 else p.grad
        st = self.state.setdefault(id(p), {"t": 0, "m": torch.zeros_like(p),
                                           "v": torch.zeros_like(p)})
        st["t"] += 1
        m = st["m"].mul_(b1).add_(grad, alpha=1 - b1)
        v = st["v"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
        # u = m_hat / (sqrt(v_hat) + eps) + wd * w
        u = m.div(1 - b1 ** st["t"]).div_(v.div(1 - b2 ** st["t"]).sqrt_().add_(g["eps"]))
        u.add_(p, alpha=g["weight_decay"])
        ratio = 1.0
        if g["adapt"]:
            w_norm, u_norm = float(p.norm()), float(u.norm())
            if w_norm > 0 and u_norm > 0:
                ratio = w_norm / u_norm
                if g["trust_clip"]:
                    ratio = min(ratio, g["max_trust"])
        p.add_(u, alpha=-g["lr"] * ratio)


# ---- fixtures -------------------------------------------------------------------------------
def make_params(dtype: torch.dtype = torch.float64, seed: int = 0) -> list[nn.Parameter]:
    """2-D, 4-D, a large-norm 2-D (LAMB ratio > 10), two 1-D, and one that never gets a grad."""
    gen = torch.Generator().manual_seed(seed)
    shapes_scales = [((6, 4), 1.0), ((3, 2, 3, 3), 3.0), ((5, 5), 50.0), ((6,), 1.0),
                     ((4,), 1.0), ((3, 3), 1.0)]
    return [nn.Parameter(torch.randn(s, generator=gen, dtype=dtype) * k)
            for s, k in shapes_scales]


GRAD_SCALES = [1.0, 0.05, 2.0, 1.0, 0.5]  # the last parameter keeps grad None


def groups_of(params: list[nn.Parameter], wd: float) -> list[dict[str, Any]]:
    """What ``param_groups`` builds: adapted/decayed N-D tensors, excluded 1-D ones."""
    return [{"params": [params[0], params[1], params[2], params[5]], "weight_decay": wd},
            {"params": [params[3], params[4]], "weight_decay": 0.0, "adapt": False}]


def set_grads(params: list[nn.Parameter], step: int) -> None:
    """Deterministic gradients per step (the same for every optimizer under comparison)."""
    gen = torch.Generator().manual_seed(1000 + step)
    for p, k in zip(params, GRAD_SCALES):
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype) * k


def lr_at(step: int, base: float) -> float:
    """A changing LR (warmup-like), so that where the LR enters the update is tested too."""
    return base * (0.5 + step / STEPS)


def run(opt_factory: Callable[[list[dict[str, Any]]], Any], wd: float, steps: int = STEPS,
        base_lr: float = 0.2, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """Final parameters after ``steps`` steps of the optimizer built on fresh parameters."""
    params = make_params(dtype)
    opt = opt_factory(groups_of(params, wd))
    for k in range(steps):
        set_grads(params, k)
        for g in opt.param_groups:
            g["lr"] = lr_at(k, base_lr)
        opt.step()
    return [p.detach().clone() for p in params]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).detach().abs().max()) for x, y in zip(a, b))


LARS_KW = dict(trust_coef=0.02, eps=1e-8)
LAMB_KW = dict(betas=(0.9, 0.999), eps=1e-6, max_trust=10.0)


# ---- against the references -----------------------------------------------------------------
@pytest.mark.parametrize("momentum,wd", [(0.9, 0.01), (0.0, 0.0)])
@pytest.mark.parametrize("trust_clip", [False, True])
@pytest.mark.parametrize("always_adapt", [False, True])
def test_lars_matches_reference(momentum: float, wd: float, trust_clip: bool,
                                always_adapt: bool) -> None:
    kw = dict(momentum=momentum, trust_clip=trust_clip, always_adapt=always_adapt, **LARS_KW)
    ours = run(lambda g: LARS(g, lr=0.1, **kw), wd)
    ref = run(lambda g: RefLARS(g, lr=0.1, weight_decay=wd, **kw), wd)
    assert max_diff(ours, ref) <= TOL
    assert max_diff(ours, make_params()) > 1e-3  # it did move


@pytest.mark.parametrize("wd", [0.0, 0.01])
@pytest.mark.parametrize("trust_clip", [False, True])
@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0])
def test_lamb_matches_reference(wd: float, trust_clip: bool, max_grad_norm: float) -> None:
    kw = dict(trust_clip=trust_clip, **LAMB_KW)
    ours = run(lambda g: LAMB(g, lr=0.01, max_grad_norm=max_grad_norm, **kw), wd)
    ref = run(lambda g: RefLAMB(g, lr=0.01, weight_decay=wd, max_grad_norm=max_grad_norm, **kw),
              wd)
    assert max_diff(ours, ref) <= TOL
    assert max_diff(ours, make_params()) > 1e-3


def test_options_change_the_step() -> None:
    """The configurations above really exercise clip, always_adapt and grad clipping."""
    lars = {(c, a): run(lambda g: LARS(g, lr=0.1, momentum=0.9, trust_clip=c, always_adapt=a,
                                       **LARS_KW), 0.01)
            for c in (False, True) for a in (False, True)}
    assert max_diff(lars[(False, False)], lars[(True, False)]) > 1e-3
    assert max_diff(lars[(False, False)], lars[(False, True)]) > 1e-3
    lamb = {(c, n): run(lambda g: LAMB(g, lr=0.01, trust_clip=c, max_grad_norm=n, **LAMB_KW),
                        0.01)
            for c in (False, True) for n in (0.0, 1.0)}
    assert max_diff(lamb[(False, 0.0)], lamb[(True, 0.0)]) > 1e-3
    assert max_diff(lamb[(False, 0.0)], lamb[(False, 1.0)]) > 1e-3


def test_float32_close_to_reference() -> None:
    """float32: the error is float32 rounding, i.e. ~1e-7 of how far the parameters moved
    (absolute ulps of weights ~150 are ~1e-5, hence relative to the displacement)."""
    init = make_params(torch.float32)
    for ours_f, ref_f in [
            (lambda g: LARS(g, lr=0.1, momentum=0.9, trust_clip=True, **LARS_KW),
             lambda g: RefLARS(g, lr=0.1, momentum=0.9, weight_decay=0.01, trust_clip=True,
                               always_adapt=False, **LARS_KW)),
            (lambda g: LAMB(g, lr=0.01, trust_clip=True, max_grad_norm=1.0, **LAMB_KW),
             lambda g: RefLAMB(g, lr=0.01, weight_decay=0.01, trust_clip=True,
                               max_grad_norm=1.0, **LAMB_KW))]:
        ours, ref = run(ours_f, 0.01, dtype=torch.float32), run(ref_f, 0.01, dtype=torch.float32)
        for x, y, x0 in zip(ours, ref, init):
            assert float((x - y).norm()) <= 1e-5 * float((y - x0).detach().norm())


# ---- parameter exclusion, zero norms --------------------------------------------------------
class Tiny(nn.Module):
    """A conv, a norm layer and a linear head: weights adapted, biases/norm weights excluded."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)



def train_pair(opt_ours: Callable[[Any], Any], opt_torch: Callable[[Any], Any],
               steps: int = 10) -> tuple[Tiny, Tiny]:
    """The same model stepped by ours (on param_groups) and by a torch optimizer (on all),
    with the same random gradients (so each tensor's trajectory depends on its own rule only)."""
    a, b = Tiny(), Tiny()
    oa = opt_ours(param_groups(a, weight_decay=0.05, exclude_1d=True))
    ob = opt_torch(b.parameters())
    gen = torch.Generator().manual_seed(5)
    for _ in range(steps):
        for pa, pb in zip(a.parameters(), b.parameters()):
            pa.grad = torch.randn(pa.shape, generator=gen)
            pb.grad = pa.grad.clone()
        oa.step()
        ob.step()
    return a, b


@pytest.mark.parametrize("which", ["lars", "lamb"])
def test_excluded_1d_params_step_like_plain_sgd_and_adam(which: str) -> None:
    """1-D params (no decay, no adaptation) follow torch's SGD / Adam exactly; 2-D do not."""
    if which == "lars":
        a, b = train_pair(lambda g: LARS(g, lr=0.05, momentum=0.9, weight_decay=0.05),
                          lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    else:
        a, b = train_pair(lambda g: LAMB(g, lr=0.01, eps=1e-8, weight_decay=0.05),
                          lambda p: torch.optim.Adam(p, lr=0.01, eps=1e-8))
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        diff = float((pa - pb).detach().abs().max())
        if pa.ndim == 1:
            assert diff <= 1e-6, name
        else:
            assert diff > 1e-3, name  # adapted and decayed: a different trajectory


def test_zero_norms_give_ratio_one() -> None:
    """Zero weights or zero gradients: ratio 1 (plain step), never 0/0 or a frozen tensor."""
    g = torch.tensor([[3.0, -4.0]])
    w = nn.Parameter(torch.zeros(1, 2))  # ||w|| = 0: LARS steps -lr*g, LAMB -lr*g/(|g|+eps)
    v = nn.Parameter(torch.tensor([[1.0, 2.0]]))  # ||g|| = 0 below
    w.grad, v.grad = g.clone(), torch.zeros(1, 2)
    LARS([w, v], lr=0.1, momentum=0.9, weight_decay=0.5, trust_coef=0.001, trust_clip=True).step()
    torch.testing.assert_close(w.detach(), -0.1 * g)
    torch.testing.assert_close(v.detach(), torch.tensor([[1.0, 2.0]]) * (1 - 0.1 * 0.5))
    w = nn.Parameter(torch.zeros(1, 2))
    v = nn.Parameter(torch.tensor([[1.0, 2.0]]))  # zero grad, no decay: u = 0, unchanged
    w.grad, v.grad = g.clone(), torch.zeros(1, 2)
    LAMB([w, v], lr=0.1, eps=1e-6, trust_clip=True).step()
    torch.testing.assert_close(w.detach(), -0.1 * g / (g.abs() + 1e-6))
    torch.testing.assert_close(v.detach(), torch.tensor([[1.0, 2.0]]))


# ---- state, skipping, errors ----------------------------------------------------------------
FACTORIES = {
    "lars": lambda g, fused=False: LARS(g, lr=0.1, momentum=0.9, weight_decay=0.01,
                                        trust_clip=True, fused=fused, **LARS_KW),
    "lamb": lambda g, fused=False: LAMB(g, lr=0.01, weight_decay=0.01, trust_clip=True,
                                        max_grad_norm=1.0, fused=fused, **LAMB_KW),
}


@pytest.mark.parametrize("which", ["lars", "lamb"])
def test_state_dict_round_trip(which: str) -> None:
    """5 steps, save (through torch.save), load into a fresh optimizer, 5 more == 10 steps."""
    factory = FACTORIES[which]
    straight = run(factory, 0.01, steps=10)
    params = make_params()
    opt = factory(groups_of(params, 0.01))
    for k in range(5):
        set_grads(params, k)
        for g in opt.param_groups:
            g["lr"] = lr_at(k, 0.2)
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    params2 = [nn.Parameter(p.detach().clone()) for p in params]
    opt2 = factory(groups_of(params2, 0.01))
    opt2.load_state_dict(torch.load(buf))
    assert len(opt2.state) == 5  # the grad-None parameter never got state
    for k in range(5, 10):
        set_grads(params2, k)
        for g in opt2.param_groups:
            g["lr"] = lr_at(k, 0.2)
        opt2.step()
    assert max_diff(params2, straight) == 0.0


def test_grad_none_is_skipped_and_sparse_is_rejected() -> None:
    for factory in FACTORIES.values():
        params = make_params(torch.float32)
        before = params[5].detach().clone()
        opt = factory(groups_of(params, 0.01))
        set_grads(params, 0)
        opt.step()
        assert torch.equal(params[5].detach(), before) and params[5] not in opt.state
        params[0].grad = params[0].grad.to_sparse()
        with pytest.raises(RuntimeError, match="sparse"):
            opt.step()


@pytest.mark.parametrize("kwargs", [dict(lr=-1.0), dict(momentum=-0.1), dict(trust_coef=-1.0)])
def test_lars_rejects_bad_hyperparameters(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        LARS(make_params(), **kwargs)


@pytest.mark.parametrize("kwargs", [dict(lr=-1.0), dict(betas=(0.9, 1.0)), dict(eps=-1.0),
                                    dict(max_grad_norm=-1.0), dict(max_trust=0.0)])
def test_lamb_rejects_bad_hyperparameters(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        LAMB(make_params(), **kwargs)


# ---- fused (torch.compile) --------------------------------------------------------------------
def test_fused_equals_foreach() -> None:
    """The compiled step is the same function: equal up to float32 reassociation. Tiny model,
    4 steps, LR changing every step (passed as a tensor: must not recompile per step)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # count this test's graphs even if another test compiled these

    for which, factory in FACTORIES.items():
        base = run(factory, 0.01, steps=4, dtype=torch.float32)
        frames = counters["stats"]["unique_graphs"]
        fused = run(lambda g: factory(g, fused=True), 0.01, steps=4, dtype=torch.float32)
        assert max_diff(base, fused) <= 1e-5 * max(float(p.abs().max()) for p in base), which
        assert counters["stats"]["unique_graphs"] - frames == 1, which  # one graph, no recompile


# ---- DDP: unchanged on every rank ---------------------------------------------------------
DDP_STEPS, BATCH = 3, 16


def _mlp() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(4)
    return torch.randn(BATCH, 6, generator=gen), torch.randn(BATCH, 2, generator=gen)


def _train(model: nn.Module, which: str, x: torch.Tensor, y: torch.Tensor,
           module: Optional[nn.Module] = None) -> None:
    """DDP_STEPS steps of mean-squared error; ``module`` is the (wrapped) one to call."""
    opt = FACTORIES[which](param_groups(model, weight_decay=0.01, exclude_1d=True))
    for _ in range(DDP_STEPS):
        opt.zero_grad()
        (module or model)(x).sub(y).square().mean().backward()
        opt.step()


def _ddp_worker(rank: int, world: int) -> dict[str, dict[str, torch.Tensor]]:
    """This rank's share of the batch through DDP, for each optimizer; returns the weights."""
    x, y = _data()
    shard = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    states = {}
    for which in FACTORIES:
        model = _mlp()
        ddp = nn.parallel.DistributedDataParallel(model)
        _train(model, which, x[shard], y[shard], module=ddp)
        states[which] = model.state_dict()
    return states


def test_ddp_two_ranks_equal_single_process_full_batch() -> None:
    """2 gloo ranks on half batches each == one process on the whole batch, for both."""
    per_rank = spawn(_ddp_worker, 2, timeout=120)
    x, y = _data()
    for which in FACTORIES:
        single = _mlp()
        _train(single, which, x, y)
        moved = max_diff(list(single.state_dict().values()), list(_mlp().state_dict().values()))
        assert moved > 1e-3, which
        for rank in range(2):
            got = per_rank[rank][which]
            assert max_diff(list(got.values()), list(single.state_dict().values())) <= 1e-6
