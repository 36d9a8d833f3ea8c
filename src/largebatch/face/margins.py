"""Additive/multiplicative angular margins on the target cosine (ArcFace, CosFace, combined).

A margin maps the cosine ``c = cos(theta)`` between an embedding and its own class centre to

    phi(c) = cos(m1 * theta + m2) - m3        (insightface's ``CombinedMarginLoss`` semantics)

and the logits fed to softmax are ``s * phi(c)`` for the target class and ``s * c`` for every
other class. ArcFace is ``(m1, m2, m3) = (1, m, 0)``, CosFace ``(1, 0, m)``, SphereFace-like
forms use ``m1 > 1``.

The gradient is exact: ``phi`` is written in differentiable torch ops and differentiated by
autograd (insightface's arcface_torch applies the angle under ``no_grad``, which passes
``d phi / d c = 1`` straight through instead of ``sin(theta + m) / sin(theta)``).

Fallback beyond pi. ``cos(m1 * theta + m2)`` stops decreasing once ``m1 * theta + m2 > pi``, so a
sample far from its centre would be *rewarded* for moving further away. Past the threshold
``theta* = (pi - m2) / m1`` we use the shifted cosine

    phi(c) = cos(theta) - (1 + cos(theta*)) - m3        (``fallback="continuous"``, default)

which is continuous at ``theta*`` (both sides equal ``-1 - m3``), keeps decreasing in
``theta`` and still penalises the target (``phi(c) < c``). insightface's ``cos(theta) -
m * sin(m)`` (``fallback="insightface"``, m1 = 1 only) jumps at the threshold by
``m * sin(m) - (1 - cos(m))`` (0.117 for m = 0.5); it is kept for reproducing their runs.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from largebatch.config import ConfigError

# |c| this close to 1 has sin(theta) ~ 0 where d theta / d c is infinite; keeping sin(theta)
# at least this large keeps the exact gradient finite (it is exact for 1 - c^2 > _SIN2_FLOOR).
_SIN2_FLOOR = 1e-12
_ACOS_EPS = 1e-7  # the m1 != 1 path goes through acos, whose derivative is infinite at +-1


class CombinedMargin(nn.Module):
    """``phi(c) = cos(m1 * theta + m2) - m3`` on the target cosine, then the scale ``s``.

    Args:
        s: scale applied to every logit (64 in insightface's recipes).
        m1: multiplicative angular margin (1 = none).
        m2: additive angular margin (ArcFace: 0.5).
        m3: additive cosine margin (CosFace: 0.4).
        fallback: ``"continuous"`` (default) or ``"insightface"``, the form used once
            ``m1 * theta + m2 > pi`` (see the module docstring).

    Raises:
        ConfigError: on a non-positive ``s`` or ``m1``, a negative ``m2``/``m3`` or an unknown
            ``fallback``.
    """

    def __init__(self, s: float = 64.0, m1: float = 1.0, m2: float = 0.0, m3: float = 0.0,
                 fallback: str = "continuous") -> None:
        super().__init__()
        if s <= 0 or m1 <= 0:
            raise ConfigError(f"face.margin: s={s} and m1={m1} must be > 0")
        if m2 < 0 or m3 < 0 or m2 >= math.pi:
            raise ConfigError(f"face.margin: m2={m2} must be in [0, pi) and m3={m3} >= 0")
        if fallback not in ("continuous", "insightface"):
            raise ConfigError(f"face.margin.fallback={fallback!r}: use 'continuous' or "
                              f"'insightface'")
        if fallback == "insightface" and m1 != 1.0:
            raise ConfigError(f"face.margin.fallback='insightface' is defined for m1=1 only "
                              f"(got m1={m1})")
        self.s, self.m1, self.m2, self.m3 = float(s), float(m1), float(m2), float(m3)
        self.fallback = fallback
        # theta* where m1 * theta + m2 reaches pi; >= pi means the fallback never applies
        self.theta_star = (math.pi - self.m2) / self.m1

    def extra_repr(self) -> str:
        return (f"s={self.s}, m1={self.m1}, m2={self.m2}, m3={self.m3}, "
                f"fallback={self.fallback!r}")

    def target(self, cos: torch.Tensor) -> torch.Tensor:
        """The margined target cosine ``phi(cos)`` (unscaled), differentiable and exact.

        Args:
            cos: target cosines, any shape, in ``[-1, 1]``.

        Returns:
            ``phi(cos)``, same shape and dtype.
        """
        if self.m1 == 1.0 and self.m2 == 0.0:
            return cos - self.m3  # CosFace: no angle needed
        if self.m1 == 1.0:
            return self._additive_angle(cos) - self.m3
        return self._general_angle(cos) - self.m3

    def _additive_angle(self, cos: torch.Tensor) -> torch.Tensor:
        """``cos(theta + m2)`` via the angle-sum identity (more accurate than acos near 1)."""
        m = self.m2
        sin = torch.sqrt(torch.clamp(1.0 - cos * cos, min=_SIN2_FLOOR))
        shifted = cos * math.cos(m) - sin * math.sin(m)
        if self.theta_star >= math.pi:
            return shifted
        # theta > pi - m  <=>  cos < cos(pi - m)
        beyond = cos < math.cos(self.theta_star)
        if self.fallback == "insightface":
            fall = cos - m * math.sin(m)
        else:
            fall = cos - (1.0 + math.cos(self.theta_star))
        return torch.where(beyond, fall, shifted)

    def _general_angle(self, cos: torch.Tensor) -> torch.Tensor:
        """``cos(m1 * theta + m2)`` through acos, for multiplicative margins."""
        theta = torch.acos(torch.clamp(cos, -1.0 + _ACOS_EPS, 1.0 - _ACOS_EPS))
        shifted = torch.cos(self.m1 * theta + self.m2)
        if self.theta_star >= math.pi:
            return shifted
        fall = cos - (1.0 + math.cos(self.theta_star))
        return torch.where(theta > self.theta_star, fall, shifted)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Scaled logits with the margin on each row's target (insightface's call shape).

        Args:
            logits: cosines ``(B, C)``.
            labels: ``(B,)`` column of each row's target in ``logits``; ``-1`` where the target
                is not among these columns (another shard), whose row is only scaled.

        Returns:
            A new ``(B, C)`` tensor ``s * logits`` with ``s * phi`` at the targets.
        """
        labels = labels.view(-1)
        rows = torch.nonzero(labels >= 0).view(-1)
        cols = labels[rows]
        out = logits * self.s
        out[rows, cols] = self.target(logits[rows, cols]) * self.s
        return out


def ArcFace(s: float = 64.0, m: float = 0.5, fallback: str = "continuous") -> CombinedMargin:
    """ArcFace (Deng et al. 2019): ``s * cos(theta + m)`` on the target."""
    return CombinedMargin(s=s, m1=1.0, m2=m, m3=0.0, fallback=fallback)


def CosFace(s: float = 64.0, m: float = 0.4) -> CombinedMargin:
    """CosFace (Wang et al. 2018): ``s * (cos(theta) - m)`` on the target."""
    return CombinedMargin(s=s, m1=1.0, m2=0.0, m3=m)
