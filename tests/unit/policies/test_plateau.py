"""Batch growth on plateau (Smith et al. 2018) in a real run on the real MNIST: the global batch
doubles at each plateau up to batch.max_global_size, then the LR is lowered instead."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli

GLOBAL, MICRO, SUBSET, EPOCHS, EVERY = 240, 60, 2400, 2, 480


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _expected_step_samples(steps: int, grows: dict[int, int]) -> list[int]:
    """Samples of each optimizer step: the global batch in effect, cut at each epoch's end.

    ``grows`` maps the step after which the batch grew to the new global size.
    """
    out, g, left = [], GLOBAL, SUBSET
    for step in range(1, steps + 1):
        out.append(min(g, left))
        left -= out[-1]
        if left == 0:
            left = SUBSET
        g = grows.get(step, g)
    return out


def test_batch_doubles_on_plateau_then_lr_drops(mnist_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run_cli(
        "train", "configs/mnist/mlp.yaml", f"data.root={mnist_root}", "data.download=false",
        f"data.subset={SUBSET}", "data.test_subset=1000", f"train.epochs={EPOCHS}",
        f"train.eval_every_samples={EVERY}", "train.device=cpu", "schedule.name=plateau",
        "schedule.plateau.action=grow_batch", "schedule.plateau.patience=0",
        # No evaluation can improve on the best by 100: every one after the first is a plateau.
        "schedule.plateau.threshold_mode=abs", "schedule.plateau.threshold=100",
        "schedule.plateau.factor=0.5", f"batch.max_global_size={4 * GLOBAL}",
        f"log.out_dir={out}", "log.progress=false", "log.every_steps=1", timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    records = _records(out)
    peak = summary["plan"]["peak_lr"]
    assert summary["plan"]["global_size"] == GLOBAL and summary["plan"]["accum_steps"] == 4

    changes = summary["plan_changes"]
    evals = [r for r in records if r["kind"] == "eval"]
    # Every evaluation but the first (which sets the best) is a plateau and changes something.
    assert [c["step"] for c in changes] == [e["step"] for e in evals[1:]]
    assert [c["action"] for c in changes] == ["grow_batch"] * 2 + ["reduce_lr"] * (len(evals) - 3)
    assert [(c["global_size"], c["accum_steps"]) for c in changes[:2]] == [(480, 8), (960, 16)]
    reduced = [c["lr"] for c in changes[2:]]
    assert len(reduced) >= 2
    assert reduced == pytest.approx([peak * 0.5 ** k for k in range(1, len(reduced) + 1)],
                                    rel=1e-12)
    assert summary["final_lr"] == pytest.approx(reduced[-1], rel=1e-12)
    assert changes == [r for r in records if r["kind"] == "plan_change"]

    # Samples per optimizer step follow the grown batch (metrics.jsonl, every step logged).
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, summary["steps"] + 1))
    per_step = [b["samples"] - a["samples"] for a, b in zip([{"samples": 0}] + train, train)]
    grows = {c["step"]: c["global_size"] for c in changes if c["action"] == "grow_batch"}
    assert per_step == _expected_step_samples(len(train), grows)
    assert summary["samples"] == EPOCHS * SUBSET
    assert max(per_step) == 4 * GLOBAL
    # The LR a train record shows (the one its step used) counts the reductions made before it.
    cuts = [c["step"] for c in changes if c["action"] == "reduce_lr"]
    assert [r["lr"] for r in train] == pytest.approx(
        [peak * 0.5 ** sum(c < r["step"] for c in cuts) for r in train], rel=1e-12)
