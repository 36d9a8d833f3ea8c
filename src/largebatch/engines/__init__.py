"""Engines: the trainer talks only to ``Engine``; ``build_engine`` picks one from the config."""
from __future__ import annotations

from typing import Optional

import torch

from largebatch.config import Config, ConfigError
from largebatch.dist import DistEnv
from largebatch.engines.base import Engine
from largebatch.plan import BatchPlan


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
    """Instantiate the configured engine (DeepSpeed is imported only when asked for).

    Args:
        cfg: the run configuration.
        denv: where this process sits in the job.
        device: the device this rank trains on.
        plan: the run's batch plan; required by DeepSpeed (its batch fields come from it),
            unused by the single and DDP engines.
    """
    name = resolve_engine_name(cfg.engine.name, denv)
    kwargs = dict(precision=cfg.train.precision, grad_clip=cfg.optim.grad_clip)
    if name == "single":
        from largebatch.engines.single import SingleEngine
        return SingleEngine(denv, device, **kwargs)
    if name == "ddp":
        from largebatch.engines.ddp import DDPEngine
        return DDPEngine(denv, device, **kwargs)
    if name == "deepspeed":
        if plan is None:
            raise ValueError("engine.name=deepspeed needs the run's batch plan (build_engine's "
                             "plan argument)")
        from largebatch.engines.deepspeed.engine import DeepSpeedEngine
        return DeepSpeedEngine(denv, device, cfg=cfg, plan=plan, **kwargs)
    raise ConfigError(f"engine.name={name!r} is not one of auto|single|ddp|deepspeed")


__all__ = ["Engine", "build_engine", "resolve_engine_name"]
