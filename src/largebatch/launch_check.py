"""Catch a launch that started another number of processes than the launcher was asked for.

The known trap is accelerate's: ``accelerate launch --cpu --num_processes 2`` runs its *simple*
launcher, which starts ONE process and sets no RANK/WORLD_SIZE. It does not export the requested
count either; what gives it away is that the simple launcher exports MASTER_ADDR/MASTER_PORT only
when asked for more than one process (``num_processes > 1`` or ``num_machines > 1``), next to
its own ACCELERATE_* variables (accelerate 1.x, ``utils/launch.py``,
``prepare_simple_launcher_cmd_env``). Left alone, that single process would silently train with
world size 1 and a different batch plan than the user asked for.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional

from largebatch.config import ConfigError
from largebatch.dist import DistEnv

# Set by every `accelerate launch` (any launcher path), never by torchrun, deepspeed or srun.
ACCELERATE_MARKERS = ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_DYNAMO_BACKEND")

ACCELERATE_WORKING_FORM = ("ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N "
                           "-m largebatch train CONFIG ...")


def launched_by_accelerate(env: Mapping[str, str]) -> bool:
    """True when this process was started by ``accelerate launch``."""
    return any(key in env for key in ACCELERATE_MARKERS)


def check_launch(denv: DistEnv, env: Optional[Mapping[str, str]] = None) -> None:
    """Stop when the launcher asked for several processes but this one runs alone.

    Args:
        denv: the launch as ``largebatch.dist.detect_launch`` read it.
        env: the environment (default ``os.environ``).

    Raises:
        ConfigError: accelerate's single-process launcher was asked for several processes, or
            WORLD_SIZE > 1 is set without RANK (a launcher that numbers no ranks).
    """
    env = os.environ if env is None else env
    if denv.launcher != "none":
        return  # torchrun/deepspeed/srun numbered the ranks: the world size is theirs.
    if launched_by_accelerate(env) and "MASTER_ADDR" in env and "MASTER_PORT" in env:
        raise ConfigError(
            "accelerate launch started 1 process but was asked for several (--cpu and other "
            "single-process launches ignore --num_processes); use "
            f"{ACCELERATE_WORKING_FORM} (or unset MASTER_ADDR/MASTER_PORT for a 1-process run)")
    world = env.get("WORLD_SIZE", "")
    if world.isdigit() and int(world) > 1:
        raise ConfigError(f"WORLD_SIZE={world} is set but RANK is not: this process cannot know "
                          f"its rank; launch with torchrun, deepspeed or srun")
