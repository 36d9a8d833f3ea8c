"""LARS: layer-wise adaptive rate scaling (You, Gitman and Ginsburg 2017, arXiv:1708.03888).

Per parameter tensor ``w`` with gradient ``g``, group LR ``lr``, weight decay ``wd``,
momentum ``mu``, dampening ``damp`` and trust coefficient ``eta``, one step is::

    d     = g + wd * w                                   # L2 decay, added before scaling
    ratio = eta * ||w|| / (||g|| + wd * ||w|| + eps)
    ratio = 1 if ||w|| == 0 or ||g|| == 0                # a zero tensor or a zero gradient
    ratio = min(ratio / lr, 1)                           # only with trust_clip (LARC)
    d     = ratio * d
    buf   = d                                            # the tensor's first step (no dampening)
    buf   = mu * buf + (1 - damp) * d                    # every later step
    d     = d + mu * buf   if nesterov   else   buf
    w     = w - lr * d

This is timm's ``timm.optim.Lars`` step, option for option (``tests/unit/optim/test_timm_reference.py``
checks it against timm itself), and torch's SGD momentum/dampening/Nesterov around the scaled
gradient: the torch-SGD form (LR outside the momentum buffer, as torch.optim.SGD, timm and
apex's LARC), not the paper's ``v = mu*v + lr*ratio*d; w -= v``. The two agree while the LR
is constant; the torch form needs no momentum correction when a schedule changes the LR
(Goyal et al. 2017, sec. 2.1). With ``momentum == 0`` there is no buffer: ``w -= lr*ratio*d``.

``trust_clip`` is LARC's clip mode: the LR a tensor effectively gets, ``lr * ratio``, becomes
``min(eta*||w||/(...), lr)``, i.e. the layer-wise rate may lower the global LR but never raise
it. As in timm, the zero-norm fallback comes first and is clipped too (a zero tensor steps at
``min(1, lr)``; apex's LARC leaves it at ``lr``: the two differ only when ``lr > 1``).

Groups with ``adapt=False`` use ``ratio = 1``: plain SGD with momentum and the group's weight
decay. Which groups ``param_groups`` adapts is ``optim.adapt_rule``: by tensor rank (1-D
tensors and model-listed names are not, the default) or timm's rule (a group is adapted iff
its weight decay is non-zero). ``always_adapt=True`` applies the ratio to every group.

Under DDP the step runs unchanged on every rank: gradients are already averaged, so all
ranks compute the same norms and updates. See ``_foreach.py`` for why this is our own code.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import Tensor

from largebatch.optim._foreach import (LayerwiseOptimizer, Part, add_scaled_, mul_each, norms,
                                       safe_ratio)


def _lars_part(params: list[Tensor], grads: list[Tensor], bufs: Optional[list[Tensor]],
               buf_scales: Any, lr: Any, momentum: float, nesterov: bool, weight_decay: float,
               trust_coef: float, eps: float, trust_clip: bool, adapt: bool) -> None:
    """One LARS step over tensors of one device/dtype sharing hyperparameters (module doc).

    ``buf_scales`` is None without dampening, else per tensor ``1 - dampening`` (1 on the
    tensor's first step, whose buffer starts at zero: ``buf_1 = d``, torch's and timm's)."""
    # The gradients themselves are never written: d is a temporary once decay is added.
    decayed = weight_decay != 0
    d = torch._foreach_add(grads, params, alpha=weight_decay) if decayed else grads
    if adapt:
        w_norm, g_norm = norms(params), norms(grads)
        ratio = safe_ratio(trust_coef * w_norm / (g_norm + weight_decay * w_norm + eps),
                           w_norm, g_norm)
        if trust_clip:  # after the zero-norm fallback, as timm's
            ratio = torch.clamp(ratio / lr, max=1.0)
        d = mul_each(d, ratio, inplace=decayed)
    if bufs is not None:
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, d if buf_scales is None
                            else mul_each(d, buf_scales, inplace=False))
        # Nesterov: a new list (d may be the gradients themselves)
        d = torch._foreach_add(d, bufs, alpha=momentum) if nesterov else bufs
    add_scaled_(params, d, -lr)


def lars_update(parts: list[Part]) -> None:
    """The whole LARS step: every part, in one function (one graph when compiled)."""
    for part in parts:
        _lars_part(**part)


class LARS(LayerwiseOptimizer):
    """LARS with per-group options (formulas in the module docstring), timm's ``Lars`` step.

    Args:
        params: parameters or groups; groups may carry ``adapt`` (default True) and any option.
        lr: learning rate.
        momentum: heavy-ball momentum (0 keeps no buffer).
        dampening: torch's/timm's momentum dampening: later steps add ``(1 - dampening) * d``.
        nesterov: Nesterov momentum, step along ``d + momentum * buf`` (torch's and timm's);
            needs ``momentum > 0`` and ``dampening == 0``.
        weight_decay: L2 coefficient, added to the gradient before the trust ratio scaling.
        trust_coef: ``eta`` in the trust ratio (timm's ``trust_coeff``).
        eps: added to the ratio's denominator.
        trust_clip: LARC clip, ``ratio = min(ratio / lr, 1)``.
        always_adapt: use the trust ratio in groups with ``adapt=False`` too.
        fused: compile the step with ``torch.compile`` (fast on CPU; first step compiles).

    Raises:
        ValueError: a negative hyperparameter, or Nesterov without momentum or with dampening.
    """

    _update = staticmethod(lars_update)

    def __init__(self, params: Iterable[Any], lr: float = 0.1, momentum: float = 0.9,
                 weight_decay: float = 0.0, trust_coef: float = 0.001, eps: float = 1e-8,
                 trust_clip: bool = False, always_adapt: bool = False, dampening: float = 0.0,
                 nesterov: bool = False, fused: bool = False) -> None:
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay),
                            ("trust_coef", trust_coef), ("eps", eps), ("dampening", dampening)):
            if not value >= 0.0:
                raise ValueError(f"LARS: invalid {name}={value} (must be >= 0)")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError(f"LARS: nesterov needs momentum > 0 and dampening 0 (got "
                             f"momentum={momentum}, dampening={dampening})")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                        weight_decay=weight_decay, trust_coef=trust_coef, eps=eps,
                        trust_clip=trust_clip, always_adapt=always_adapt, adapt=True)
        super().__init__(params, defaults, fused)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # pickles/state dicts from before these options
            group.setdefault("dampening", 0.0)
            group.setdefault("nesterov", False)

    def _buffers(self, group: dict[str, Any], params: list[Tensor]) -> tuple[list[Tensor], Any]:
        """Momentum buffers (created at zero on first use) and the dampening scales."""
        bufs, scales = [], []
        for p in params:
            state = self.state[p]
            fresh = "momentum_buffer" not in state
            if fresh:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs.append(state["momentum_buffer"])
            scales.append(1.0 if fresh else 1.0 - group["dampening"])
        return bufs, (self._scalar(scales, params[0]) if group["dampening"] != 0 else None)

    def _part(self, group: dict[str, Any], params: list[Tensor]) -> Part:
        """Tensors, momentum buffers and options of one part."""
        bufs, buf_scales = (self._buffers(group, params) if group["momentum"] != 0
                            else (None, None))
        return dict(params=params, grads=[p.grad for p in params], bufs=bufs,
                    buf_scales=buf_scales, lr=self._scalar(group["lr"], params[0]),
                    momentum=group["momentum"], nesterov=bool(group["nesterov"]),
                    weight_decay=group["weight_decay"], trust_coef=group["trust_coef"],
                    eps=group["eps"], trust_clip=bool(group["trust_clip"]),
                    adapt=bool(group["adapt"] or group["always_adapt"]))
