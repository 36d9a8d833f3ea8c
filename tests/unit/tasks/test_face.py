"""Face task on 2 real gloo ranks vs a plain single-process full-softmax loop.

One 2-rank session trains every run through ``build_run`` (DDP engine + Partial FC head):
  * r = 1, 5 steps: backbone and the full (gathered) head equal the plain loop's within 1e-5,
    and the logged training loss equals the plain loop's global-batch loss (report_weight);
  * grad clipping at 100 (active on every step: the norms are 200-1200): the logged grad_norm (backbone +
    all-reduced head shards) equals the plain loop's clip_grad_norm_ over all parameters;
  * r = 0.5: accumulation of 2 micro-batches of 10 equals 1 micro-batch of 20 (the class
    sample is fixed per window from all its labels), and differs from r = 1 (sampling acts).
Plus unit checks: the dataset's determinism and sharding, ``largebatch plan`` output lines
(verification itself: tests/unit/face/test_verification.py).
"""
from __future__ import annotations

import pytest
import torch

from largebatch.config import load_config
from largebatch.data.faces import PairLoader, SyntheticFaceLoader
from tests._launch import spawn
from tests.conftest import run_cli
from tests.unit.tasks._face_runs import TINY, load_run, max_diff, overrides, reference, session

TOL = 1e-5
RUNS = {"r1": overrides(),
        "clip": overrides("optim.grad_clip=100"),
        "r05_acc2": overrides("face.sample_rate=0.5", "batch.accum_steps=2"),
        "r05_acc1": overrides("face.sample_rate=0.5"),
        # exact resume: each rank's head shard, its momentum rows and sampling counter
        "ckpt": overrides("face.sample_rate=0.5", "batch.accum_steps=2",
                          "checkpoint.every_steps=3", "checkpoint.resume=auto"),
        "resumed": overrides("face.sample_rate=0.5", "batch.accum_steps=2",
                             "checkpoint.resume={out}/ckpt/checkpoints/step-000003")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Every run of ``RUNS`` from one 2-rank session, loaded (``load_run``)."""
    out = tmp_path_factory.mktemp("face_session")
    for name in RUNS:
        (out / name).mkdir()
    spawn(session, 2, str(out), RUNS, timeout=300)
    return {name: load_run(out / name, 2) for name in RUNS}


def test_ddp_r1_equals_plain_full_softmax_loop(runs):
    ref = reference([])
    got = runs["r1"]
    assert max_diff(got, ref) <= TOL
    assert max_diff(ref, reference([], steps=0)) > 1e-3  # it trained
    losses = [r["loss"] for r in got["train"]]
    assert len(losses) == 5
    # relative: the loss is ~66 (s = 64 on random embeddings), fp32 spacing there is 8e-6
    assert max(abs(a - b) / b for a, b in zip(losses, ref["losses"])) <= TOL
    norms = [r["grad_norm"] for r in got["train"]]
    assert max(abs(a - b) / b for a, b in zip(norms, ref["norms"])) <= TOL
    assert 0.0 <= got["eval"][-1]["verification_acc"] <= 1.0


def test_clipping_uses_the_global_norm(runs):
    ref = reference(["optim.grad_clip=100"])
    got = runs["clip"]
    norms = [r["grad_norm"] for r in got["train"]]
    assert min(ref["norms"]) > 100  # the clip acted on every step
    assert max(abs(a - b) / b for a, b in zip(norms, ref["norms"])) <= TOL
    assert max_diff(got, ref) <= TOL
    assert max_diff(got, runs["r1"]) > 1e-3


def test_accumulation_equals_one_big_batch_with_the_same_sample(runs):
    assert max_diff(runs["r05_acc2"], runs["r05_acc1"]) <= TOL
    assert max_diff(runs["r05_acc1"], runs["r1"]) > 1e-4  # sampling changed the run
    a = [r["loss"] for r in runs["r05_acc2"]["train"]]
    b = [r["loss"] for r in runs["r05_acc1"]["train"]]
    assert max(abs(x - y) / y for x, y in zip(a, b)) <= TOL


def test_same_world_resume_is_exact(runs):
    # steps 4-5 after loading step 3's set (every rank its own head shard + optimizer rows)
    assert [r["step"] for r in runs["resumed"]["train"]] == [4, 5]
    assert max_diff(runs["resumed"], runs["ckpt"]) == 0.0
    assert max_diff(runs["ckpt"], runs["r05_acc2"]) == 0.0  # checkpointing changed nothing


def test_synthetic_faces_are_deterministic_and_sharded():
    cfg = load_config(TINY, overrides())
    one = SyntheticFaceLoader(cfg, 404, 0, 1, seed=1, device="cpu")
    (x1, y1), = list(one)
    halves = [next(iter(SyntheticFaceLoader(cfg, 202, r, 2, seed=1, device="cpu")))
              for r in range(2)]
    # every sample once over the ranks, identical to the 1-rank view (per (seed, epoch, index))
    assert sorted(torch.cat([y for _, y in halves]).tolist()) == sorted(y1.tolist())
    rows = {x.numpy().tobytes() for x in x1}
    assert len(rows) == 404 and {x.numpy().tobytes() for h, _ in halves for x in h} == rows
    one.set_epoch(1)
    (x2, _), = list(one)
    assert not torch.allclose(x1.sum(0), x2.sum(0))  # fresh noise and order each epoch
    pairs = [PairLoader(cfg, r, 2, "cpu") for r in range(2)]
    index = torch.cat([y[:, 0] for p in pairs for _, y in p])
    assert sorted(index.tolist()) == list(range(cfg.face.eval_pairs))
    same = torch.cat([y[:, 1] for p in pairs for _, y in p])
    assert int(same.sum()) == cfg.face.eval_pairs // 2


def test_plan_prints_fc_memory_logits_and_warning():
    proc = run_cli("plan", str(TINY), "--world-size", "8", "face.num_classes=1000",
                   "face.embedding_size=64", "face.sample_rate=0.1", "optim.name=sgd",
                   "optim.momentum=0.9")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    # 1000 classes / 8 = 125 rows x 64 x 4 B = 32000 B = 31.25 KiB; momentum: the same again;
    # sampled copy + its gradient: 2 x ceil(12.5) = 26 rows x 256 B = 6656 B = 6.50 KiB
    assert "  fc memory per rank: weights 31.25 KiB + gradient 6.50 KiB + optimizer (sgd) " \
           "31.25 KiB = 69.00 KiB" in lines
    # global 120 over 8 ranks: micro 15, 120 gathered rows x 13 sampled classes
    assert "  logits per micro-step: 120 x 13 = 1560 elements (6.09 KiB fp32 per rank)" in lines
    share = 1 - (1 - 1 / 1000) ** 120
    assert any(line.startswith("  warning: face.sample_rate=0.1 is below") and
               f"({share:.3f})" in line for line in lines)
    quiet = run_cli("plan", str(TINY), "--world-size", "8")
    assert quiet.returncode == 0 and "warning" not in quiet.stdout
