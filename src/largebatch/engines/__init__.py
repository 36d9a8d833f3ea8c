"""Engines: the trainer talks only to ``Engine``; ``build_engine`` picks one from the config.

The engines register their ``engine.name`` here with the facts other packages may ask about a
name without importing it (the config's checks):

* ``fixes_batch``: the batch fields are fixed when the engine starts (no ``micro_size=auto``,
  no ``batch.adapt``);
* ``partitions_tensors``: with ``engine.zero_stage >= 1`` the optimizer sees flat partitions,
  not whole parameter tensors (no per-tensor trust ratio: LARS, LAMB);
* ``needs_plan``: the constructor takes the batch plan (DeepSpeed's batch fields).
"""
from __future__ import annotations

from typing import Optional

import torch

from largebatch.config import Config, ConfigError
from largebatch.dist import DistEnv
from largebatch.engines.base import Engine
from largebatch.plan import BatchPlan
from largebatch.registry import ENGINES

ENGINES.register("single", "largebatch.engines.single:SingleEngine")
ENGINES.register("ddp", "largebatch.engines.ddp:DDPEngine")
ENGINES.register("deepspeed", "largebatch.engines.deepspeed.engine:DeepSpeedEngine",
                 fixes_batch=True, partitions_tensors=True, needs_plan=True)


def resolve_engine_name(name: str, denv: DistEnv) -> str:
    """'auto' means ddp for a multi-rank launch and single otherwise."""
    if name == "auto":
        return "ddp" if denv.is_distributed else "single"
    if name == "single" and denv.is_distributed:
        raise ConfigError(f"engine.name=single but the launch has world_size {denv.world_size}; "
                          f"use engine.name=ddp (or auto)")
    return name


def build_engine(cfg: Config, denv: DistEnv, device: torch.device,
                 plan: Optional[BatchPlan] = None) -> Engine:
    """Instantiate the configured engine (its module is imported only when asked for).

    Args:
        cfg: the run configuration.
        denv: where this process sits in the job.
        device: the device this rank trains on.
        plan: the run's batch plan; required by engines that take it (``needs_plan``).
    """
    name = resolve_engine_name(cfg.engine.name, denv)
    factory = ENGINES.get(name)
    kwargs = dict(precision=cfg.train.precision, grad_clip=cfg.optim.grad_clip)
    if ENGINES.trait(name, "needs_plan", False):
        if plan is None:
            raise ValueError(f"engine.name={name} needs the run's batch plan (build_engine's "
                             f"plan argument)")
        return factory(denv, device, cfg=cfg, plan=plan, **kwargs)
    return factory(denv, device, **kwargs)


__all__ = ["Engine", "build_engine", "resolve_engine_name"]
