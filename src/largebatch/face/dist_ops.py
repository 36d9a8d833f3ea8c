"""Collectives for the sharded head: world lookup, all-reduce, and an autograd-aware gather.

Everything degrades to the identity when no process group is initialised (one process), and
nothing names a device or a backend: tensors stay where the caller put them, so the same code
runs over gloo on CPU and NCCL on GPUs. Ranks may hold different numbers of rows (a short last
window): sizes are exchanged first and rows are padded to the largest for the collective.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

Group = Optional[dist.ProcessGroup]


def world(group: Group = None) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group``; ``(0, 1)`` without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def all_reduce_(tensor: torch.Tensor, op: str = "sum", group: Group = None) -> torch.Tensor:
    """In-place all-reduce (``"sum"`` or ``"max"``); a no-op on one rank. Returns ``tensor``."""
    if world(group)[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX,
                        group=group)
    return tensor


def gather_sizes(n: int, device: torch.device, group: Group = None) -> list[int]:
    """Every rank's row count, in rank order (one tiny all-gather)."""
    size = world(group)[1]
    if size == 1:
        return [n]
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    out = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(out, mine, group=group)
    return [int(t.item()) for t in out]


def _gather_padded(x: torch.Tensor, sizes: Sequence[int], group: Group) -> torch.Tensor:
    """All-gather rows of possibly different counts; the rows concatenated in rank order."""
    top = max(sizes)
    padded = x.new_zeros((top,) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


class _GatherRows(torch.autograd.Function):
    """All-gather forward; backward sums every rank's gradient and keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int], rank: int, grad_scale: float,
                group: Group) -> torch.Tensor:
        ctx.sizes, ctx.rank, ctx.grad_scale, ctx.group = sizes, rank, grad_scale, group
        return _gather_padded(x, sizes, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Each rank holds d L / d E_all from its own class shard only: the true gradient is
        # their sum. The reduction runs in at least fp32 (bf16 partial sums lose digits).
        acc = torch.promote_types(grad.dtype, torch.float32)
        total = grad.to(acc).contiguous()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        mine = total[start: start + ctx.sizes[ctx.rank]]
        if ctx.grad_scale != 1.0:
            mine = mine * ctx.grad_scale
        return mine.to(grad.dtype), None, None, None, None


def all_gather_rows(x: torch.Tensor, sizes: Optional[Sequence[int]] = None,
                    grad_scale: Optional[float] = None, group: Group = None) -> torch.Tensor:
    """All-gather ``x``'s rows from every rank (rank order), differentiably.

    Args:
        x: this rank's rows ``(n, ...)``.
        sizes: every rank's ``n`` if already known (saves one collective).
        grad_scale: factor on the gradient returned to ``x``; default ``world_size``, the
            DDP convention: DDP divides the backbone's gradients by the world size, so the
            embeddings' gradient must be ``world_size x dL/dE`` for the averaged backbone
            gradient to be that of the global loss.
        group: process group (default: the world).

    Returns:
        ``(sum(sizes), ...)``; ``x`` itself on one rank.
    """
    rank, size = world(group)
    if size == 1:
        return x
    sizes = list(sizes) if sizes is not None else gather_sizes(x.shape[0], x.device, group)
    scale = float(size) if grad_scale is None else float(grad_scale)
    return _GatherRows.apply(x, sizes, rank, scale, group)


@torch.no_grad()
def all_gather_labels(y: torch.Tensor, sizes: Optional[Sequence[int]] = None,
                      group: Group = None) -> torch.Tensor:
    """All-gather integer labels (no gradient), rank order; ``y`` itself on one rank."""
    if world(group)[1] == 1:
        return y
    sizes = list(sizes) if sizes is not None else gather_sizes(y.shape[0], y.device, group)
    return _gather_padded(y, sizes, group)
