"""Shared machinery of the layer-wise adaptive optimizers (LARS, LAMB).

Why we write our own: torch ships no LARS or LAMB, and the maintained third-party ones do not
fit here. apex's ``FusedLAMB``/``LARC`` need its CUDA extension (custom kernels, no CPU), and
timm's ``Lars``/``Lamb`` loop over parameters one tensor at a time with a dozen eager ops each
(memory-bound passes plus Python overhead per tensor). These implementations write each
update **once**, as multi-tensor ``torch._foreach_*`` ops over all tensors of a parameter
group (one kernel per op and list on GPU, per-tensor norms via ``torch._foreach_norm``), and
``fused=True`` hands that same function to ``torch.compile``, which fuses the passes into a
few loops: the fast path on CPU, where the step is memory-bound. Numbers:
``benchmarks/bench_optim.py`` (results in ``docs/BENCHMARKS.md``).

The optimizer classes only gather tensors and per-step scalars into *parts* (one per parameter
group and device/dtype) and call a pure update function on the list of parts, so eager and
compiled steps run the very same code.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import Tensor

Scalar = Union[float, Tensor]
Part = dict[str, Any]

# Norms (and hence trust ratios) of low-precision tensors are computed in float32.
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def norms(tensors: list[Tensor]) -> Tensor:
    """Per-tensor L2 norms stacked into one 1-D tensor (float32 for half/bfloat16 inputs)."""
    dtype = torch.float32 if tensors[0].dtype in _LOW_PRECISION else None
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=dtype))


def safe_ratio(ratio: Tensor, w_norm: Tensor, other_norm: Tensor) -> Tensor:
    """``ratio`` where both norms are positive, else 1 (a zero tensor or a zero update)."""
    ok = (w_norm > 0) & (other_norm > 0)
    return torch.where(ok, ratio, torch.ones_like(ratio))


def mul_each(tensors: list[Tensor], scales: Union[list[float], Tensor],
             inplace: bool) -> list[Tensor]:
    """``tensors[i] * scales[i]``, in place (on a temporary) or new (on the gradients).

    ``scales`` is a 1-D tensor (one 0-d scale per tensor, kept on the device: no host sync)
    or Python floats (eager: the multi-tensor scalar-list kernel)."""
    if isinstance(scales, Tensor):
        scales = list(scales.unbind())
    if inplace:
        torch._foreach_mul_(tensors, scales)
        return tensors
    return torch._foreach_mul(tensors, scales)


def div_each(tensors: list[Tensor], scales: Union[list[float], Tensor],
             inplace: bool = False) -> list[Tensor]:
    """``tensors[i] / scales[i]`` (new list, or in place); ``scales`` are Python floats (eager:
    the multi-tensor scalar-list kernel) or a 1-D tensor (compiled)."""
    if isinstance(scales, Tensor):
        scales = list(scales.unbind())
    if inplace:
        torch._foreach_div_(tensors, scales)
        return tensors
    return torch._foreach_div(tensors, scales)


def add_scaled_(params: list[Tensor], update: list[Tensor], scale: Scalar) -> None:
    """``params[i] += scale * update[i]`` in place; ``scale`` a float or a 0-d tensor."""
    if isinstance(scale, Tensor):
        torch._foreach_add_(params, torch._foreach_mul(update, scale))
    else:
        torch._foreach_add_(params, update, alpha=scale)


@functools.cache
def compiled(fn: Callable[..., None]) -> Callable[..., None]:
    """``fn`` through ``torch.compile``, once per function (dynamo caches per code object).

    ``fullgraph=True``: a graph break would silently fall back to eager pieces, so fail loudly.
    ``dynamic=False``: parameter shapes never change; static shapes give the tightest loops.
    Per-step scalars (LR, bias corrections) are passed as tensors, so schedules do not
    recompile.
    """
    return torch.compile(fn, dynamic=False, fullgraph=True)


class LayerwiseOptimizer(torch.optim.Optimizer):
    """Step plumbing shared by LARS and LAMB.

    Subclasses set ``_update`` (a pure function of a list of parts and keyword globals) and
    implement ``_part`` (gather one group's tensors and state) and optionally ``_globals``.

    Args:
        params: parameters or parameter groups.
        defaults: per-group defaults (torch's convention).
        fused: run ``_update`` through ``torch.compile`` instead of eagerly.
    """

    _update: Callable[..., None]
    # Optimizer-wide options kept as attributes, not group keys; pickled with the optimizer.
    _instance_options: tuple[str, ...] = ("fused",)

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], fused: bool) -> None:
        super().__init__(params, defaults)
        # Not a group option: torch's load_state_dict treats a group key named "fused" as
        # "keep 'step' on the parameter's device", which we do not want.
        self.fused = bool(fused)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update({k: getattr(self, k) for k in self._instance_options})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        options = {k: state.pop(k) for k in self._instance_options if k in state}
        super().__setstate__(state)
        self.fused = False
        self.__dict__.update(options)

    def _part(self, group: dict[str, Any], params: list[Tensor]) -> Part:
        """One group's tensors and options for ``_update`` (each optimizer defines its own)."""
        raise NotImplementedError(f"{type(self).__name__} must define _part (LARS and LAMB do)")

    def _globals(self) -> dict[str, Any]:
        """Keyword arguments of ``_update`` that span all groups."""
        return {}

    def _scalar(self, value: Union[Scalar, list[float]], like: Tensor) -> Union[Scalar, Tensor]:
        """A per-step scalar (or list of per-tensor ones): as is when eager, a tensor on
        ``like``'s device when compiled (a changing Python float would be baked into the graph).
        The tensor has ``like``'s dtype (float32 for half/bfloat16, whose rounding of e.g. 0.9
        would change the step), so float64 runs stay float64 exact."""
        if not self.fused:
            return value
        dtype = torch.float32 if like.dtype in _LOW_PRECISION else like.dtype
        return torch.as_tensor(value, dtype=dtype, device=like.device)

    def _with_grads(self, group: dict[str, Any]) -> list[list[Tensor]]:
        """The group's parameters that have a gradient, split by (device, dtype)."""
        split: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue  # frozen this step or unused: no update, no state
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            split.setdefault((p.device, p.dtype), []).append(p)
        return list(split.values())

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One optimizer step over every group; returns the closure's loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        parts = [self._part(group, params) for group in self.param_groups
                 for params in self._with_grads(group)]
        if parts:
            update = compiled(type(self)._update) if self.fused else type(self)._update
            update(parts, **self._globals())
        return loss
