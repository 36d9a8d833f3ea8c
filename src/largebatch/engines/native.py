"""What the single-process and DDP engines share: torch's own optimizer step, fp16 grad
scaler, clipping by the true global norm, and torch state dicts.

DeepSpeed brings its own versions of all of these (``engines/deepspeed``); the two engines here
differ only in how they wrap the model and reduce gradients (``single``, ``ddp``).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from torch import nn

from largebatch.config import ConfigError
from largebatch.dist import DistEnv
from largebatch.engines.base import Engine, GradientProbe, total_grad_norm


class NativeEngine(Engine, GradientProbe):
    """torch.optim + torch.amp on the model as the subclass wraps it."""

    def __init__(self, denv: DistEnv, device: torch.device, precision: str = "fp32",
                 grad_clip: float = 0.0) -> None:
        super().__init__(denv, device, precision, grad_clip)
        self._scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def setup_sharded(self, module: nn.Module,
                      optimizer: Optional[torch.optim.Optimizer] = None) -> nn.Module:
        """As ``Engine.setup_sharded``.

        Raises:
            ConfigError: with fp16 (the grad scaler cannot unscale a module's own gradients).
        """
        if self._scaler.is_enabled():
            raise ConfigError("train.precision=fp16 is not supported with a sharded module "
                              "(e.g. the Partial FC head); use bf16 or fp32")
        return super().setup_sharded(module, optimizer)

    # ---- the step -------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate an already-weighted micro-batch loss (scaled under fp16)."""
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

    def _global_norm_and_clip(self, params: list[nn.Parameter]) -> float:
        """True global norm over the replicated and the sharded parameters; clip both by one
        coefficient (torch's ``clip_grad_norm_`` formula) when ``grad_clip`` is set."""
        sharded = self.sharded.sq_norm(lambda v: self.reduce_scalars(v, op="sum"))
        norm = math.sqrt(total_grad_norm(params) ** 2 + sharded)
        if self.grad_clip > 0:
            coef = min(1.0, self.grad_clip / (norm + 1e-6))
            if coef < 1.0:
                with torch.no_grad():
                    for p in params:
                        if p.grad is not None:
                            p.grad.mul_(coef)
                self.sharded.mul_grad_(coef)
        return norm

    def step(self, compute_norm: bool = False) -> tuple[Optional[float], bool]:
        """Clip (if asked), step the optimizers, zero the gradients (``Engine.step``)."""
        norm = None
        if self.grad_clip > 0 or compute_norm:
            # fp16: the gradients carry the loss scale; unscale first so the norm (and the
            # clip) see the true gradient. The scaler's step then knows.
            self._scaler.unscale_(self.optimizer)
            params = self.parameters()
            if self.sharded:
                norm = self._global_norm_and_clip(params)
            elif self.grad_clip > 0:
                norm = float(torch.nn.utils.clip_grad_norm_(params, self.grad_clip))
            else:
                norm = total_grad_norm(params)
        scale = self._scaler.get_scale() if self._scaler.is_enabled() else None
        self._scaler.step(self.optimizer)
        self._scaler.update()
        # fp16: the scaler skipped optimizer.step() (inf/NaN gradients) iff it lowered the scale.
        applied = scale is None or self._scaler.get_scale() >= scale
        self.sharded.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, applied

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
