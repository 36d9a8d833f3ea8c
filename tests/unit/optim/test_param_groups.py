"""Parameter groups (decay/adaptation exclusions) and ``build_optimizer`` for every name."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from largebatch.config import OptimConfig
from largebatch.optim import build_optimizer
from largebatch.optim.lamb import LAMB
from largebatch.optim.lars import LARS
from largebatch.optim.param_groups import param_groups


class Net(nn.Module):
    """Conv + BatchNorm + a head with a 1-element 'scale': 2-D/4-D weights and 1-D tensors."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Linear(3, 2)
        self.scale = nn.Parameter(torch.ones(1))
        self.frozen = nn.Parameter(torch.ones(2, 2), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.conv(x)).mean((2, 3))) * self.scale


def ids(params: list[torch.Tensor]) -> set[int]:
    return {id(p) for p in params}


def test_biases_and_1d_are_excluded() -> None:
    net = Net()
    groups = param_groups(net, weight_decay=0.1, exclude_1d=True)
    assert len(groups) == 2
    keep, skip = groups
    assert (keep["weight_decay"], keep["adapt"]) == (0.1, True)
    assert (skip["weight_decay"], skip["adapt"]) == (0.0, False)
    assert ids(keep["params"]) == ids([net.conv.weight, net.head.weight])
    assert ids(skip["params"]) == ids([net.conv.bias, net.bn.weight, net.bn.bias,
                                       net.head.bias, net.scale])


def test_names_are_excluded_even_when_2d() -> None:
    net = Net()
    keep, skip = param_groups(net, weight_decay=0.1, exclude_1d=True, no_decay_names=("head",))
    assert ids(keep["params"]) == ids([net.conv.weight])
    assert id(net.head.weight) in ids(skip["params"]) and id(net.head.bias) in ids(skip["params"])


def test_exclude_1d_false_keeps_one_group_unless_names() -> None:
    net = Net()
    (only,) = param_groups(net, weight_decay=0.1, exclude_1d=False)
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert ids(only["params"]) == ids(trainable) and only["adapt"] is True
    assert id(net.frozen) not in ids(only["params"])
    keep, skip = param_groups(net, weight_decay=0.1, exclude_1d=False, no_decay_names=("scale",))
    assert ids(skip["params"]) == ids([net.scale]) and len(keep["params"]) == len(trainable) - 1


def test_plain_list_is_split_by_shape() -> None:
    params = [nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(2)),
              nn.Parameter(torch.zeros(()))]
    keep, skip = param_groups(params, weight_decay=0.1, exclude_1d=True)
    assert ids(keep["params"]) == ids(params[:1]) and ids(skip["params"]) == ids(params[1:])


EXPECTED = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW, "lars": LARS, "lamb": LAMB}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_build_optimizer_builds_each_name(name: str) -> None:
    """The configured class at the plan's LR with the config's options; one step moves the
    weights and leaves them finite."""
    cfg = OptimConfig(name=name, lr=0.5, momentum=0.8, nesterov=True, weight_decay=0.01,
                      betas=[0.8, 0.99], eps=1e-7, trust_coef=0.02, trust_eps=1e-9,
                      trust_clip=True, max_trust=5.0, always_adapt=True, max_grad_norm=2.0,
                      bias_correction=False, grad_averaging=False, decoupled_decay=True,
                      fused=False)
    net = Net()
    opt = build_optimizer(cfg, net, lr=0.05, no_decay_names=("head.weight",))
    assert type(opt) is EXPECTED[name]
    keep, skip = opt.param_groups
    assert keep["lr"] == skip["lr"] == 0.05  # the plan's peak LR, not optim.lr
    assert (keep["weight_decay"], skip["weight_decay"]) == (0.01, 0.0)
    assert id(net.head.weight) in ids(skip["params"]) and skip["adapt"] is False
    expected = {"sgd": dict(momentum=0.8, nesterov=True),
                "adamw": dict(betas=(0.8, 0.99), eps=1e-7),
                "lars": dict(momentum=0.8, nesterov=True, trust_coef=0.02, eps=1e-9,
                             trust_clip=True, always_adapt=True),
                "lamb": dict(betas=(0.8, 0.99), eps=1e-7, trust_clip=True, max_trust=5.0,
                             always_adapt=True, bias_correction=False, grad_averaging=False,
                             decoupled_decay=True)}[name]
    for key, value in expected.items():
        assert tuple(keep[key]) == value if key == "betas" else keep[key] == value, key
    if name == "lamb":
        assert opt.max_grad_norm == 2.0  # optimizer-wide, not a group key
    before = net.conv.weight.detach().clone()
    net(torch.randn(2, 1, 5, 5)).square().mean().backward()
    opt.step()
    assert not torch.equal(before, net.conv.weight.detach())
    assert all(math.isfinite(float(p.detach().abs().max())) for p in net.parameters())


@pytest.mark.parametrize("name, eps", [("adamw", 1e-8), ("lamb", 1e-6)])
def test_eps_null_is_the_optimizers_own_default(name: str, eps: float) -> None:
    """optim.eps defaults to null: torch's AdamW default 1e-8, timm's Lamb default 1e-6."""
    opt = build_optimizer(OptimConfig(name=name), Net(), lr=0.1)
    assert all(g["eps"] == eps for g in opt.param_groups)


@pytest.mark.parametrize("name", ["sgd", "lars"])
def test_dampening_reaches_sgd_and_lars(name: str) -> None:
    opt = build_optimizer(OptimConfig(name=name, momentum=0.9, dampening=0.25), Net(), lr=0.1)
    assert all(g["dampening"] == 0.25 for g in opt.param_groups)


@pytest.mark.parametrize("rule, wd, adapted", [("rank", 0.0, True), ("rank", 0.1, True),
                                               ("timm", 0.0, False), ("timm", 0.1, True)])
def test_adapt_rule(rule: str, wd: float, adapted: bool) -> None:
    """'rank': the N-D group is adapted whatever the decay; 'timm': only if it has decay.
    The excluded 1-D group is never adapted (always_adapt is the optimizer's business)."""
    keep, skip = param_groups(Net(), weight_decay=wd, exclude_1d=True, adapt_rule=rule)
    assert (keep["adapt"], keep["weight_decay"]) == (adapted, wd)
    assert (skip["adapt"], skip["weight_decay"]) == (False, 0.0)


def test_unknown_adapt_rule_is_refused() -> None:
    with pytest.raises(ValueError, match="adapt_rule='paper'"):
        param_groups(Net(), weight_decay=0.1, exclude_1d=True, adapt_rule="paper")
