"""The one small interface the trainer talks to (in the spirit of Lightning Fabric's Strategy).

The training loop never asks which engine it has. A capability an engine lacks is an explicit
no-op here (a single process has nothing to all-reduce; DeepSpeed owns its accumulation
boundary), never a branch in the loop.
"""
from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from typing import Any, Iterator, Optional

import torch
import torch.distributed as torch_dist
from torch import nn

from largebatch.config import ConfigError
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
        self.extra_modules: list[nn.Module] = []  # sharded: placed, never wrapped
        self.extra_optimizers: list[Optional[torch.optim.Optimizer]] = []
        self._scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.last_step_skipped = False  # the fp16 scaler dropped the last step (inf grads)

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

    def setup_sharded(self, module: nn.Module,
                      optimizer: Optional[torch.optim.Optimizer] = None) -> nn.Module:
        """Place a module the engine must NOT wrap (e.g. a class-sharded Partial FC head).

        Its parameters differ per rank: they are never all-reduced by DDP nor partitioned by
        ZeRO (the module owns its cross-rank communication), and ``optimizer`` (its own, e.g.
        ``PartialFCSGD``) is stepped right after the replicated model's, at the same boundary.
        Clipping and the logged norm use the true global norm: the replicated model's
        (averaged) squared norm plus the all-reduced sum of the modules' ``grad_sq_norm()``.
        Its state is saved per rank (``state_dict()['per_rank']``).

        Raises:
            ConfigError: with fp16 (the grad scaler cannot unscale a module's own gradients).
        """
        if self._scaler.is_enabled():
            raise ConfigError("train.precision=fp16 is not supported with a sharded module "
                              "(e.g. the Partial FC head); use bf16 or fp32")
        module = module.to(self.device)
        self.extra_modules.append(module)
        self.extra_optimizers.append(optimizer)
        return module

    def setup_module(self, module: nn.Module) -> nn.Module:
        """``setup_sharded(module)`` without an optimizer: placed, never wrapped nor stepped."""
        return self.setup_sharded(module, None)

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """Every optimizer stepped at the boundary (the model's, then the sharded modules');
        the LR schedule drives all of them."""
        return [self.optimizer, *(o for o in self.extra_optimizers if o is not None)]

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
        """The replicated model's trainable parameters (the sharded modules' are their own)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def describe(self) -> str:
        """How messages name this engine (e.g. ``ddp``; DeepSpeed adds its ZeRO stage)."""
        return self.name

    # ---- gradients before their reduction (the noise-scale estimate) ----------------------
    def start_grad_probe(self) -> str:
        """How ``largebatch.noise.scale`` can see this rank's gradient before any reduction;
        called once, before the first backward. 'comm_hook': a hook squares each rank's window
        gradient as it is reduced (``pop_local_grad_sq_norm``); 'micro': one process, where
        ``.grad`` holds every micro-batch's contribution; '' (default): not at all."""
        return ""

    def pop_local_grad_sq_norm(self) -> Optional[torch.Tensor]:
        """This rank's pre-reduction squared gradient norm since the last call ('comm_hook'
        engines; still loss-scaled under fp16), or None."""
        return None

    def loss_scale(self) -> float:
        """The fp16 grad scaler's current scale (1.0 without fp16): gradients carry it."""
        return float(self._scaler.get_scale()) if self._scaler.is_enabled() else 1.0

    def sharded_sq_norm(self) -> float:
        """Sum over ranks of the sharded modules' squared gradient norms (a collective; 0.0
        without sharded modules, no collective then)."""
        if not self.extra_modules:
            return 0.0
        local = sum(float(m.grad_sq_norm()) for m in self.extra_modules
                    if hasattr(m, "grad_sq_norm"))
        return self.reduce_scalars([local], op="sum")[0]

    def _step_sharded(self) -> None:
        """Step and zero the sharded modules' own optimizers (after the model's step)."""
        for opt in self.extra_optimizers:
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)

    def zero_grad(self) -> None:
        """Drop every gradient of the window without stepping (a skipped, non-finite step):
        the model's and the sharded modules' (whose open window is closed too)."""
        self.optimizer.zero_grad(set_to_none=True)
        for module, opt in zip(self.extra_modules, self.extra_optimizers):
            if opt is not None:
                opt.zero_grad(set_to_none=True)
            if hasattr(module, "end_window"):
                module.end_window()

    def _global_norm_and_clip(self, params: list[nn.Parameter]) -> float:
        """True global norm over the replicated and the sharded parameters; clip both by one
        coefficient (torch's ``clip_grad_norm_`` formula) when ``grad_clip`` is set."""
        norm = math.sqrt(total_grad_norm(params) ** 2 + self.sharded_sq_norm())
        if self.grad_clip > 0:
            coef = min(1.0, self.grad_clip / (norm + 1e-6))
            if coef < 1.0:
                with torch.no_grad():
                    for p in params:
                        if p.grad is not None:
                            p.grad.mul_(coef)
                for m in self.extra_modules:
                    if hasattr(m, "mul_grad_"):
                        m.mul_grad_(coef)
        return norm

    def step(self, compute_norm: bool = False) -> Optional[float]:
        """Clip (if asked), step the optimizers, zero the gradients.

        Called after the window's last backward, when DDP has averaged the gradients: the
        norm is that of the global gradient, the same on every rank, including the sharded
        modules' (their shard norms are all-reduced; see ``setup_sharded``).

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
            if self.extra_modules:
                norm = self._global_norm_and_clip(params)
            elif self.grad_clip > 0:
                norm = float(torch.nn.utils.clip_grad_norm_(params, self.grad_clip))
            else:
                norm = total_grad_norm(params)
        scale = self._scaler.get_scale() if self._scaler.is_enabled() else None
        self._scaler.step(self.optimizer)
        self._scaler.update()
        # fp16: the scaler skipped optimizer.step() (inf/NaN gradients) iff it lowered the
        # scale; the trainer then neither steps the schedule nor counts the step.
        self.last_step_skipped = scale is not None and self._scaler.get_scale() < scale
        self._step_sharded()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def grads_finite(self) -> bool:
        """Whether this rank's gradients are all finite (one max-abs per tensor, one sync).

        fp16 is left to the grad scaler: its scaled gradients overflow by design and it
        skips that update itself. Gradients an engine keeps out of ``.grad`` (ZeRO-2/3
        partitions) are not seen; the loss check still applies there.
        """
        if self.precision == "fp16":
            return True
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:
            return True
        # inf-norm = max |g|: inf only for an inf element, NaN propagates; no overflow.
        peaks = torch._foreach_norm(grads, float("inf"))
        return bool(torch.isfinite(torch.stack(peaks)).all())

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
        """Model, optimizer and grad-scaler state (rank-0 view; full, unsharded), and under
        ``per_rank`` this rank's sharded modules (the checkpointer writes it to each rank's
        own file; it holds their optimizers' rows, see ``PartialFC.get_extra_state``)."""
        return {"model": self.unwrapped().state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self._scaler.state_dict(),
                "per_rank": self.sharded_state_dict()}

    def sharded_state_dict(self) -> dict[str, Any]:
        """This rank's sharded modules' state dicts, with the layout they were written on."""
        return {"rank": self.rank, "world_size": self.world_size,
                "sharded": [m.state_dict() for m in self.extra_modules]}

    def load_sharded_state_dict(self, state: Optional[dict[str, Any]]) -> None:
        """Restore ``sharded_state_dict`` of this rank (same world size and rank)."""
        if state is None:
            if self.extra_modules:
                raise ValueError("the checkpoint holds no per-rank state of the sharded "
                                 "modules (written before they existed?)")
            return
        if not self.extra_modules and not state["sharded"]:
            return  # nothing sharded: the layout does not matter
        if (state["world_size"], state["rank"]) != (self.world_size, self.rank):
            raise ValueError(f"sharded state of rank {state['rank']} of {state['world_size']} "
                             f"cannot load on rank {self.rank} of {self.world_size}: use "
                             f"load_resharded(every old rank's state)")
        for module, sd in zip(self.extra_modules, state["sharded"], strict=True):
            module.load_state_dict(sd)

    def load_resharded(self, states: list[dict[str, Any]]) -> None:
        """Restore the sharded modules from EVERY old rank's ``sharded_state_dict`` (any world
        size): each module's shards are cut again for this rank (``largebatch.face.reshard``)."""
        from largebatch.face import reshard
        for i, module in enumerate(self.extra_modules):
            module.load_state_dict(reshard([s["sharded"][i] for s in states],
                                           self.world_size, self.rank))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` captured (``per_rank``: this rank's own entry; or
        ``per_rank_all``: every old rank's entry, written at another world size)."""
        self.unwrapped().load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._scaler.load_state_dict(state["scaler"])
        if state.get("per_rank_all") is not None:
            self.load_resharded(state["per_rank_all"])
        else:
            self.load_sharded_state_dict(state.get("per_rank"))
