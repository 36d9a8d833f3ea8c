"""Resuming a face checkpoint set at another world size reshards the Partial FC head.

Real gloo processes train the face task (C = 101 classes: uneven shards at every world size,
global batch 60 so that 1, 2 and 3 ranks all divide it, r = 0.5 so that momentum rows are
sparse) and write sets at steps 2 and 4. New launches at another world size resume from the
step-2 set (2 -> 1, 2 -> 3, 1 -> 2). Each new rank dumps its head shard, the shard's momentum
rows and the backbone right after the load, before any step; the test reassembles them by
class range and compares them, bit for bit, with the old rank files' shards reassembled
independently (plain concatenation in class order of what the old ranks wrote), then checks
that the resumed runs train on (step 3, finite loss).
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from largebatch.config import load_config
from largebatch.dist import DistEnv
from tests._launch import spawn
from tests.unit.tasks._face_runs import TINY, overrides

C = 101
COMMON = ("batch.global_size=60", "face.sample_rate=0.5", "train.epochs=2")
SOURCE = overrides(*COMMON, "train.max_steps=4", "checkpoint.every_steps=2",
                   "checkpoint.resume=auto")


def resumed(src: str) -> list[str]:
    return overrides(*COMMON, "train.max_steps=3",
                     f"checkpoint.resume={{out}}/{src}/checkpoints/step-000002")


def reshard_session(rank: int, world: int, out: str, runs: dict[str, list[str]]) -> None:
    """Build and train each run of ``runs`` on this rank; dump the state right after load.

    A ``tests._launch.spawn`` function: the gloo group and the torchrun variables are set.
    """
    from largebatch.train.build import build_run
    denv = DistEnv("torchrun", rank=rank, world_size=world, local_rank=rank)
    for name, extra in runs.items():
        where = Path(out) / name
        where.mkdir(exist_ok=True)
        cfg = load_config(TINY, [e.format(out=out) for e in extra] + [f"log.out_dir={where}"])
        run = build_run(cfg, denv, quiet=True)
        torch.save({"step": run.trainer.state.step, "consumed": run.trainer.state.consumed,
                    "micro": run.trainer.plan.micro_size,
                    "model": run.engine.unwrapped().state_dict(),
                    "per_rank": run.engine.rank_state_dict()},
                   where / f"loaded-rank{rank}.pt")
        summary = run.trainer.fit()
        run.logger.close(summary)


def assemble(shards: list[dict]) -> dict[str, torch.Tensor]:
    """The full head weight and momentum rows from every rank's head state, in class order."""
    parts = sorted(shards, key=lambda s: s["_extra_state"]["class_start"])
    start = 0
    for p in parts:  # the shards tile the classes without gap or overlap
        assert p["_extra_state"]["class_start"] == start
        start += p["_extra_state"]["num_local"]
    assert start == C
    rows = [p["_extra_state"]["optimizer"]["rows"]["momentum_buffer"] for p in parts]
    return {"weight": torch.cat([p["weight"] for p in parts]), "momentum": torch.cat(rows)}


def old_set(path: Path, world: int) -> tuple[dict, dict]:
    """(trainer.pt, reassembled head) of a set, read directly from its files."""
    trainer = torch.load(path / "trainer.pt", weights_only=True)
    heads = [torch.load(path / f"rank-{r:05d}.pt", weights_only=True)["engine"]["sharded"][0]
             for r in range(world)]
    return trainer, assemble(heads)


def new_loaded(path: Path, world: int) -> tuple[list[dict], dict]:
    dumps = [torch.load(path / f"loaded-rank{r}.pt", weights_only=True) for r in range(world)]
    return dumps, assemble([d["per_rank"]["sharded"][0] for d in dumps])


def launch(world: int, out: Path, runs: dict[str, list[str]]) -> None:
    """Run ``reshard_session`` on ``world`` gloo ranks (1 included: a group of one)."""
    spawn(reshard_session, world, str(out), runs, timeout=300)


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out = tmp_path_factory.mktemp("face_reshard")
    launch(2, out, {"src2": SOURCE})
    # checkpoint.resume=auto in the same directory, re-launched on fewer ranks (a copy, so
    # that its new sets do not prune the step-2 set the other resumes read)
    shutil.copytree(out / "src2", out / "auto21")
    auto = overrides(*COMMON, "train.max_steps=5", "checkpoint.every_steps=2",
                     "checkpoint.resume=auto")
    launch(1, out, {"src1": SOURCE, "r21": resumed("src2"), "auto21": auto})
    launch(3, out, {"r23": resumed("src2")})
    launch(2, out, {"r12": resumed("src1")})
    return out


def test_auto_resume_in_the_same_directory_at_fewer_ranks_reshards(out):
    """The newest set of src2 (step 4, the final one) resumed by auto at world 1: trains on."""
    _, old = old_set(out / "src2" / "checkpoints" / "step-000004", 2)
    dumps, new = new_loaded(out / "auto21", 1)
    assert dumps[0]["step"] == 4
    assert torch.equal(new["weight"], old["weight"])
    assert torch.equal(new["momentum"], old["momentum"])
    records = [json.loads(line) for line in (out / "auto21" / "metrics.jsonl").read_text()
               .splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5] and math.isfinite(train[-1]["loss"])


@pytest.mark.parametrize("name,old_world,new_world,src",
                         [("r21", 2, 1, "src2"), ("r23", 2, 3, "src2"), ("r12", 1, 2, "src1")])
def test_resharded_resume_loads_head_and_momentum_exactly(out, name, old_world, new_world,
                                                          src):
    trainer, old = old_set(out / src / "checkpoints" / "step-000002", old_world)
    dumps, new = new_loaded(out / name, new_world)
    assert old["momentum"].abs().sum() > 0  # the optimizer state is real, not zeros
    assert (old["momentum"] == 0).all(dim=1).any()  # r = 0.5: some rows never sampled
    assert torch.equal(new["weight"], old["weight"])
    assert torch.equal(new["momentum"], old["momentum"])
    # insightface's split at the new world size: C // W + (rank < C % W) rows each
    for r, d in enumerate(dumps):
        meta = d["per_rank"]["sharded"][0]["_extra_state"]
        assert meta["num_local"] == C // new_world + (r < C % new_world)
        assert d["step"] == 2
        # data position by samples: 2 micro-batches x 60 / world x world = 120 samples
        assert d["consumed"] * d["micro"] * new_world == 120
        assert d["micro"] == 60 // new_world
        for k, v in trainer["engine"]["model"].items():  # the replicated backbone
            assert torch.equal(d["model"][k], v), k
    records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text()
               .splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [3]
    assert math.isfinite(train[0]["loss"]) and train[0]["samples"] == 180
