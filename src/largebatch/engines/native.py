"""What the single-process and DDP engines share: torch's own optimizer step, fp16 grad
scaler (one for the model and the sharded modules), clipping by the true global norm, and
torch state dicts.

DeepSpeed brings its own versions of all of these (``engines/deepspeed``); the two engines here
differ only in how they wrap the model and reduce gradients (``single``, ``ddp``).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Optional, Sequence

import torch
from torch import nn

from largebatch.dist import DistEnv
from largebatch.engines.base import Engine, GradientProbe, total_grad_norm
from largebatch.engines.sharded import ShardedParts


class JointGradScaler(torch.amp.GradScaler):
    """torch's GradScaler over the model AND the sharded modules, with one verdict per step.

    The loss is scaled once, so the sharded modules' gradients carry the scale too; they live
    outside the model's optimizer (a Partial FC window's rows), so ``unscale_`` cannot reach
    them. ``unscale_all_`` unscales both with torch's kernel and returns this rank's inf/NaN
    flag; ``set_verdict`` then replaces the scaler's per-rank check by the one every rank
    agreed on, so ``step`` skips and ``update`` backs off once, on every rank alike. That is
    the way torch's own FSDP ``ShardedGradScaler`` shares its verdict (it writes the same
    ``found_inf_per_device`` after an all-reduce).
    """

    def unscale_all_(self, optimizer: torch.optim.Optimizer, sharded: ShardedParts,
                     device: torch.device) -> bool:
        """``unscale_`` the model's gradients and the sharded modules'; whether this rank saw
        an inf/NaN in either (no collective)."""
        self.unscale_(optimizer)
        found = torch.zeros((), dtype=torch.float32, device=device)
        for f in self._per_optimizer_states[id(optimizer)]["found_inf_per_device"].values():
            found += f.to(device)
        # the scale is a power of two: 1/scale is exact, as torch's own inv_scale
        inv_scale = torch.full((), 1.0 / self.get_scale(), dtype=torch.float32, device=device)
        sharded.unscale_(inv_scale, found)
        return bool(found > 0)

    def set_verdict(self, optimizer: torch.optim.Optimizer, found_inf: bool) -> None:
        """Make the coming ``step``/``update`` act on ``found_inf`` (after ``unscale_all_``)."""
        for f in self._per_optimizer_states[id(optimizer)]["found_inf_per_device"].values():
            f.fill_(1.0 if found_inf else 0.0)


class NativeEngine(Engine, GradientProbe):
    """torch.optim + torch.amp on the model as the subclass wraps it."""

    def __init__(self, denv: DistEnv, device: torch.device, precision: str = "fp32",
                 grad_clip: float = 0.0) -> None:
        super().__init__(denv, device, precision, grad_clip)
        self._scaler = JointGradScaler(device.type, enabled=precision == "fp16")

    # ---- the step -------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate an already-weighted micro-batch loss (scaled under fp16: the sharded
        modules' part of the loss is in it, so their gradients carry the same scale)."""
        self._scaler.scale(loss).backward()

    def grads_finite(self) -> bool:
        """Whether this rank's gradients are all finite (one max-abs per tensor, one sync).

        fp16 is left to the grad scaler: its scaled gradients overflow by design and it skips
        that update itself.
        """
        if self.precision == "fp16":
            return True
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:
            return True
        # inf-norm = max |g|: inf only for an inf element, NaN propagates; no overflow.
        peaks = torch._foreach_norm(grads, float("inf"))
        return bool(torch.isfinite(torch.stack(peaks)).all())

    def _unscale_and_agree(self, want_norm: bool) -> tuple[float, bool]:
        """fp16: unscale every gradient; all ranks agree whether one is inf/NaN anywhere.

        The model's gradients are the same on every rank after DDP's reduction (so is the
        scaler's verdict on them), but each rank's shards are its own: one rank's inf must skip
        the step on all. Its flag rides in the collective that sums the shards' squared norms.

        Returns:
            The shards' squared gradient norm summed over ranks (0.0 unless ``want_norm``),
            and whether the step must be skipped.
        """
        reduce_sum = functools.partial(self.reduce_scalars, op="sum")
        if not self._scaler.is_enabled():
            return (self.sharded.sq_norm(reduce_sum) if want_norm else 0.0), False
        found = self._scaler.unscale_all_(self.optimizer, self.sharded, self.device)
        if not self.sharded:
            return 0.0, found
        found_sum, head_sq = reduce_sum(
            [float(found), self.sharded.local_sq_norm() if want_norm else 0.0])
        self._scaler.set_verdict(self.optimizer, found_sum > 0)
        return head_sq, found_sum > 0

    def _norm_and_clip(self, params: list[nn.Parameter], head_sq: float, clip: bool) -> float:
        """True global norm over the replicated and the sharded parameters (unscaled); clip
        both by one coefficient (torch's ``clip_grad_norm_`` formula) when ``clip``."""
        if not self.sharded:
            if clip:
                return float(torch.nn.utils.clip_grad_norm_(params, self.grad_clip))
            return total_grad_norm(params)
        norm = math.sqrt(total_grad_norm(params) ** 2 + head_sq)
        coef = min(1.0, self.grad_clip / (norm + 1e-6)) if clip else 1.0
        if coef < 1.0:
            with torch.no_grad():
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(coef)
            self.sharded.mul_grad_(coef)
        return norm

    def step(self, compute_norm: bool = False) -> tuple[Optional[float], bool]:
        """Clip (if asked), step the optimizers, zero the gradients (``Engine.step``).

        fp16: every gradient is unscaled first (the norm and the clip see the true ones), and
        an inf/NaN anywhere on any rank skips both the model's and the sharded modules' step
        on every rank; the scale is then backed off once.
        """
        want = self.grad_clip > 0 or compute_norm
        head_sq, skip = self._unscale_and_agree(want)
        norm = self._norm_and_clip(self.parameters(), head_sq, self.grad_clip > 0 and not skip) \
            if want else None
        self._scaler.step(self.optimizer)  # skipped by the scaler on its (agreed) verdict
        self._scaler.update()
        if skip:
            self.sharded.drop_window()
        else:
            self.sharded.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, not skip

    def zero_grad(self) -> None:
        """Drop the window's gradients (``Engine.zero_grad``)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.sharded.drop_window()

    def loss_scale(self) -> float:
        """The fp16 grad scaler's current scale (1.0 without fp16)."""
        return float(self._scaler.get_scale()) if self._scaler.is_enabled() else 1.0

    # ---- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Model, optimizer and grad-scaler state (the same on every rank)."""
        return {"model": self.unwrapped().state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self._scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any], rank_state: Optional[dict[str, Any]]
                        ) -> None:
        """Restore ``state_dict`` and this rank's sharded modules."""
        self._load_replicated(state)
        self.sharded.load_state_dict(rank_state, self.rank, self.world_size)

    def load_resharded(self, state: dict[str, Any],
                       rank_states: Sequence[Optional[dict[str, Any]]]) -> None:
        """Restore ``state_dict``; cut the sharded modules again from every old rank's."""
        self._load_replicated(state)
        self.sharded.load_resharded(rank_states, self.rank, self.world_size)

    def _load_replicated(self, state: dict[str, Any]) -> None:
        self.unwrapped().load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._scaler.load_state_dict(state["scaler"])
