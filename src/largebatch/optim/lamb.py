"""LAMB: layer-wise adaptive moments (You et al. 2019, arXiv:1904.00962).

Per parameter tensor ``w`` with gradient ``g`` at its ``t``-th update, group LR ``lr``,
decoupled weight decay ``wd``::

    g     = g * min(1, max_grad_norm / (||all grads|| + 1e-6))  # only if max_grad_norm > 0
    m     = b1 * m + (1 - b1) * g
    v     = b2 * v + (1 - b2) * g**2
    u     = (m / (1 - b1**t)) / (sqrt(v / (1 - b2**t)) + eps) + wd * w
    ratio = ||w|| / ||u||
    ratio = min(ratio, max_trust)                              # only with trust_clip
    ratio = 1 if ||w|| == 0 or ||u|| == 0                      # last: overrides the clip too
    w     = w - lr * ratio * u

Groups with ``adapt=False`` use ``ratio = 1``: Adam with the group's decoupled decay (0 from
``param_groups``, so exactly torch's Adam there). ``max_grad_norm`` clips the global norm of
all gradients the optimizer steps (over every group, torch's ``clip_grad_norm_`` formula) for
the moment updates only, like apex's ``FusedLAMB``: ``.grad`` is left as it is. It is global
to the optimizer, not a group option. With the engine's ``optim.grad_clip`` both would clip;
use one. Under DDP the gradients are already averaged, so every rank computes the same step.

``step`` is kept per tensor (torch's Adam layout: a 0-d float32 CPU tensor), so the state
dict has torch's Adam keys (``step``, ``exp_avg``, ``exp_avg_sq``). See ``_foreach.py`` for
why this is our own code.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import torch
from torch import Tensor

from largebatch.optim._foreach import (LayerwiseOptimizer, Part, add_scaled_, div_each, mul_each,
                                       norms, safe_ratio)


def _lamb_part(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
               exp_avg_sqs: list[Tensor], lr: Any, bc1: Union[list[float], Tensor],
               bc2: Union[list[float], Tensor], beta1: float, beta2: float, eps: float,
               weight_decay: float, adapt: bool, trust_clip: bool, max_trust: float,
               grad_scale: Optional[Tensor]) -> None:
    """One LAMB step over tensors of one device/dtype sharing hyperparameters (module doc)."""
    if grad_scale is not None:
        grads = torch._foreach_mul(grads, grad_scale.to(grads[0].device))
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)  # m + (1-b1)(g-m) == b1*m + (1-b1)*g
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    # u = (m / bc1) / (sqrt(v / bc2) + eps), in one temporary list (fewer passes, less memory)
    u = div_each(exp_avg_sqs, bc2)
    torch._foreach_sqrt_(u)
    torch._foreach_add_(u, eps)
    torch._foreach_reciprocal_(u)
    torch._foreach_mul_(u, exp_avgs)
    u = div_each(u, bc1, inplace=True)
    if weight_decay != 0:
        torch._foreach_add_(u, params, alpha=weight_decay)
    if adapt:
        w_norm, u_norm = norms(params), norms(u)
        ratio = w_norm / u_norm
        if trust_clip:
            ratio = torch.clamp(ratio, max=max_trust)
        u = mul_each(u, safe_ratio(ratio, w_norm, u_norm), inplace=True)
    add_scaled_(params, u, -lr)


def _grad_scale(parts: list[Part], max_grad_norm: float) -> Tensor:
    """``min(1, max_grad_norm / (total + 1e-6))`` over every part's gradients (clip_grad_norm_)."""
    device = parts[0]["params"][0].device
    per_part = [torch.linalg.vector_norm(norms(part["grads"])).to(device) for part in parts]
    total = torch.linalg.vector_norm(torch.stack(per_part))
    return torch.clamp(max_grad_norm / (total + 1e-6), max=1.0)


def lamb_update(parts: list[Part], max_grad_norm: float = 0.0) -> None:
    """The whole LAMB step: global clip, then every part (one graph when compiled)."""
    grad_scale = _grad_scale(parts, max_grad_norm) if max_grad_norm > 0 else None
    for part in parts:
        _lamb_part(**part, grad_scale=grad_scale)


class LAMB(LayerwiseOptimizer):
    """LAMB with per-group options (formulas in the module docstring).

    Args:
        params: parameters or groups; groups may carry ``adapt`` (default True) and any option.
        lr: learning rate.
        betas: Adam's ``(b1, b2)``.
        eps: Adam's epsilon (added to ``sqrt(v_hat)``).
        weight_decay: decoupled decay, added to the Adam direction before the trust ratio.
        trust_clip: clamp the trust ratio to ``<= max_trust``.
        max_trust: the trust ratio's upper bound when ``trust_clip`` (10 as in NVIDIA's BERT).
        max_grad_norm: clip the global gradient norm for the moments (0 = off; optimizer-wide).
        fused: compile the step with ``torch.compile`` (fast on CPU; first step compiles).
    """

    _update = staticmethod(lamb_update)
    _instance_options = ("fused", "max_grad_norm")
    max_grad_norm: float = 0.0

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, trust_clip: bool = False, max_trust: float = 10.0,
                 max_grad_norm: float = 0.0, fused: bool = False) -> None:
        for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay),
                            ("max_grad_norm", max_grad_norm)):
            if not value >= 0.0:
                raise ValueError(f"LAMB: invalid {name}={value} (must be >= 0)")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"LAMB: invalid betas={tuple(betas)} (each must be in [0, 1))")
        if not max_trust > 0.0:
            raise ValueError(f"LAMB: invalid max_trust={max_trust} (must be > 0)")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        trust_clip=trust_clip, max_trust=max_trust, adapt=True)
        super().__init__(params, defaults, fused)
        self.max_grad_norm = float(max_grad_norm)

    def _globals(self) -> dict[str, Any]:
        return {"max_grad_norm": self.max_grad_norm}

    def _part(self, group: dict[str, Any], params: list[Tensor]) -> Part:
        """Tensors, moments (zero on first use), advanced steps and bias corrections."""
        beta1, beta2 = group["betas"]
        exp_avgs, exp_avg_sqs, bc1, bc2 = [], [], [], []
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            t = float(state["step"])  # a CPU tensor (torch's Adam layout): no device sync
            bc1.append(1 - beta1 ** t)
            bc2.append(1 - beta2 ** t)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
        if self.fused:  # tensors, so a new step count does not recompile
            bc1, bc2 = (torch.tensor(b, dtype=torch.float32, device=params[0].device)
                        for b in (bc1, bc2))
        return dict(params=params, grads=[p.grad for p in params], exp_avgs=exp_avgs,
                    exp_avg_sqs=exp_avg_sqs, lr=self._scalar(group["lr"], params[0]), bc1=bc1,
                    bc2=bc2, beta1=beta1, beta2=beta2, eps=group["eps"],
                    weight_decay=group["weight_decay"], adapt=bool(group["adapt"]),
                    trust_clip=bool(group["trust_clip"]), max_trust=group["max_trust"])
