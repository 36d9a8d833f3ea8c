"""The plain single-process full-softmax margin loss every Partial FC test compares against.

Written without the head's code: F.normalize, F.linear, the margin as torch ops (ArcFace's
cos(theta + m) by the angle-sum identity), F.cross_entropy, autograd.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

S = 64.0


def reference(e: torch.Tensor, y: torch.Tensor, w: torch.Tensor, kind: str):
    """Full-softmax loss (mean over the batch) and its gradients (embeddings, centres)."""
    e = e.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    cos = F.linear(F.normalize(e, dim=1), F.normalize(w, dim=1))
    loss = F.cross_entropy(margin_logits(cos, y, kind), y)
    loss.backward()
    return loss.detach(), e.grad, w.grad


def margin_logits(cos: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """``s * cos`` with CosFace (m = 0.4) or ArcFace (m = 0.5) at each row's target."""
    c = cos.gather(1, y[:, None]).squeeze(1)
    if kind == "cos":
        phi = c - 0.4
    else:  # cos(theta + m); past theta = pi - m the continuous fallback cos(theta) - (1 - cos m)
        m = 0.5
        arc = c * math.cos(m) - torch.sqrt(1.0 - c * c) * math.sin(m)
        phi = torch.where(c > -math.cos(m), arc, c - (1.0 - math.cos(m)))
    return S * cos.scatter(1, y[:, None], phi[:, None])
