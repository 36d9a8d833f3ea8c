"""Launch detection (torchrun, SLURM, none), launch checks, process-group set-up, per-rank seeding.

torchrun's variables win over SLURM's: under ``srun torchrun`` the agent, not SLURM, numbers
the ranks. With neither, the process is a single rank and no process group is created (the
embedded default, as on a laptop or in a notebook).
"""
from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, Optional

import torch
import torch.distributed as torch_dist

from largebatch.config import ConfigError


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    launcher: str  # "torchrun" | "slurm" | "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def is_distributed(self) -> bool:
        """True when a process group is needed (more than one rank)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 prints, logs and writes files."""
        return self.rank == 0


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM host list ("node[01-03,7],gpu5") without needing ``scontrol``."""
    hosts: list[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        match = re.fullmatch(r"(.*?)\[([^\]]*)\](.*)", part)
        if not match:
            hosts.append(part)
            continue
        prefix, ranges, suffix = match.groups()
        for rng in ranges.split(","):
            lo, _, hi = rng.partition("-")
            hi = hi or lo
            for i in range(int(lo), int(hi) + 1):
                hosts.append(f"{prefix}{str(i).zfill(len(lo))}{suffix}")
    return hosts


def first_slurm_host(nodelist: str) -> str:
    """First host of SLURM_JOB_NODELIST: ``scontrol show hostnames`` if present, else parsed."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                                 capture_output=True, text=True, timeout=10).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass
    return expand_nodelist(nodelist)[0]


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ConfigError(f"environment variable {key}={env[key]!r} is not an integer") from None


def detect_launch(env: Optional[Mapping[str, str]] = None) -> DistEnv:
    """Read the launcher's environment: torchrun first, then SLURM, else a single process."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv("torchrun", rank=_int(env, "RANK"), world_size=_int(env, "WORLD_SIZE"),
                       local_rank=_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
                       master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                       master_port=int(env.get("MASTER_PORT", "29500")))
    # Only srun sets SLURM_STEP_NUM_TASKS: a batch script running the trainer directly (no srun)
    # is one process even when the allocation has several tasks.
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1"))
        job_id = int(env.get("SLURM_JOB_ID", "0"))
        port = int(env.get("MASTER_PORT", str(15000 + job_id % 20000)))
        return DistEnv("slurm", rank=_int(env, "SLURM_PROCID"), world_size=_int(env, "SLURM_STEP_NUM_TASKS"),
                       local_rank=_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
                       master_addr=env.get("MASTER_ADDR") or first_slurm_host(nodelist),
                       master_port=port)
    return DistEnv("none")


def pick_device(requested: str, local_rank: int) -> torch.device:
    """``cuda:<local_rank>`` when CUDA is asked for or available, else CPU."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("train.device='cuda' but no CUDA device is available")
    index = local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def init_process_group(denv: DistEnv, device: torch.device, backend: str = "auto") -> None:
    """Create the default process group for any launched job (torchrun/srun), even of one rank.

    A one-rank launch still gets a group so that ``engine.name=ddp`` works at world 1 (DDP
    needs one); only an unlaunched process (the embedded default) runs without.
    """
    if denv.launcher == "none" or torch_dist.is_initialized():
        return
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {}
    if denv.launcher == "slurm":
        # SLURM sets no MASTER_* for us; torch's env:// rendezvous reads them.
        os.environ.setdefault("MASTER_ADDR", denv.master_addr)
        os.environ.setdefault("MASTER_PORT", str(denv.master_port))
        kwargs = dict(rank=denv.rank, world_size=denv.world_size)
    if device.type == "cuda":
        kwargs["device_id"] = device
    timeout = timedelta(minutes=10)
    store = _restart_scoped_agent_store(timeout)
    if store is not None:
        kwargs.update(store=store, rank=denv.rank, world_size=denv.world_size)
    torch_dist.init_process_group(backend=backend, timeout=timeout, **kwargs)


def _restart_scoped_agent_store(timeout: timedelta) -> Optional[torch_dist.Store]:
    """torchrun's shared rendezvous store, with this restart's keys kept apart from the last's.

    Since torch 2.5 torchrun's agent hands its rendezvous TCPStore to the workers
    (``TORCHELASTIC_USE_AGENT_STORE=True``) and every restart round reuses it without a key
    prefix. After ``--max-restarts`` restarts the group, a worker can read the previous
    round's gloo/NCCL addresses and fail with "Connection refused" (pytorch#135712,
    #167288; seen here 1 run in 3). Prefixing our group's keys with the restart count,
    which every agent of a group restarted together shares, keeps the rounds apart.
    Where nodes can be replaced (a new agent starts at restart 0), launch with
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: every round then gets a fresh store and this
    returns None.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    shared = torch_dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                 is_master=False, timeout=timeout)
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return torch_dist.PrefixStore(f"largebatch/restart_{restart}/", shared)


def destroy_process_group() -> None:
    """Tear the process group down if one exists."""
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Seed Python and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int) -> int:
    """A per-rank seed for rank-local randomness (dropout masks): one stream per (seed, rank).

    ``seed + 1000 * rank`` made seed 1 on rank 1 the same stream as seed 1001 on rank 0. The
    pair is written as the text ``"seed:rank"`` (one text per pair, negative seeds included)
    and hashed (BLAKE2b, 63 bits kept), which gives a well-mixed seed, the same on every
    machine; two pairs share a seed with probability 2**-63.
    Not numpy's ``SeedSequence([seed, rank])``: it splits ints into 32-bit words and pads with
    zeros, so ``[2**32 + 5, 0]`` and ``[5, 1]`` give the same stream.

    Args:
        seed: the run's seed (``train.seed``).
        rank: the global rank.

    Returns:
        A non-negative integer below 2**63 for ``torch.manual_seed``.
    """
    digest = hashlib.blake2b(f"{seed}:{rank}".encode(), digest_size=8,
                             person=b"largebatch-rank").digest()
    return int.from_bytes(digest, "little") >> 1


# ---- a launch that started another number of processes than asked for -------------------
# Catch a launch that started another number of processes than the launcher was asked for.
#
# The known trap is accelerate's: ``accelerate launch --cpu --num_processes 2`` runs its *simple*
# launcher, which starts ONE process and sets no RANK/WORLD_SIZE. It does not export the requested
# count either; what gives it away is that the simple launcher exports MASTER_ADDR/MASTER_PORT only
# when asked for more than one process (``num_processes > 1`` or ``num_machines > 1``), next to
# its own ACCELERATE_* variables (accelerate 1.x, ``utils/launch.py``,
# ``prepare_simple_launcher_cmd_env``). Left alone, that single process would silently train with
# world size 1 and a different batch plan than the user asked for.

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
