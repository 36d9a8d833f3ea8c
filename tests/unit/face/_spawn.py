"""Run a function on N real processes over gloo (TCP rendezvous on a free port, hard timeout).

A child's exception fails the parent with the child's traceback (torch.multiprocessing's
``ProcessRaisedException``); a hang is killed after ``timeout`` seconds instead of stalling the
suite.
"""
from __future__ import annotations

import os
import time
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import free_port


def _entry(rank: int, fn: Callable[..., None], world: int, port: int, args: tuple) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    try:
        fn(rank, world, *args)
        dist.barrier()  # nobody tears the group down while a peer still talks to it
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable[..., None], world: int, *args: Any, timeout: float = 120.0) -> None:
    """Call ``fn(rank, world, *args)`` on ``world`` gloo ranks and wait (at most ``timeout``)."""
    ctx = mp.start_processes(_entry, args=(fn, world, free_port(), args), nprocs=world,
                             start_method="spawn", join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.terminate()
            raise TimeoutError(f"{fn.__name__} on {world} ranks did not finish in {timeout} s")
