"""Parameter groups: 1-D tensors (biases, norm weights) get no weight decay nor adaptation."""
from __future__ import annotations

from typing import Any

from torch import nn


def param_groups(params: nn.Module | list[nn.Parameter], weight_decay: float, exclude_1d: bool,
                 no_decay_names: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Split parameters into a decayed/adapted group and an excluded one.

    The excluded group carries ``weight_decay=0`` and ``adapt=False`` (LARS/LAMB read the
    latter; torch's optimizers ignore unknown group keys). A module may also list names
    (substring match) that it wants excluded, e.g. a margin head's scale.
    """
    if isinstance(params, nn.Module):
        named = [(n, p) for n, p in params.named_parameters() if p.requires_grad]
    else:
        named = [(str(i), p) for i, p in enumerate(params) if p.requires_grad]
    keep, skip = [], []
    for name, p in named:
        excluded = (exclude_1d and p.ndim <= 1) or any(s in name for s in no_decay_names)
        (skip if excluded else keep).append(p)
    groups = [{"params": keep, "weight_decay": weight_decay, "adapt": True}]
    if skip:
        groups.append({"params": skip, "weight_decay": 0.0, "adapt": False})
    return [g for g in groups if g["params"]]
