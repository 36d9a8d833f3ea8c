"""Sharded modules: parts of the model whose parameters differ per rank (a class-sharded
Partial FC head). Every engine places them and never wraps them: DDP does not all-reduce
them, ZeRO does not partition them; they do their own communication.

``ShardedModule`` is the interface such a module offers the engine (its defaults fit a plain
module whose gradient lives in its parameters' ``.grad``); ``ShardedParts`` is what an engine
keeps of them: the modules, their optimizers (stepped right after the replicated model's, at
the same boundary), their share of the global gradient norm, the fp16 loss scale taken off
their gradients (``unscale_``: the loss, theirs included, is scaled once), their per-rank
state.
"""
from __future__ import annotations

from abc import ABC
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn


class ShardedModule(ABC):
    """What an engine asks of a module that holds one rank's shard (mix into an nn.Module)."""

    def grad_sq_norm(self) -> torch.Tensor:
        """This shard's squared gradient norm (the engine sums it over ranks)."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]  # type: ignore
        if not grads:
            return torch.zeros(())
        return sum(torch.linalg.vector_norm(g.float()) ** 2 for g in grads)

    @torch.no_grad()
    def mul_grad_(self, factor: float) -> None:
        """Scale this shard's gradient in place (the clip coefficient)."""
        for p in self.parameters():  # type: ignore[attr-defined]
            if p.grad is not None:
                p.grad.mul_(factor)

    def unscale_grad_(self, inv_scale: torch.Tensor, found_inf: torch.Tensor) -> None:
        """Undo the fp16 loss scale on this shard's gradient; flag inf/NaN
        (``unscale_tensors_``)."""
        self.unscale_tensors_([p.grad for p in self.parameters()  # type: ignore[attr-defined]
                               if p.grad is not None], inv_scale, found_inf)

    @staticmethod
    def unscale_tensors_(grads: Sequence[torch.Tensor], inv_scale: torch.Tensor,
                         found_inf: torch.Tensor) -> None:
        """Multiply ``grads`` by ``inv_scale`` in place; set ``found_inf`` to 1 on any inf/NaN.

        torch's own kernel, the one ``GradScaler.unscale_`` runs on a model's gradients: a
        shard's gradients are unscaled bit for bit as the model's are. It takes one dtype per
        call, hence the grouping.

        Args:
            grads: gradients on ``found_inf``'s device.
            inv_scale: ``1 / loss scale``, a one-element fp32 tensor on that device.
            found_inf: a one-element fp32 tensor, set to 1.0 (never reset) on inf/NaN.
        """
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        for group in by_dtype.values():
            torch._amp_foreach_non_finite_check_and_unscale_(group, found_inf, inv_scale)

    def end_window(self) -> None:
        """Close an accumulation window that will not be stepped (a dropped update)."""

    def resharded_state(self, states: Sequence[dict[str, Any]], world_size: int,
                        rank: int) -> dict[str, Any]:
        """This rank's state dict at ``world_size`` from every old rank's state dict.

        Raises:
            ValueError: the module cannot be cut again for another world size.
        """
        raise ValueError(f"{type(self).__name__} cannot be resharded from {len(states)} to "
                         f"{world_size} ranks")


class ShardedParts:
    """The sharded modules of one engine and their optimizers."""

    def __init__(self) -> None:
        self.modules: list[nn.Module] = []
        self.optimizers: list[Optional[torch.optim.Optimizer]] = []

    def add(self, module: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> None:
        """Keep ``module`` (already placed on the device) and its optimizer (None: never
        stepped).

        Raises:
            TypeError: ``module`` does not implement ``ShardedModule``.
        """
        if not isinstance(module, ShardedModule):
            raise TypeError(f"{type(module).__name__} is not a ShardedModule: a per-rank module "
                            f"must say how its gradient norm, clip and state work")
        self.modules.append(module)
        self.optimizers.append(optimizer)

    def __bool__(self) -> bool:
        return bool(self.modules)

    def stepped_optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimizers the engine steps (the LR schedule drives them too)."""
        return [o for o in self.optimizers if o is not None]

    def local_sq_norm(self) -> float:
        """This rank's share of the squared gradient norm: its modules' (no collective)."""
        return sum(float(m.grad_sq_norm()) for m in self.modules)

    def sq_norm(self, reduce_sum: Callable[[list[float]], list[float]]) -> float:
        """Sum over ranks of the modules' squared gradient norms (a collective; 0.0 and no
        collective without modules)."""
        if not self.modules:
            return 0.0
        return reduce_sum([self.local_sq_norm()])[0]

    def unscale_(self, inv_scale: torch.Tensor, found_inf: torch.Tensor) -> None:
        """Undo the fp16 loss scale on every module's gradient; ``found_inf`` becomes 1.0 if
        this rank's shards hold an inf/NaN (no collective: the engine agrees on it)."""
        for m in self.modules:
            m.unscale_grad_(inv_scale, found_inf)

    def mul_grad_(self, factor: float) -> None:
        """Clip every module's gradient by ``factor``."""
        for m in self.modules:
            m.mul_grad_(factor)

    def step(self) -> None:
        """Step and zero the modules' own optimizers (after the model's step)."""
        for opt in self.stepped_optimizers():
            opt.step()
            opt.zero_grad(set_to_none=True)

    def drop_window(self) -> None:
        """Drop the window's gradients without a step; close the modules' open windows."""
        for module, opt in zip(self.modules, self.optimizers):
            if opt is not None:
                opt.zero_grad(set_to_none=True)
            module.end_window()

    # ---- state --------------------------------------------------------------------------------
    def state_dict(self, rank: int, world_size: int) -> dict[str, Any]:
        """This rank's module states with the layout they were written on."""
        return {"rank": rank, "world_size": world_size,
                "sharded": [m.state_dict() for m in self.modules]}

    def load_state_dict(self, state: Optional[dict[str, Any]], rank: int,
                        world_size: int) -> None:
        """Restore ``state_dict`` of this rank (same world size and rank).

        Raises:
            ValueError: no state for existing modules, or another rank's layout.
        """
        if state is None or not state.get("sharded"):
            if self.modules:
                raise ValueError("the checkpoint holds no per-rank state of the sharded "
                                 "modules (written before they existed?)")
            return
        if (state["world_size"], state["rank"]) != (world_size, rank):
            raise ValueError(f"sharded state of rank {state['rank']} of {state['world_size']} "
                             f"cannot load on rank {rank} of {world_size}")
        for module, sd in zip(self.modules, state["sharded"], strict=True):
            module.load_state_dict(sd)

    def load_resharded(self, states: Sequence[Optional[dict[str, Any]]], rank: int,
                       world_size: int) -> None:
        """Restore from EVERY old rank's ``state_dict`` (another world size): each module's
        shards are cut again for this rank by the module itself."""
        if not self.modules:
            return
        if any(s is None for s in states):
            raise ValueError("the checkpoint lacks some rank's sharded module state")
        for i, module in enumerate(self.modules):
            module.load_state_dict(module.resharded_state([s["sharded"][i] for s in states],
                                                          world_size, rank))
