"""LAMB: layer-wise adaptive moments (You et al. 2019, arXiv:1904.00962), timm's ``Lamb`` step.

Per parameter tensor ``w`` with gradient ``g`` at its ``t``-th update, group LR ``lr``,
weight decay ``wd``::

    g     = g / max(1, ||all grads|| / max_grad_norm)    # only if max_grad_norm > 0
    m     = b1 * m + (1 - b1) * g                        # grad_averaging=False: b1 * m + g
    v     = b2 * v + (1 - b2) * g**2
    u     = (m / (1 - b1**t)) / (sqrt(v / (1 - b2**t)) + eps)
                                          # bias_correction=False: m / (sqrt(v) + eps)
    u     = u + wd * w                                   # decoupled_decay=False (default)
    w     = w - lr * wd * w                              # decoupled_decay=True, instead
    ratio = ||w|| / ||u||
    ratio = 1 if ||w|| == 0 or ||u|| == 0
    ratio = min(ratio, max_trust)                        # only with trust_clip (LAMBC: 1)
    w     = w - lr * ratio * u

This is ``timm.optim.Lamb`` option for option (``tests/unit/optim/test_timm_reference.py`` checks it
against timm itself; timm's ``caution`` and ``corrected_weight_decay`` are not offered).
With ``decoupled_decay`` the weights shrink first, so the trust ratio sees the decayed ``w``
and ``u`` has no decay term (timm's order).

Groups with ``adapt=False`` use ``ratio = 1`` (Adam with the group's decay, 0 from
``param_groups``: exactly torch's Adam there); ``always_adapt=True`` adapts every group.
``max_grad_norm`` divides every gradient the optimizer steps by ``max(1, total / max_grad_norm)``
(total: the L2 norm over every group's gradients, timm's formula) for the moment updates only:
``.grad`` is left as it is. It is global to the optimizer, not a group option. With the
engine's ``optim.grad_clip`` both clip. Under DDP the gradients are already averaged, so every
rank computes the same step.

``step`` is kept per tensor (torch's Adam layout: a 0-d float32 CPU tensor; timm keeps one per
group, the same count while every tensor has a gradient every step), so the state dict has
torch's Adam keys (``step``, ``exp_avg``, ``exp_avg_sq``). See ``_foreach.py`` for why this is
our own code.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import torch
from torch import Tensor

from largebatch.optim._foreach import (LayerwiseOptimizer, Part, add_scaled_, div_each, mul_each,
                                       norms, safe_ratio)

# Group options added after the first release, with the values that reproduce it.
_LATER_OPTIONS = dict(always_adapt=False, bias_correction=True, grad_averaging=True,
                      decoupled_decay=False)


def _moments(grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
             beta1: float, beta2: float, grad_averaging: bool) -> None:
    """``m`` and ``v`` in place (module doc)."""
    if grad_averaging:
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)  # m + (1-b1)(g-m) == b1*m + (1-b1)*g
    else:
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)


def _lamb_part(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
               exp_avg_sqs: list[Tensor], lr: Any, bc1: Union[list[float], Tensor],
               bc2: Union[list[float], Tensor], beta1: float, beta2: float, eps: float,
               weight_decay: float, adapt: bool, trust_clip: bool, max_trust: float,
               grad_averaging: bool, decoupled_decay: bool,
               grad_clip: Optional[Tensor]) -> None:
    """One LAMB step over tensors of one device/dtype sharing hyperparameters (module doc)."""
    if grad_clip is not None:
        grads = torch._foreach_div(grads, grad_clip.to(grads[0].device))
    _moments(grads, exp_avgs, exp_avg_sqs, beta1, beta2, grad_averaging)
    # u = (m / bc1) / (sqrt(v / bc2) + eps), in one temporary list (fewer passes, less memory)
    u = div_each(exp_avg_sqs, bc2)
    torch._foreach_sqrt_(u)
    torch._foreach_add_(u, eps)
    torch._foreach_reciprocal_(u)
    torch._foreach_mul_(u, exp_avgs)
    u = div_each(u, bc1, inplace=True)
    if weight_decay != 0:
        if decoupled_decay:  # before the norms: the ratio sees the decayed weights (timm)
            add_scaled_(params, params, -lr * weight_decay)
        else:
            torch._foreach_add_(u, params, alpha=weight_decay)
    if adapt:
        w_norm, u_norm = norms(params), norms(u)
        ratio = safe_ratio(w_norm / u_norm, w_norm, u_norm)
        if trust_clip:
            ratio = torch.clamp(ratio, max=max_trust)
        u = mul_each(u, ratio, inplace=True)
    add_scaled_(params, u, -lr)


def _grad_clip(parts: list[Part], max_grad_norm: float) -> Tensor:
    """timm's divisor ``max(1, total / max_grad_norm)``, total over every part's gradients."""
    device = parts[0]["params"][0].device
    per_part = [torch.linalg.vector_norm(norms(part["grads"])).to(device) for part in parts]
    total = torch.linalg.vector_norm(torch.stack(per_part))
    return torch.clamp(total / max_grad_norm, min=1.0)


def lamb_update(parts: list[Part], max_grad_norm: float = 0.0) -> None:
    """The whole LAMB step: global clip, then every part (one graph when compiled)."""
    grad_clip = _grad_clip(parts, max_grad_norm) if max_grad_norm > 0 else None
    for part in parts:
        _lamb_part(**part, grad_clip=grad_clip)


class LAMB(LayerwiseOptimizer):
    """LAMB with per-group options (formulas in the module docstring), timm's ``Lamb`` step.

    Defaults are timm's except ``weight_decay`` (timm 0.01) and ``max_grad_norm`` (timm 1.0),
    which are off here so that the class alone is plain Adam plus the trust ratio; the config
    (``optim.max_grad_norm``) defaults to timm's 1.0.

    Args:
        params: parameters or groups; groups may carry ``adapt`` (default True) and any option.
        lr: learning rate.
        betas: Adam's ``(b1, b2)``.
        eps: Adam's epsilon (added to ``sqrt(v_hat)``).
        weight_decay: added to the Adam direction before the trust ratio, or with
            ``decoupled_decay`` applied to the weights directly.
        trust_clip: clamp the trust ratio to ``<= max_trust`` (timm's LAMBC).
        max_trust: the trust ratio's upper bound when ``trust_clip`` (timm: 1.0; NVIDIA's BERT
            recipe: 10).
        max_grad_norm: divide all gradients by ``max(1, ||g|| / max_grad_norm)`` for the
            moments (0 = off, timm's None; optimizer-wide).
        always_adapt: use the trust ratio in groups with ``adapt=False`` too.
        bias_correction: divide the moments by ``1 - beta**t``.
        grad_averaging: ``m = b1*m + (1-b1)*g``; False: ``m = b1*m + g``.
        decoupled_decay: shrink the weights by ``lr * weight_decay`` outside the trust ratio.
        fused: compile the step with ``torch.compile`` (fast on CPU; first step compiles).
    """

    _update = staticmethod(lamb_update)
    _instance_options = ("fused", "max_grad_norm")
    max_grad_norm: float = 0.0

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, trust_clip: bool = False, max_trust: float = 1.0,
                 max_grad_norm: float = 0.0, always_adapt: bool = False,
                 bias_correction: bool = True, grad_averaging: bool = True,
                 decoupled_decay: bool = False, fused: bool = False) -> None:
        for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay),
                            ("max_grad_norm", max_grad_norm)):
            if not value >= 0.0:
                raise ValueError(f"LAMB: invalid {name}={value} (must be >= 0)")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"LAMB: invalid betas={tuple(betas)} (each must be in [0, 1))")
        if not max_trust > 0.0:
            raise ValueError(f"LAMB: invalid max_trust={max_trust} (must be > 0)")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        trust_clip=trust_clip, max_trust=max_trust, always_adapt=always_adapt,
                        bias_correction=bias_correction, grad_averaging=grad_averaging,
                        decoupled_decay=decoupled_decay, adapt=True)
        super().__init__(params, defaults, fused)
        self.max_grad_norm = float(max_grad_norm)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # pickles/state dicts from before these options
            for key, value in _LATER_OPTIONS.items():
                group.setdefault(key, value)

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
            corrected = bool(group["bias_correction"])
            bc1.append(1 - beta1 ** t if corrected else 1.0)
            bc2.append(1 - beta2 ** t if corrected else 1.0)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
        return dict(params=params, grads=[p.grad for p in params], exp_avgs=exp_avgs,
                    exp_avg_sqs=exp_avg_sqs, lr=self._scalar(group["lr"], params[0]),
                    bc1=self._scalar(bc1, params[0]), bc2=self._scalar(bc2, params[0]),
                    beta1=beta1, beta2=beta2, eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    adapt=bool(group["adapt"] or group["always_adapt"]),
                    trust_clip=bool(group["trust_clip"]), max_trust=group["max_trust"],
                    grad_averaging=bool(group["grad_averaging"]),
                    decoupled_decay=bool(group["decoupled_decay"]))
