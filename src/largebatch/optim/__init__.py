"""Optimizers and LR schedules, built from the config and the batch plan."""
from __future__ import annotations

import torch
from torch import nn

from largebatch.config import OptimConfig
from largebatch.optim.param_groups import param_groups

# ``optim.eps: null`` means the optimizer's own default: torch's AdamW 1e-8, timm's Lamb 1e-6.
EPS_DEFAULTS = {"adamw": 1e-8, "lamb": 1e-6}


def build_optimizer(cfg: OptimConfig, params: list[nn.Parameter] | nn.Module,
                    lr: float, no_decay_names: tuple[str, ...] = ()) -> torch.optim.Optimizer:
    """The configured optimizer at learning rate ``lr`` (the plan's peak LR).

    Args:
        cfg: the optim section (validated: keys that do not apply to ``cfg.name`` are at
            their defaults, see ``config._APPLIES_TO``).
        params: a module (parameter groups are derived from names and shapes) or a list.
        lr: the peak LR from the batch plan; schedules scale it per step.
        no_decay_names: extra parameter names the model wants excluded from decay/adaptation.
    """
    groups = param_groups(params, cfg.weight_decay, cfg.exclude_1d, no_decay_names,
                          adapt_rule=cfg.adapt_rule)
    eps = cfg.eps if cfg.eps is not None else EPS_DEFAULTS.get(cfg.name)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, dampening=cfg.dampening,
                               nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=eps,
                                 weight_decay=cfg.weight_decay)
    if cfg.name == "lars":
        from largebatch.optim.lars import LARS
        return LARS(groups, lr=lr, momentum=cfg.momentum, dampening=cfg.dampening,
                    nesterov=cfg.nesterov, weight_decay=cfg.weight_decay,
                    trust_coef=cfg.trust_coef, eps=cfg.trust_eps, trust_clip=cfg.trust_clip,
                    always_adapt=cfg.always_adapt, fused=cfg.fused)
    from largebatch.optim.lamb import LAMB
    return LAMB(groups, lr=lr, betas=tuple(cfg.betas), eps=eps, weight_decay=cfg.weight_decay,
                trust_clip=cfg.trust_clip, max_trust=cfg.max_trust,
                max_grad_norm=cfg.max_grad_norm, always_adapt=cfg.always_adapt,
                bias_correction=cfg.bias_correction, grad_averaging=cfg.grad_averaging,
                decoupled_decay=cfg.decoupled_decay, fused=cfg.fused)
