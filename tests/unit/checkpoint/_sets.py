"""Real checkpoint sets of stand-in parts, for the metadata fuzzing and the fallback tests.

A ``Checkpointer`` writes them exactly as a run does; the parts are strict like a run's: an
``nn.Linear`` (its ``load_state_dict`` refuses missing keys and other shapes), a counter that
checks its types, and a per-rank shard with a replicated and a per-rank half.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from largebatch.checkpoint import Checkpointer, save_checkpoint

#: The config every set's manifest carries and every reading checkpointer runs with.
CONFIG = {"optim": {"lr": 0.1, "momentum": 0.9}, "train": {"epochs": 1.0, "max_steps": 0}}


class Counter:
    """A replicated part: one integer, checked when loaded."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"step"} or type(state["step"]) is not int:
            raise ValueError(f"counter state {sorted(state)} is not {{'step': int}}")
        self.step = state["step"]


class Shard:
    """A per-rank part: a replicated count and this rank's own 4-vector."""

    def __init__(self, rank: int) -> None:
        self.rank, self.n, self.w = rank, 0, torch.zeros(4)

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n}

    def rank_state_dict(self) -> dict[str, Any]:
        return {"w": self.w.clone(), "rank": self.rank}

    def load_state_dict(self, state: dict[str, Any], rank_state: Optional[dict[str, Any]]
                        ) -> None:
        w = (rank_state or {}).get("w")
        if type(state.get("n")) is not int or not isinstance(w, torch.Tensor) or \
                w.shape != (4,):
            raise ValueError("shard state is not {'n': int} + {'w': 4-vector}")
        self.n, self.w = state["n"], w.clone()


class Parts:
    """One rank's parts, set to a step's values (``at``) and compared (``step_of``)."""

    def __init__(self, rank: int = 0) -> None:
        self.model, self.counter, self.shard = nn.Linear(3, 2), Counter(), Shard(rank)

    def at(self, step: int) -> "Parts":
        with torch.no_grad():
            self.model.weight.fill_(step)
            self.model.bias.fill_(-step)
        self.counter.step = self.shard.n = step
        self.shard.w = torch.full((4,), float(step * 10 + self.shard.rank))
        return self

    def step_of(self) -> int:
        """The step every part was restored to (asserting they agree)."""
        step = self.counter.step
        assert self.shard.n == step and bool((self.model.weight == step).all())
        assert bool((self.shard.w == step * 10 + self.shard.rank).all())
        return step

    def register(self, ck: Checkpointer) -> Checkpointer:
        ck.register("model", self.model)
        ck.register("counter", self.counter)
        ck.register_per_rank("shard", self.shard)
        return ck


def checkpointer(directory: Path, rank: int = 0, world: int = 1,
                 barrier: Callable[[], None] = lambda: None,
                 agree: Optional[Callable[[list[float]], list[float]]] = None) -> Checkpointer:
    return Checkpointer(directory, rank, world, barrier, agree=agree, keep=3, config=CONFIG,
                        verbose=False)


def write_sets(directory: Path, steps: int = 2, done: bool = False, rank: int = 0,
               world: int = 1, **kw: Any) -> None:
    """Sets of steps 1..``steps`` (and with ``done`` the done marker naming the last)."""
    parts = Parts(rank)
    ck = parts.register(checkpointer(directory, rank, world, **kw))
    facts = {"epoch": 0, "consumed": 0, "plan": {"global_size": 8}}
    for step in range(1, steps + 1):
        parts.at(step)
        ck.save(step, {**facts, "consumed": step})
    if done:
        ck.mark_done(steps, facts, {"stop_reason": "max_steps", "steps": steps})


def write_run(run: Path, done: bool) -> None:
    """A run folder: ``checkpoints/`` with sets 1 and 2 and, when ``done``, the done marker
    and the final ``model.pt``."""
    write_sets(run / "checkpoints", 2, done)
    if done:
        save_checkpoint(run / "model.pt", {"model": Parts().at(2).model.state_dict()})


def resign(set_dir: Path, name: str, data: bytes) -> None:
    """Replace file ``name`` and re-sign the manifest (an attacker or a bug that wrote a
    consistent set of the wrong content)."""
    (set_dir / name).write_bytes(data)
    manifest = json.loads((set_dir / "manifest.json").read_text())
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (set_dir / "manifest.json").write_text(json.dumps(manifest))


def torch_file(obj: Any) -> bytes:
    import io
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def seeded(seed: int) -> random.Random:
    return random.Random(seed)
