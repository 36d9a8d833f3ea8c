"""Trial steps that leave no trace: back up a model's and optimizer's exact state, restore it.

``preserved`` is the one backup for every trial step taken on the real model (the micro-size
search of ``largebatch.tune.micro_batch``, the goodput policy's profile): weights, buffers,
gradients, optimizer state, train mode and the RNG streams come back bit for bit, so a run
continues exactly as if the trial had never happened.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from largebatch.io import rng_state, set_rng_state


def cpu_clone(obj: Any) -> Any:
    """A deep copy with every tensor cloned to the CPU (the backup must not take device memory)."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_clone(v) for v in obj)
    return obj


@contextlib.contextmanager
def preserved(model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Restore weights, buffers, gradients, optimizer state, train mode and RNG afterwards.

    ``load_state_dict`` copies into the existing tensors, so the optimizer keeps pointing at the
    same parameters and the values come back bit for bit (BatchNorm's running statistics too).
    The RNG streams are ``largebatch.io.rng_state``'s (torch CPU and CUDA, Python, NumPy).
    """
    weights = cpu_clone(model.state_dict())
    opt_state = cpu_clone(optimizer.state_dict())
    grads = [None if p.grad is None else p.grad.detach().to("cpu", copy=True)
             for p in model.parameters()]
    training = model.training
    rng = rng_state()
    try:
        yield
    finally:
        for p, g in zip(model.parameters(), grads):
            p.grad = None if g is None else g.to(p.device)
        model.load_state_dict(weights)
        optimizer.load_state_dict(opt_state)
        model.train(training)
        set_rng_state(rng)
