"""DeepSpeed ZeRO 1/2 (backbone) + the largebatch-stepped Partial FC head == DDP + head.

One 2-rank gloo session (DeepSpeed is imported once) trains, through ``build_run``, the face
task at r = 0.5 with 2 accumulated micro-batches for 5 steps on DDP and on DeepSpeed ZeRO 1 and
2. DeepSpeed never sees the head: it is placed by ``Engine.setup_sharded`` and stepped by its
own optimizer at the same boundary, with the same LR schedule (warmup: a new LR each step).
Tolerance 1e-6 (as tests/unit/engines/test_deepspeed.py): the backbone's gradients are reduced in
other buckets/orders (last-bit differences), the head's path is identical.
"""
from __future__ import annotations

import pytest

from tests._launch import spawn
from tests.unit.tasks._face_runs import load_run, max_diff, overrides, session

ATOL = 1e-6
COMMON = ("face.sample_rate=0.5", "batch.accum_steps=2", "schedule.warmup_steps=3")
RUNS = {"ddp": overrides(*COMMON, "engine.name=ddp"),
        **{f"zero{s}": overrides(*COMMON, "engine.name=deepspeed", f"engine.zero_stage={s}")
           for s in (1, 2)}}
# Measured with tests/_launch.py's thread check (2 ranks): DeepSpeed imported inside the group
# leaves it alive after destroy_process_group even on a DDP-only run, and a ZeRO 1 run leaves
# it alive even with DeepSpeed imported before the group (its engine keeps the groups).
DS_LEAKS = "DeepSpeed (its import and its ZeRO 1/2 engines) keeps the process groups alive"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Every run of ``RUNS`` from one 2-rank session, loaded (``load_run``)."""
    out = tmp_path_factory.mktemp("face_ds_session")
    ext = out / "torch_extensions"
    ext.mkdir()
    for name in RUNS:
        (out / name).mkdir()
    # the ranks' own extensions folder: nothing DeepSpeed might JIT-build lands in the user's
    spawn(session, 2, str(out), RUNS, timeout=300, env={"TORCH_EXTENSIONS_DIR": str(ext)},
          leaks=DS_LEAKS)
    return {name: load_run(out / name, 2) for name in RUNS}


@pytest.mark.parametrize("stage", (1, 2))
def test_deepspeed_backbone_plus_head_equals_ddp(runs, stage):
    ds, ddp = runs[f"zero{stage}"], runs["ddp"]
    assert len(ds["train"]) == len(ddp["train"]) == 5
    assert max_diff(ds, ddp) <= ATOL
    assert [r["lr"] for r in ds["train"]] == [r["lr"] for r in ddp["train"]]
    # the logged norm includes the head's all-reduced shards on both engines
    for a, b in zip(ds["train"], ddp["train"]):
        assert abs(a["grad_norm"] - b["grad_norm"]) / b["grad_norm"] <= 1e-5
        assert abs(a["loss"] - b["loss"]) / b["loss"] <= 1e-6


def test_head_is_stepped_by_largebatch_outside_deepspeed(runs):
    from largebatch.face.shards import init_rows
    initial = init_rows(0, 101, 16, seed=1, std=0.01)  # the head's documented init
    for name, run in runs.items():
        assert run["engine"] == ("ddp" if name == "ddp" else "deepspeed")
        assert run["head"].shape == (101, 16)  # every class once over the 2 shards
        assert float((run["head"] - initial).abs().max()) > 1e-4  # the head was stepped
