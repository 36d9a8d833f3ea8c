"""LARS: layer-wise adaptive rate scaling (You, Gitman and Ginsburg 2017, arXiv:1708.03888).

Per parameter tensor ``w`` with gradient ``g``, group LR ``lr``, weight decay ``wd``,
momentum ``mu`` and trust coefficient ``eta``, one step is::

    d     = g + wd * w                                   # L2 decay, added before scaling
    ratio = eta * ||w|| / (||g|| + wd * ||w|| + eps)
    ratio = min(ratio / lr, 1)                           # only with trust_clip (LARC)
    ratio = 1 if ||w|| == 0 or ||g|| == 0                # last: overrides the clip too
    buf   = mu * buf + ratio * d                         # buf starts at 0 (so buf_1 = ratio*d)
    w     = w - lr * buf

This is the torch-SGD form (LR outside the momentum buffer, as torch.optim.SGD, timm and
apex's LARC), not the paper's ``v = mu*v + lr*ratio*d; w -= v``: the two agree while the LR
is constant, and the torch form needs no momentum correction when a schedule changes the LR
(Goyal et al. 2017, sec. 2.1). With ``momentum == 0`` there is no buffer: ``w -= lr*ratio*d``.

``trust_clip`` is LARC's clip mode (apex ``LARC(clip=True)``): the LR a tensor effectively
gets, ``lr * ratio``, becomes ``min(eta*||w||/(...), lr)``, i.e. the layer-wise rate may lower
the global LR but never raise it.

Groups with ``adapt=False`` (1-D parameters and model-listed names, see ``param_groups``) use
``ratio = 1``: plain SGD with momentum and the group's weight decay, which ``param_groups``
sets to 0. ``always_adapt=True`` applies the ratio to those groups too.

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
               lr: Any, momentum: float, weight_decay: float, trust_coef: float, eps: float,
               trust_clip: bool, adapt: bool) -> None:
    """One LARS step over tensors of one device/dtype sharing hyperparameters (module doc)."""
    # The gradients themselves are never written: d is a temporary once decay is added.
    decayed = weight_decay != 0
    d = torch._foreach_add(grads, params, alpha=weight_decay) if decayed else grads
    if adapt:
        w_norm, g_norm = norms(params), norms(grads)
        ratio = trust_coef * w_norm / (g_norm + weight_decay * w_norm + eps)
        if trust_clip:
            ratio = torch.clamp(ratio / lr, max=1.0)
        d = mul_each(d, safe_ratio(ratio, w_norm, g_norm), inplace=decayed)
    if bufs is not None:
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, d)
        d = bufs
    add_scaled_(params, d, -lr)


def lars_update(parts: list[Part]) -> None:
    """The whole LARS step: every part, in one function (one graph when compiled)."""
    for part in parts:
        _lars_part(**part)


class LARS(LayerwiseOptimizer):
    """LARS with per-group options (formulas in the module docstring).

    Args:
        params: parameters or groups; groups may carry ``adapt`` (default True) and any option.
        lr: learning rate.
        momentum: heavy-ball momentum (0 keeps no buffer).
        weight_decay: L2 coefficient, added to the gradient before the trust ratio scaling.
        trust_coef: ``eta`` in the trust ratio.
        eps: added to the ratio's denominator.
        trust_clip: LARC clip, ``ratio = min(ratio / lr, 1)``.
        always_adapt: use the trust ratio in groups with ``adapt=False`` too.
        fused: compile the step with ``torch.compile`` (fast on CPU; first step compiles).
    """

    _update = staticmethod(lars_update)

    def __init__(self, params: Iterable[Any], lr: float = 0.1, momentum: float = 0.9,
                 weight_decay: float = 0.0, trust_coef: float = 0.001, eps: float = 1e-8,
                 trust_clip: bool = False, always_adapt: bool = False,
                 fused: bool = False) -> None:
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay),
                            ("trust_coef", trust_coef), ("eps", eps)):
            if not value >= 0.0:
                raise ValueError(f"LARS: invalid {name}={value} (must be >= 0)")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coef=trust_coef, eps=eps, trust_clip=trust_clip,
                        always_adapt=always_adapt, adapt=True)
        super().__init__(params, defaults, fused)

    def _part(self, group: dict[str, Any], params: list[Tensor]) -> Part:
        """Tensors, momentum buffers (created at zero on first use) and options of one part."""
        bufs = None
        if group["momentum"] != 0:
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format)
                bufs.append(state["momentum_buffer"])
        return dict(params=params, grads=[p.grad for p in params], bufs=bufs,
                    lr=self._scalar(group["lr"], params[0]), momentum=group["momentum"],
                    weight_decay=group["weight_decay"], trust_coef=group["trust_coef"],
                    eps=group["eps"], trust_clip=bool(group["trust_clip"]),
                    adapt=bool(group["adapt"] or group["always_adapt"]))
