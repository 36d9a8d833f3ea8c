"""Shared fixtures: the real MNIST (skipped cleanly without it) and process helpers."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def _data_root() -> Path | None:
    root = os.environ.get("LARGEBATCH_DATA_ROOT")
    candidates = [Path(root)] if root else [REPO.parent / "shared" / "data"]
    for c in candidates:
        if (c / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
            return c.resolve()
    return None


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """The real MNIST root (torchvision layout); skips the test when it is absent."""
    root = _data_root()
    if root is None:
        pytest.skip("real MNIST not found: set LARGEBATCH_DATA_ROOT to a folder with MNIST/raw")
    return root


def free_port() -> int:
    """A free TCP port on loopback for a rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for subprocesses: one thread per process (2 shared cores), no wandb network."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def run_cli(*args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m largebatch ARGS`` as a real process."""
    return subprocess.run([sys.executable, "-m", "largebatch", *args], capture_output=True,
                          text=True, timeout=timeout, env=env or cli_env(), cwd=REPO)


def run_torchrun(nproc: int, *args: str, timeout: int = 300,
                 env: dict | None = None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node N -m largebatch ARGS`` as real processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "largebatch", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=env or cli_env(), cwd=REPO)
