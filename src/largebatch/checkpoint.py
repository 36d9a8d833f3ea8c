"""Checkpoints: written atomically (temp file + rename), loaded with ``weights_only=True``."""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Callable

import torch

from largebatch.config import ConfigError


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Save ``state`` so that a reader never sees a half-written file, even on pre-emption."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(state, tmp)
    with open(tmp, "rb") as fh:  # make the bytes durable before the rename publishes them
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely: tensors and plain containers only (no pickled code)."""
    return torch.load(Path(path), map_location=map_location, weights_only=True)


def rng_state() -> dict[str, Any]:
    """This rank's RNG streams (dropout masks, anything random after start)."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore ``rng_state``."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Saves and restores a whole run: ``latest.pt`` (rank 0) + ``rng_rank{r}.pt`` per rank.

    Rank files are written first and ``latest.pt`` last, so a ``latest.pt`` on disk always has
    the rank files of its step next to it; each file is replaced atomically.

    Args:
        directory: where the files live.
        rank: this process's rank.
        world_size: ranks in the job (a resume must have the same; resharding is not done).
        barrier: waits for every rank (the engine's).
    """

    def __init__(self, directory: str | Path, rank: int, world_size: int,
                 barrier: Callable[[], None]) -> None:
        self.directory = Path(directory)
        self.rank, self.world_size, self.barrier = rank, world_size, barrier

    @property
    def latest(self) -> Path:
        """Path of the newest complete checkpoint."""
        return self.directory / "latest.pt"

    def __call__(self, trainer: Any) -> None:
        """Save ``trainer.state_dict()`` and this rank's RNG (every rank must call it)."""
        state = trainer.state_dict()  # every rank: gathering sharded state can be collective
        step = state["run"]["step"]
        save_checkpoint(self.directory / f"rng_rank{self.rank}.pt",
                        {"step": step, "rng": rng_state()})
        self.barrier()
        if self.rank == 0:
            save_checkpoint(self.latest, {"step": step, "world_size": self.world_size,
                                          "trainer": state})
        self.barrier()

    def resume(self, trainer: Any) -> bool:
        """Load the latest checkpoint into ``trainer`` if there is one; True when resumed."""
        if not self.latest.is_file():
            return False
        ckpt = load_checkpoint(self.latest)
        if ckpt["world_size"] != self.world_size:
            raise ConfigError(f"checkpoint {self.latest} was written by world_size "
                              f"{ckpt['world_size']}, this launch has {self.world_size}")
        rng = load_checkpoint(self.directory / f"rng_rank{self.rank}.pt")
        if rng["step"] != ckpt["step"]:
            raise ConfigError(f"checkpoint {self.directory}: rng_rank{self.rank}.pt is from step "
                              f"{rng['step']}, latest.pt from step {ckpt['step']}")
        trainer.load_state_dict(ckpt["trainer"])
        set_rng_state(rng["rng"])
        return True
