"""Parameter groups: 1-D tensors (biases, norm weights) get no weight decay nor adaptation."""
from __future__ import annotations

from typing import Any

from torch import nn

from largebatch.config.validate import ADAPT_RULES


def param_groups(params: nn.Module | list[nn.Parameter], weight_decay: float, exclude_1d: bool,
                 no_decay_names: tuple[str, ...] = (),
                 adapt_rule: str = "rank") -> list[dict[str, Any]]:
    """Split parameters into a decayed/adapted group and an excluded one.

    The excluded group carries ``weight_decay=0`` and ``adapt=False`` (LARS/LAMB read the
    latter; torch's optimizers ignore unknown group keys). A module may also list names
    (substring match) that it wants excluded, e.g. a margin head's scale.

    Args:
        params: a module (names and shapes) or a plain list (shapes only).
        weight_decay: the decayed group's weight decay.
        exclude_1d: put tensors with ``ndim <= 1`` into the excluded group.
        no_decay_names: name substrings excluded whatever their shape.
        adapt_rule: whether the decayed group is adapted: ``'rank'`` always (the exclusion
            alone decides, so ``weight_decay=0`` still adapts the N-D tensors), ``'timm'``
            only when ``weight_decay != 0`` (timm's ``Lars``/``Lamb``: a group is adapted iff
            it has weight decay).

    Raises:
        ValueError: an unknown ``adapt_rule``.
    """
    if adapt_rule not in ADAPT_RULES:
        raise ValueError(f"adapt_rule={adapt_rule!r} is not one of {'|'.join(ADAPT_RULES)}")
    if isinstance(params, nn.Module):
        named = [(n, p) for n, p in params.named_parameters() if p.requires_grad]
    else:
        named = [(str(i), p) for i, p in enumerate(params) if p.requires_grad]
    keep, skip = [], []
    for name, p in named:
        excluded = (exclude_1d and p.ndim <= 1) or any(s in name for s in no_decay_names)
        (skip if excluded else keep).append(p)
    adapt = adapt_rule == "rank" or weight_decay != 0
    groups = [{"params": keep, "weight_decay": weight_decay, "adapt": adapt}]
    if skip:
        groups.append({"params": skip, "weight_decay": 0.0, "adapt": False})
    return [g for g in groups if g["params"]]
