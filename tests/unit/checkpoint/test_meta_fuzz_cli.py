"""A handful of the metadata fuzzing's variants as real processes, on a real run's sets.

``largebatch status`` answers in one line, exit 0, in bounded time whatever the metadata says
(a world size of 10**9, a manifest that is a FIFO, a done marker nested 100,000 deep, missing
final weights); ``largebatch train`` resumes cleanly from the previous set when the newest one
lies (a world size of "1", a part of the wrong type, re-signed), or says in one line, exit 2,
that nothing is left to resume from. Never a traceback.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import cli, run_cli, run_many
from tests.unit.checkpoint._sets import resign, torch_file

NEWEST, PREVIOUS = "step-000008", "step-000004"


def _args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["configs/mnist/mlp.yaml", f"data.root={root}", "data.download=false",
            "data.subset=480", "data.test_subset=100", "batch.global_size=60",
            "log.progress=false", "checkpoint.every_steps=4", f"log.out_dir={out}", *extra]


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, mnist_root) -> tuple[Path, Path]:
    """A finished 8-step run: sets of steps 4 and 8, done.json, model.pt."""
    out = tmp_path_factory.mktemp("real") / "run"
    proc = run_cli("train", *_args(mnist_root, out, "train.epochs=1"))
    assert proc.returncode == 0, proc
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == \
        ["done.json", PREVIOUS, NEWEST]
    return out, mnist_root


def _copy(real_run: tuple[Path, Path], tmp_path: Path, name: str) -> Path:
    out = tmp_path / name
    shutil.copytree(real_run[0], out)
    return out


def _manifest_set(out: Path, key: str, value) -> None:
    path = out / "checkpoints" / NEWEST / "manifest.json"
    data = json.loads(path.read_text())
    data[key] = value
    path.write_text(json.dumps(data))


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("largebatch:")]


def test_status_answers_in_one_line_whatever_the_metadata_says(real_run, tmp_path):
    root = real_run[1]
    world, fifo, deep, weights, intact = (_copy(real_run, tmp_path, n) for n in
                                          ("world", "fifo", "deep", "weights", "intact"))
    _manifest_set(world, "world_size", 10 ** 9)
    manifest = fifo / "checkpoints" / NEWEST / "manifest.json"
    manifest.unlink()
    os.mkfifo(manifest)
    (deep / "checkpoints" / "done.json").write_text("[" * 100_000 + "]" * 100_000)
    (weights / "model.pt").unlink()
    start = time.monotonic()
    procs = run_many([cli("status", *_args(root, out)) for out in
                      (world, fifo, deep, weights, intact)], timeout=120)
    assert time.monotonic() - start < 120
    for proc in procs:
        assert proc.returncode == 0 and proc.stderr == "", proc
        assert len(proc.stdout.splitlines()) == 1, proc
    said = [p.stdout for p in procs]
    assert said[0].startswith(f"resumable at step 4 ({PREVIOUS}): ") and \
        "world_size=1000000000 is not an integer in [1, 1048576]" in said[0], said[0]
    assert said[1].startswith(f"resumable at step 4 ({PREVIOUS}): ") and \
        "manifest.json is not a regular file" in said[1], said[1]
    assert said[2].startswith(f"resumable at step 8 ({NEWEST}): ") and \
        "done marker ignored" in said[2], said[2]
    assert said[3].startswith(f"resumable at step 8 ({NEWEST}): ") and \
        "model.pt is missing: a relaunch writes them" in said[3], said[3]
    assert said[4] == f"finished at step 8 ({NEWEST}): {intact / 'checkpoints'}\n"


def test_train_resumes_from_the_previous_set_or_says_why_not(real_run, tmp_path):
    root = real_run[1]
    world, part, alone = (_copy(real_run, tmp_path, n) for n in ("world", "part", "alone"))
    _manifest_set(world, "world_size", "1")
    set_dir = part / "checkpoints" / NEWEST
    shared = torch.load(set_dir / "trainer.pt", weights_only=True)
    resign(set_dir, "trainer.pt", torch_file({**shared, "schedule": torch.zeros(3)}))
    shutil.rmtree(alone / "checkpoints" / PREVIOUS)
    set_dir = alone / "checkpoints" / NEWEST
    resign(set_dir, "trainer.pt", torch_file({**shared, "engine": []}))
    procs = run_many([cli("train", *_args(root, out, "train.epochs=2")) for out in
                      (world, part, alone)], timeout=300)
    for proc, out, culprit in zip(procs[:2], (world, part),
                                  ("world_size='1'", "trainer.pt part 'schedule'")):
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc
        said = _lines(proc.stderr)
        assert len(said) == 1 and said[0].startswith(
            f"largebatch: warning: checkpoint set {out / 'checkpoints' / NEWEST} is unusable")\
            and culprit in said[0] and f"moved to {NEWEST}.corrupt" in said[0], said
        assert f"resumed from {out / 'checkpoints' / PREVIOUS} at step 4" in proc.stdout
        assert json.loads((out / "summary.json").read_text())["steps"] == 16
        assert (out / "checkpoints" / f"{NEWEST}.corrupt").is_dir()
    proc = procs[2]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc
    said = proc.stderr.strip().splitlines()
    assert len(said) == 1 and said[0].startswith("largebatch: error: checkpoint set ") and \
        "trainer.pt part 'engine'" in said[0] and "no earlier complete set" in said[0], said
