"""Margin softmax cross-entropy over class-sharded cosines, in log-sum-exp form.

Each rank holds the cosines of the (gathered) global batch against its own class columns. The
loss of row ``i`` is ``log(sum_k exp(z_ik)) - z_i,y_i`` over *all* ranks' columns, computed as

    max_i = all_reduce_max(max_k z_ik)
    sum_i = all_reduce_sum(sum_k exp(z_ik - max_i))
    loss_i = log(sum_i) + max_i - all_reduce_sum(z_i,y_i on the rank that owns y_i)

so no probability is ever formed for the loss and nothing is clamped: a confidently wrong row
reports its true loss (insightface's ``clamp_min(1e-30).log()`` stops at 69.08). Everything
after the cosines runs in fp32 (fp64 if the cosines are fp64), whatever the input dtype; under
fp16/bf16 autocast too, which casts down only matmul-like ops (none here: its max, exp, sum
and log run on the fp32 buffer as they are). Only the gradient handed back to the cosines
takes their dtype (under fp16 it carries the loss scale, and the grad scaler checks it).

One fused autograd function applies the margin, the scale and the cross-entropy: it keeps a
single ``(B, S)`` buffer (the logits, then their exponentials, turned into the gradient in place
by ``backward``) instead of the four or five an op-by-op graph would save, and makes six passes
over it in all (scale, max, subtract, exp, sum; one scaling pass in backward). The margin's
gradient at the targets is the exact ``d phi / d c``, by autograd on the ``B`` target cosines.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from largebatch.face.dist_ops import all_reduce_
from largebatch.face.margins import CombinedMargin


def _target_and_slope(margin: CombinedMargin, cos_t: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``phi(c)`` and ``d phi / d c`` at the target cosines (elementwise, via autograd)."""
    with torch.enable_grad():
        leaf = cos_t.detach().requires_grad_(True)
        phi = margin.target(leaf)
        if leaf.numel() == 0:
            return phi.detach(), torch.zeros_like(leaf)
        (slope,) = torch.autograd.grad(phi.sum(), leaf)
    return phi.detach(), slope


class _MarginSoftmaxCE(torch.autograd.Function):
    """Fused margin + scale + distributed softmax cross-entropy; see the module docstring."""

    @staticmethod
    def forward(ctx, cos: torch.Tensor, labels: torch.Tensor, margin: CombinedMargin,
                normalizer: float, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
        acc = torch.promote_types(cos.dtype, torch.float32)
        s = margin.s
        # the one (B, S) buffer: logits, then exp(logit - max), then (in backward) the gradient
        z = cos.detach().mul(s) if cos.dtype == acc else cos.detach().to(acc).mul_(s)
        rows = torch.nonzero(labels >= 0).view(-1)
        cols = labels[rows]
        phi, slope = _target_and_slope(margin, cos.detach()[rows, cols].to(acc))
        z[rows, cols] = phi * s
        target = torch.zeros(z.shape[0], dtype=acc, device=z.device)
        target[rows] = phi * s
        all_reduce_(target, "sum", group)  # exactly one rank owns each row's target
        zmax = z.max(dim=1).values
        all_reduce_(zmax, "max", group)
        z.sub_(zmax[:, None]).exp_()
        sumexp = z.sum(dim=1)
        all_reduce_(sumexp, "sum", group)
        loss = (sumexp.log() + zmax - target).sum() / normalizer
        ctx.save_for_backward(z, sumexp, rows, cols, slope)
        ctx.scale, ctx.normalizer, ctx.in_dtype, ctx.used = s, float(normalizer), cos.dtype, False
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        if ctx.used:
            raise RuntimeError("PartialFC's loss can be backpropagated once (its softmax "
                               "buffer becomes the gradient in place)")
        ctx.used = True
        e, sumexp, rows, cols, slope = ctx.saved_tensors
        # d loss / d z = (softmax - onehot) / N;  d z / d c = s, or s * phi'(c) at the targets.
        # softmax = e / sumexp: one pass scales every row, the B targets are fixed up after.
        k = grad_loss.to(e.dtype) * (ctx.scale / ctx.normalizer)
        e.mul_((k / sumexp)[:, None])
        e[rows, cols] = (e[rows, cols] - k) * slope
        return e.to(ctx.in_dtype), None, None, None, None


class _RowNormalize(torch.autograd.Function):
    """``x / max(|x|, eps)`` per row, with a two-pass backward.

    ``F.normalize``'s autograd graph (norm, clamp, expand, div) spends about a dozen passes over
    the class centres in backward; the closed form ``(g - y (y . g)) / |x|`` needs two. The
    output is what ``F.linear`` saves anyway, so saving it here costs no memory. With
    ``out_dtype`` (fp16 rows normalised in fp32) the caller keeps only the cast copy: ``x``
    (alive anyway: the fp32 centres) is saved instead and ``y`` recomputed in backward, which
    runs in ``x``'s dtype.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float, out_dtype: Optional[torch.dtype]
                ) -> torch.Tensor:
        raw = torch.linalg.vector_norm(x, dim=1, keepdim=True)
        norm = raw.clamp_min(eps)
        y = x / norm
        ctx.recompute = out_dtype is not None and out_dtype != x.dtype
        ctx.save_for_backward(x if ctx.recompute else y, norm, raw < eps)
        return y.to(out_dtype) if ctx.recompute else y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        saved, norm, clamped = ctx.saved_tensors
        y = saved / norm if ctx.recompute else saved
        grad = grad.to(y.dtype)
        # rows whose norm was clamped are a plain division by eps: no projection term
        dot = torch.linalg.vecdot(y, grad, dim=1).unsqueeze(1).masked_fill_(clamped, 0.0)
        return torch.addcmul(grad, y, dot, value=-1.0).div_(norm), None, None


def normalize_rows(x: torch.Tensor, eps: float = 1e-12,
                   out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``F.normalize(x, dim=1)`` with the same values and a cheaper exact backward.

    Args:
        x: ``(n, d)`` rows.
        eps: the smallest norm divided by.
        out_dtype: cast the unit rows to this dtype (computed, and differentiated, in
            ``x``'s); default ``x``'s.
    """
    return _RowNormalize.apply(x, eps, out_dtype)


def margin_softmax_ce(cos: torch.Tensor, labels: torch.Tensor, margin: CombinedMargin,
                      normalizer: float, group: Optional[dist.ProcessGroup] = None
                      ) -> torch.Tensor:
    """Sum over rows of the margin-softmax cross-entropy, divided by ``normalizer``.

    Args:
        cos: ``(B, S)`` cosines of the global batch against this rank's (sampled) classes.
        labels: ``(B,)`` column of each row's target among this rank's ``S`` columns, ``-1``
            where another rank owns it. Every row's target must be owned by exactly one rank.
        margin: the target-logit margin and scale.
        normalizer: the loss is ``sum_i loss_i / normalizer`` (the global batch, or the whole
            accumulation window's global sample count).
        group: process group over which the classes are sharded.

    Returns:
        A scalar (fp32 or fp64), identical on every rank.
    """
    return _MarginSoftmaxCE.apply(cos, labels, margin, normalizer, group)
