"""Margins against closed forms: values, exact derivatives, the fallback beyond pi."""
from __future__ import annotations

import math

import pytest
import torch

from largebatch.config import ConfigError
from largebatch.face import ArcFace, CombinedMargin, CosFace


def _value_and_slope(margin: CombinedMargin, c: torch.Tensor):
    c = c.clone().requires_grad_(True)
    phi = margin.target(c)
    (slope,) = torch.autograd.grad(phi.sum(), c)
    return phi.detach(), slope


def test_cosface_is_cos_minus_m_with_unit_slope():
    c = torch.linspace(-1, 1, 101, dtype=torch.float64)
    phi, slope = _value_and_slope(CosFace(64, 0.4), c)
    torch.testing.assert_close(phi, c - 0.4, rtol=0, atol=1e-15)
    assert torch.equal(slope, torch.ones_like(c))


def test_arcface_value_and_exact_gradient():
    """cos(theta + m) and d/dc = sin(theta + m) / sin(theta), not 1 (straight-through)."""
    m = 0.5
    c = torch.linspace(-0.87, 0.999, 200, dtype=torch.float64)  # theta < pi - m
    phi, slope = _value_and_slope(ArcFace(64, m), c)
    theta = [math.acos(v) for v in c.tolist()]
    torch.testing.assert_close(phi, torch.tensor([math.cos(t + m) for t in theta],
                                                 dtype=torch.float64), rtol=0, atol=1e-12)
    exact = torch.tensor([math.sin(t + m) / math.sin(t) for t in theta], dtype=torch.float64)
    torch.testing.assert_close(slope, exact, rtol=1e-10, atol=1e-10)
    assert abs(slope[torch.argmin(c.abs())].item() - math.cos(m)) < 1e-2  # at c ~ 0: cos m


def test_arcface_continuous_fallback_beyond_pi():
    """Past theta = pi - m: cos(theta) - (1 - cos m); continuous (-1 at the threshold)."""
    m = 0.5
    arc = ArcFace(64, m)
    edge = -math.cos(m)  # cos(pi - m)
    left, right = torch.tensor([edge - 1e-9], dtype=torch.float64), \
        torch.tensor([edge + 1e-9], dtype=torch.float64)
    assert abs(arc.target(left).item() + 1) < 1e-6 and abs(arc.target(right).item() + 1) < 1e-6
    c = torch.linspace(-1, edge - 1e-6, 50, dtype=torch.float64)
    phi, slope = _value_and_slope(arc, c)
    torch.testing.assert_close(phi, c - (1 - math.cos(m)), rtol=0, atol=1e-15)
    assert torch.equal(slope, torch.ones_like(c))
    grid = torch.linspace(-1, 1, 20001, dtype=torch.float64)
    values = arc.target(grid)
    assert (values.diff() >= 0).all()  # never rewards moving away from the centre
    assert (values <= grid).all()  # always a penalty


def test_insightface_fallback_jumps_by_the_documented_amount():
    m = 0.5
    margin = ArcFace(64, m, fallback="insightface")
    c = torch.tensor([-0.95, -0.9], dtype=torch.float64)
    torch.testing.assert_close(margin.target(c), c - m * math.sin(m), rtol=0, atol=1e-15)
    edge = -math.cos(m)
    jump = margin.target(torch.tensor([edge + 1e-12], dtype=torch.float64)) - \
        margin.target(torch.tensor([edge - 1e-12], dtype=torch.float64))
    assert abs(jump.item() - (m * math.sin(m) - (1 - math.cos(m)))) < 1e-6  # 0.117


def test_combined_and_multiplicative_margins():
    c = torch.linspace(-0.5, 0.99, 50, dtype=torch.float64)
    theta = torch.acos(c)
    got = CombinedMargin(64, m1=1.0, m2=0.3, m3=0.2).target(c)
    torch.testing.assert_close(got, torch.cos(theta + 0.3) - 0.2, rtol=0, atol=1e-12)
    # m1 = 2: cos(2 theta) = 2c^2 - 1 up to theta* = pi/2 (c = 0), then c - 1
    sphere = CombinedMargin(64, m1=2.0)
    pos = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    torch.testing.assert_close(sphere.target(pos), 2 * pos ** 2 - 1, rtol=0, atol=1e-9)
    neg = torch.linspace(-0.99, -0.01, 50, dtype=torch.float64)
    torch.testing.assert_close(sphere.target(neg), neg - 1, rtol=0, atol=1e-12)


def test_perfect_fit_gradient_is_finite():
    for margin in (ArcFace(64, 0.5), CombinedMargin(64, m1=1.35)):
        c = torch.tensor([1.0, -1.0, 0.999999], requires_grad=True)
        margin.target(c).sum().backward()
        assert torch.isfinite(c.grad).all(), margin


def test_forward_scales_and_replaces_only_targets():
    logits = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]], dtype=torch.float64)
    out = CosFace(10.0, 0.4)(logits, torch.tensor([2, -1]))  # row 1: target on another shard
    expected = 10.0 * logits
    expected[0, 2] = 10.0 * (0.3 - 0.4)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize("kwargs", [dict(s=0.0), dict(m1=0.0), dict(m2=-0.1), dict(m3=-1.0),
                                    dict(m2=4.0), dict(fallback="easy"),
                                    dict(m1=1.5, fallback="insightface")])
def test_bad_margin_arguments_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        CombinedMargin(**kwargs)
