"""The one small interface the trainer talks to (in the spirit of Lightning Fabric's Strategy).

The training loop never asks which engine it has. A capability an engine lacks is an explicit
no-op here (a single process has nothing to all-reduce; DeepSpeed owns its accumulation
boundary), never a branch in the loop.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Any, Iterator, Optional

import torch
import torch.distributed as torch_dist
from torch import nn

from largebatch.dist import DistEnv

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def total_grad_norm(params: list[nn.Parameter]) -> float:
    """The 2-norm of all gradients together, as ``clip_grad_norm_`` measures it (no clipping).

    Written out rather than ``torch.nn.utils.get_total_norm`` (torch >= 2.6 only): the norm of
    the per-tensor norms (each in its gradient's dtype, as torch does), combined in float64.
    """
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norms = torch.stack([torch.linalg.vector_norm(g, 2.0).double() for g in grads])
    return float(torch.linalg.vector_norm(norms, 2.0))


class Engine(ABC):
    """Runs forward/backward/step for one rank; owns wrapping, syncing and clipping.

    Args:
        denv: where this process sits in the job.
        device: the device this rank trains on.
        precision: 'fp32', 'bf16' or 'fp16' (autocast around the forward pass).
        grad_clip: max global gradient norm (0 = no clipping).
    """

    name = "base"

    def __init__(self, denv: DistEnv, device: torch.device, precision: str = "fp32",
                 grad_clip: float = 0.0) -> None:
        self.denv = denv
        self.device = device
        self.precision = precision
        self.grad_clip = grad_clip
        self.model: Optional[nn.Module] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.extra_modules: list[nn.Module] = []
        self._scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    # ---- identity -------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        """This process's global rank."""
        return self.denv.rank

    @property
    def world_size(self) -> int:
        """Number of ranks training together."""
        return self.denv.world_size

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs, summaries and checkpoints."""
        return self.denv.is_main

    # ---- set-up ---------------------------------------------------------------------------
    @abstractmethod
    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        """Place and wrap ``model``, adopt ``optimizer``; returns the module to call."""

    def setup_module(self, module: nn.Module) -> nn.Module:
        """Place a module the engine must NOT wrap (e.g. a class-sharded Partial FC head).

        Its parameters are stepped by the same optimizer but never all-reduced by DDP nor
        partitioned by ZeRO: the module itself owns its cross-rank communication.
        """
        module = module.to(self.device)
        self.extra_modules.append(module)
        return module

    # ---- the step -------------------------------------------------------------------------
    @contextlib.contextmanager
    def accumulate(self, is_boundary: bool) -> Iterator[None]:
        """Context for one micro-batch; gradients sync only when ``is_boundary`` (default: no-op)."""
        yield

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed-precision context for the forward pass (a no-op at fp32)."""
        dtype = _DTYPES[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate an already-scaled micro-batch loss."""
        self._scaler.scale(loss).backward()

    def parameters(self) -> list[nn.Parameter]:
        """All trainable parameters the optimizer steps (wrapped model + extra modules)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        for module in self.extra_modules:
            params += [p for p in module.parameters() if p.requires_grad]
        return params

    def step(self, compute_norm: bool = False) -> Optional[float]:
        """Clip (if asked), step the optimizer, zero the gradients.

        Called after the window's last backward, when DDP has averaged the gradients: the
        norm is that of the global gradient, the same on every rank (a module placed with
        ``setup_module`` owns its own sync; its local gradients count as they are).

        Args:
            compute_norm: measure the gradient norm even when not clipping (``log.grad_norm``).

        Returns:
            The total 2-norm of the (unscaled, pre-clip) gradients, or None when neither
            clipping nor ``compute_norm`` asked for it.
        """
        norm = None
        if self.grad_clip > 0 or compute_norm:
            # fp16: the scaler's gradients are multiplied by the loss scale; unscale first so
            # the norm (and the clip) see the true gradient. The scaler's step then knows.
            self._scaler.unscale_(self.optimizer)
            params = self.parameters()
            if self.grad_clip > 0:
                norm = float(torch.nn.utils.clip_grad_norm_(params, self.grad_clip))
            else:
                norm = total_grad_norm(params)
        self._scaler.step(self.optimizer)
        self._scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    # ---- collectives (no-ops for a single process) ----------------------------------------
    def all_reduce(self, tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
        """Reduce ``tensor`` over ranks in place ('sum', 'mean', 'max', 'min'); returns it."""
        if not torch_dist.is_initialized() or self.world_size == 1:
            return tensor
        ops = {"sum": torch_dist.ReduceOp.SUM, "mean": torch_dist.ReduceOp.SUM,
               "max": torch_dist.ReduceOp.MAX, "min": torch_dist.ReduceOp.MIN}
        torch_dist.all_reduce(tensor, op=ops[op])
        if op == "mean":
            tensor /= self.world_size
        return tensor

    def reduce_scalars(self, values: list[float], op: str = "mean") -> list[float]:
        """All-reduce a few Python floats at once (one collective)."""
        t = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        return self.all_reduce(t, op).tolist()

    def barrier(self) -> None:
        """Wait for every rank."""
        if torch_dist.is_initialized() and self.world_size > 1:
            torch_dist.barrier()

    def _collective_device(self) -> torch.device:
        # nccl only reduces CUDA tensors; gloo only CPU ones.
        if torch_dist.is_initialized() and torch_dist.get_backend() == "nccl":
            return self.device
        return torch.device("cpu")

    # ---- state ----------------------------------------------------------------------------
    def unwrapped(self) -> nn.Module:
        """The user's module, without DDP/DeepSpeed wrappers."""
        return getattr(self.model, "module", self.model)

    def state_dict(self) -> dict[str, Any]:
        """Model, optimizer and grad-scaler state (rank-0 view; full, unsharded)."""
        return {"model": self.unwrapped().state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self._scaler.state_dict(),
                "extra": [m.state_dict() for m in self.extra_modules]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` captured."""
        self.unwrapped().load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._scaler.load_state_dict(state["scaler"])
        for module, sd in zip(self.extra_modules, state.get("extra", [])):
            module.load_state_dict(sd)
