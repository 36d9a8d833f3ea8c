"""The trainer on the real MNIST: outputs, evaluation cadence, stopping rules, divergence."""
from __future__ import annotations

import json
import math
from pathlib import Path

from tests.conftest import run_cli, run_torchrun


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _args(root, out, *extra):
    return ["train", "configs/mnist/seed.yaml", f"data.root={root}", "data.download=false",
            f"log.out_dir={out}", "log.progress=false", *extra]


def test_single_process_seed_cnn_learns_and_writes_outputs(tmp_path, mnist_root):
    out = tmp_path / "run"
    proc = run_cli(*_args(mnist_root, out, "train.max_steps=150",
                          "train.eval_every_samples=3000"))
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


def test_target_stop_and_time_to_target(tmp_path, mnist_root):
    out = tmp_path / "run"
    proc = run_cli(*_args(mnist_root, out, "train.target_acc=0.9", "train.stop_at_target=true",
                          "train.eval_every_samples=1200"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["reached_target"] and s["stop_reason"] == "target_reached"
    assert s["steps_to_target"] == s["steps"] and s["steps"] % 20 == 0
    assert s["final_val_acc"] >= 0.9
    assert 0 < s["time_to_target_s"] <= s["wall_s"]
    assert s["epochs_to_target"] == s["samples"] / 60000


def test_divergence_is_reported_not_crashed(tmp_path, mnist_root):
    out = tmp_path / "run"
    proc = run_cli(*_args(mnist_root, out, "optim.lr=50", "train.max_steps=200",
                          "train.max_loss=100"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["diverged"] and s["stop_reason"] == "diverged" and s["steps"] < 200
    last = _records(out)[-2]  # the train record that tripped it, then the epoch record
    assert last["kind"] == "train" and (not math.isfinite(float(last["loss"]))
                                        or float(last["loss"]) > 100)


def test_torchrun_two_ranks_on_real_mnist(tmp_path, mnist_root):
    out = tmp_path / "run"
    proc = run_torchrun(2, *_args(mnist_root, out, "batch.global_size=120",
                                  "train.max_steps=60", "engine.name=ddp"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["world_size"] == 2 and s["engine"] == "ddp"
    assert s["plan"]["accum_steps"] == 1 and s["samples"] == 60 * 120
    assert s["final_val_acc"] > 0.5        # chance is 0.10 after 60 steps of SGD lr 0.02
    train = [r for r in _records(out) if r["kind"] == "train"]
    assert sum(r["loss"] for r in train[-10:]) < sum(r["loss"] for r in train[:10])


def test_wandb_offline_writes_run_files(tmp_path, mnist_root):
    out = tmp_path / "run"
    proc = run_cli(*_args(mnist_root, out, "train.max_steps=5", "model.name=mlp",
                          "log.wandb.mode=offline"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb")), "no wandb event file written"


def test_time_budget_stops_honestly(tmp_path, mnist_root):
    out = tmp_path / "run"
    proc = run_cli(*_args(mnist_root, out, "train.time_budget_s=0.5", "train.epochs=5"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["stop_reason"] == "time_budget" and s["train_time_s"] >= 0.5
    assert not s["reached_target"]
