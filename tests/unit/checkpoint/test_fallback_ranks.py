"""Two real gloo ranks resume from a set whose rank-1 file alone is bad: they agree.

Only rank 1 can see that its own file holds a shard of the wrong shape (the manifest was
re-signed, so every checksum matches); both ranks must then drop that set together and load the
previous one (rank 0 moves the bad set aside once), and a hostile rank-1 file must make both
ranks stop with a ``ConfigError`` instead of leaving rank 0 waiting in a collective.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from largebatch.config import ConfigError
from tests._launch import spawn
from tests.unit.checkpoint._meta_variants import HOSTILE, PAYLOAD_MARK
from tests.unit.checkpoint._sets import (Parts, checkpointer, resign, torch_file,
                                         write_sets)


def _max(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _rank_main(rank: int, world: int, directory: str, phase: str) -> dict:
    """Write sets 1 and 2 on every rank, or resume from them; returns what was restored."""
    if phase == "write":
        write_sets(Path(directory), 2, rank=rank, world=world, barrier=dist.barrier,
                   agree=_max)
        return {}
    parts = Parts(rank)
    ck = parts.register(checkpointer(Path(directory), rank, world, dist.barrier, _max))
    try:
        ck.load(ck.find("auto"))
    except ConfigError as exc:
        return {"error": str(exc)}
    return {"step": parts.step_of(), "loaded": ck.loaded.name}


@pytest.mark.parametrize("damage", ["shard_shape", "hostile"])
def test_a_bad_file_on_one_rank_is_agreed_by_both(tmp_path, damage):
    directory = tmp_path / "ck"
    spawn(_rank_main, 2, str(directory), "write", timeout=60)
    set_dir = directory / "step-000002"
    if damage == "shard_shape":
        own = torch.load(set_dir / "rank-00001.pt", weights_only=True)
        resign(set_dir, "rank-00001.pt", torch_file({**own, "shard": {"w": torch.zeros(9)}}))
    else:
        resign(set_dir, "rank-00001.pt", HOSTILE)
    got = spawn(_rank_main, 2, str(directory), "resume", timeout=60)
    if damage == "shard_shape":
        assert got == [{"step": 1, "loaded": "step-000001"}] * 2, got
        assert sorted(p.name for p in directory.iterdir()) == ["step-000001",
                                                               "step-000002.corrupt"]
    else:
        assert "rank-00001.pt refused" in got[1]["error"], got
        assert "another rank refused it" in got[0]["error"], got
        assert all("\n" not in g["error"] for g in got)
        assert set_dir.is_dir() and not PAYLOAD_MARK.exists()  # refused, not moved, never ran
