"""The one small interface the trainer talks to (in the spirit of Lightning Fabric's Strategy).

The training loop never asks which engine it has. ``Engine`` holds what the loop needs: wrap
the model, run forward under autocast, backward, accumulate with one reduction per window,
step or drop the window, reduce a few numbers, save and restore. A capability an engine lacks
is an explicit no-op here (a single process has nothing to all-reduce; DeepSpeed owns its
accumulation boundary) or an explicit interface (``GradientProbe``: seeing a rank's gradient
before its reduction), never a branch in the loop or an attribute probe.

State comes in two halves, as a checkpoint set stores it: ``state_dict`` is what every rank
holds alike (rank 0 writes it: weights, replicated optimizer state), ``rank_state_dict`` is
this rank's own (sharded modules, ZeRO partitions). A set of another world size loads through
``load_resharded`` with every old rank's half.
"""
from __future__ import annotations

import contextlib
import copy
from abc import ABC, abstractmethod
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.distributed as torch_dist
from torch import nn

from largebatch.dist import DistEnv
from largebatch.engines.sharded import ShardedParts

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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
        self.denv, self.device = denv, device
        self.precision, self.grad_clip = precision, grad_clip
        self.model: Optional[nn.Module] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.sharded = ShardedParts()  # per-rank modules: placed, never wrapped

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

    def describe(self) -> str:
        """How messages name this engine (e.g. ``ddp``; DeepSpeed adds its ZeRO stage)."""
        return self.name

    # ---- set-up ---------------------------------------------------------------------------
    @abstractmethod
    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        """Place and wrap ``model``, adopt ``optimizer``; returns the module to call."""

    def setup_sharded(self, module: nn.Module,
                      optimizer: Optional[torch.optim.Optimizer] = None) -> nn.Module:
        """Place a ``ShardedModule`` the engine must NOT wrap (a class-sharded head).

        Its parameters differ per rank: never all-reduced by DDP nor partitioned by ZeRO (the
        module owns its communication); ``optimizer`` (its own) is stepped right after the
        replicated model's, at the same boundary. Clipping and the logged norm use the true
        global norm (the replicated model's plus the sum over ranks of the shards').
        """
        module = module.to(self.device)
        self.sharded.add(module, optimizer)
        return module

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """Every optimizer stepped at the boundary (the model's, then the sharded modules');
        the LR schedule drives all of them."""
        return [self.optimizer, *self.sharded.stepped_optimizers()]

    def optimizer_hparams(self) -> list[list[dict[str, Any]]]:
        """Each optimizer's param-group hyper-parameters (``optimizers`` order; every entry of
        a group but its parameters and its LR, which the schedule owns): momentum, weight
        decay, betas, ... as the run's config built them."""
        return [[{k: copy.deepcopy(v) for k, v in group.items() if k not in ("params", "lr")}
                 for group in optimizer.param_groups] for optimizer in self.optimizers]

    def set_optimizer_hparams(self, hparams: list[list[dict[str, Any]]]) -> None:
        """Write ``optimizer_hparams()``'s values into every optimizer's param groups (a
        branch from another run's set keeps its state but takes this run's momentum, weight
        decay, ...); the LR stays the schedule's.

        Raises:
            ValueError: another number of optimizers or param groups than this engine's.
        """
        optimizers = self.optimizers
        layout = [len(o.param_groups) for o in optimizers]
        if [len(groups) for groups in hparams] != layout:
            raise ValueError(f"param groups per optimizer {[len(g) for g in hparams]}, this "
                             f"engine has {layout}")
        for optimizer, groups in zip(optimizers, hparams):
            for group, values in zip(optimizer.param_groups, groups):
                group.update({k: copy.deepcopy(v) for k, v in values.items()
                              if k not in ("params", "lr")})

    def parameters(self) -> list[nn.Parameter]:
        """The replicated model's trainable parameters (the sharded modules' are their own)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def unwrapped(self) -> nn.Module:
        """The user's module, without DDP/DeepSpeed wrappers."""
        return getattr(self.model, "module", self.model)

    # ---- the step -------------------------------------------------------------------------
    @contextlib.contextmanager
    def accumulate(self, is_boundary: bool) -> Iterator[None]:
        """Context for one micro-batch; gradients sync only when ``is_boundary`` (default:
        nothing to sync)."""
        yield

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed-precision context for the forward pass (a no-op at fp32)."""
        dtype = DTYPES[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate an already-weighted micro-batch loss."""

    @abstractmethod
    def grads_finite(self) -> bool:
        """Whether this rank's share of the window's gradients is finite (no collective)."""

    @abstractmethod
    def step(self, compute_norm: bool = False) -> tuple[Optional[float], bool]:
        """Clip (if asked), step every optimizer, zero the gradients; after the window's last
        backward, when the gradients are the global ones.

        Args:
            compute_norm: measure the gradient norm even when not clipping (``log.grad_norm``).

        Returns:
            The global gradient norm (unscaled, before clipping; None when neither clipping
            nor ``compute_norm`` asked for it), and whether the update was applied (False:
            the fp16 loss scaler skipped it for inf/NaN gradients).
        """

    @abstractmethod
    def zero_grad(self) -> None:
        """Drop every gradient of the window without stepping (a dropped, non-finite window):
        the model's and the sharded modules' (whose open window is closed too)."""

    # ---- collectives (no-ops for a single process) ----------------------------------------
    def reduce_scalars(self, values: list[float], op: str = "mean") -> list[float]:
        """All-reduce a few Python floats at once (one collective): 'sum', 'mean', 'max',
        'min'."""
        if not torch_dist.is_initialized() or self.world_size == 1:
            return [float(v) for v in values]
        ops = {"sum": torch_dist.ReduceOp.SUM, "mean": torch_dist.ReduceOp.SUM,
               "max": torch_dist.ReduceOp.MAX, "min": torch_dist.ReduceOp.MIN}
        # nccl only reduces CUDA tensors, gloo only CPU ones.
        device = self.device if torch_dist.get_backend() == "nccl" else torch.device("cpu")
        t = torch.tensor(values, dtype=torch.float64, device=device)
        torch_dist.all_reduce(t, op=ops[op])
        if op == "mean":
            t /= self.world_size
        return t.tolist()

    def barrier(self) -> None:
        """Wait for every rank."""
        if torch_dist.is_initialized() and self.world_size > 1:
            torch_dist.barrier()

    # ---- state ----------------------------------------------------------------------------
    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """What every rank holds alike (rank 0's file): weights, replicated optimizer state.
        May be a collective (ZeRO 3 gathers the weights): every rank calls it."""

    def rank_state_dict(self) -> dict[str, Any]:
        """This rank's own state (its file): the sharded modules with their layout."""
        return self.sharded.state_dict(self.rank, self.world_size)

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any], rank_state: Optional[dict[str, Any]]
                        ) -> None:
        """Restore ``state_dict`` and this rank's ``rank_state_dict`` (same world size)."""

    @abstractmethod
    def load_resharded(self, state: dict[str, Any],
                       rank_states: Sequence[Optional[dict[str, Any]]]) -> None:
        """Restore a set written at another world size from its ``state_dict`` and EVERY old
        rank's ``rank_state_dict`` (sharded modules are cut again for this layout).

        Raises:
            ConfigError: state that cannot move to another world size.
        """


class GradientProbe(ABC):
    """An engine that can show the live noise scale this rank's gradient before any reduction
    (``largebatch.noise.scale``)."""

    @abstractmethod
    def start_grad_probe(self) -> str:
        """Called once before the first backward. 'comm_hook': a hook squares each rank's
        window gradient as it is reduced (``pop_local_grad_sq_norm``); 'micro': one process,
        where ``.grad`` holds every micro-batch's contribution."""

    def pop_local_grad_sq_norm(self) -> Optional[torch.Tensor]:
        """This rank's pre-reduction squared gradient norm since the last call ('comm_hook';
        still loss-scaled under fp16), or None."""
        return None

    @abstractmethod
    def loss_scale(self) -> float:
        """The fp16 loss scale the gradients carry (1.0 without fp16)."""
