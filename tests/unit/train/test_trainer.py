"""The trainer on the real MNIST: outputs, evaluation cadence, stopping rules, divergence."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.conftest import SEED_RUN_STEPS, cli, run_many

# Evaluations on the first 2000 test images, not all 10,000, where no assertion depends on the
# whole test set: an eval of the seed CNN on all of it costs about as much as 50 training steps.
# (Not in the first test: its accuracy bound is the whole set's; the first 2000 are harder,
# measured 0.83 there after 150 steps.) The target run evaluates more often than it trains:
# measured 15.6 s of CPU with these 2000 (target 0.9 met at step 340) instead of 22.8 s
# (step 240) with all 10,000.
TEST_SUBSET = "data.test_subset=2000"


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _args(root, out, *extra):
    return ["train", "configs/mnist/seed.yaml", f"data.root={root}", "data.download=false",
            f"log.out_dir={out}", "log.progress=false", *extra]


# The single-process runs of the tests below (name -> overrides), each checked by its own test.
RUNS = {
    "learns": ["train.max_steps=150", "train.eval_every_samples=3000"],
    "target": ["train.target_acc=0.9", "train.stop_at_target=true",
               "train.eval_every_samples=1200", TEST_SUBSET],
    "diverges": ["optim.lr=50", "train.max_steps=200", "train.max_loss=100", TEST_SUBSET],
    "wandb": ["train.max_steps=5", "model.name=mlp", "log.wandb.mode=offline"],
    "time_budget": ["train.time_budget_s=0.5", "train.epochs=5", TEST_SUBSET],
}


@pytest.fixture(scope="module")
def runs(mnist_root, tmp_path_factory) -> dict:
    """Every RUNS entry as a real ``python -m largebatch train`` process, once per module and
    two at a time (one process each keeps one core busy; this one only waits): name ->
    (its out_dir, its ``Ran``). Nothing checked reads a timing against another run's."""
    base = tmp_path_factory.mktemp("trainer")
    outs = {name: base / name / "run" for name in RUNS}
    procs = run_many([cli(*_args(mnist_root, outs[name], *extra))
                      for name, extra in RUNS.items()])
    return {name: (outs[name], proc) for name, proc in zip(RUNS, procs)}


def test_single_process_seed_cnn_learns_and_writes_outputs(runs):
    out, proc = runs["learns"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "batch plan: global 60 = micro 60 x accum 1 x world 1" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    for key in ("steps", "samples", "wall_s", "final_val_acc", "final_val_loss",
                "final_train_loss", "reached_target", "steps_to_target", "epochs_to_target",
                "time_to_target_s", "plan"):
        assert key in summary, key
    assert summary["steps"] == 150 and summary["samples"] == 150 * 60
    assert summary["plan"] == json.loads((out / "plan.json").read_text())
    assert summary["final_val_acc"] > 0.85     # chance is 0.10; the net learns in 150 steps
    recs = _records(out)
    train = [r for r in recs if r["kind"] == "train"]
    evals = [r for r in recs if r["kind"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, 151))
    assert all({"step", "epoch", "samples", "loss", "grad_norm", "lr", "time_s"} <= r.keys()
               for r in train)
    assert all(r["grad_norm"] > 0 for r in train) and summary["final_grad_norm"] > 0
    assert [r["samples"] for r in evals] == [3000, 6000, 9000]  # cadence counted in samples
    assert train[-1]["loss"] < train[0]["loss"]


def test_target_stop_and_time_to_target(runs):
    out, proc = runs["target"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["reached_target"] and s["stop_reason"] == "target_reached"
    assert s["steps_to_target"] == s["steps"] and s["steps"] % 20 == 0
    assert s["final_val_acc"] >= 0.9
    assert 0 < s["time_to_target_s"] <= s["wall_s"]
    assert s["epochs_to_target"] == s["samples"] / 60000


def test_divergence_is_reported_not_crashed(runs):
    out, proc = runs["diverges"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["diverged"] and s["stop_reason"] == "diverged" and s["steps"] < 200
    last = _records(out)[-2]  # the train record that tripped it, then the epoch record
    assert last["kind"] == "train" and (not math.isfinite(float(last["loss"]))
                                        or float(last["loss"]) > 100)


def test_torchrun_two_ranks_on_real_mnist(seed_straight):
    """The session's uninterrupted 2-rank torchrun run of tests/conftest.py's SEED_RUN, the
    reference of the resume and fault tests: seed.yaml at global 120 (micro 60 x 2 ranks), 60
    steps over a 1200-sample subset, engine auto. (This test used to launch its own run of
    60 steps on the whole train set with engine.name=ddp; the same checks hold of this one.)"""
    out = seed_straight(2, "memory")
    s = json.loads((out / "summary.json").read_text())
    assert s["world_size"] == 2 and s["engine"] == "ddp"  # auto: DDP for a multi-rank launch
    assert s["steps"] == SEED_RUN_STEPS == 60
    assert s["plan"]["accum_steps"] == 1 and s["samples"] == 60 * 120
    assert s["final_val_acc"] > 0.5        # chance is 0.10 after 60 steps of SGD lr 0.02
    train = [r for r in _records(out) if r["kind"] == "train"]
    assert sum(r["loss"] for r in train[-10:]) < sum(r["loss"] for r in train[:10])


def test_wandb_offline_writes_run_files(runs):
    out, proc = runs["wandb"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb")), "no wandb event file written"


def test_time_budget_stops_honestly(runs):
    out, proc = runs["time_budget"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["stop_reason"] == "time_budget" and s["train_time_s"] >= 0.5
    assert not s["reached_target"]
