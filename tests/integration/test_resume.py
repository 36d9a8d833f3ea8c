"""Exact resume: a run checkpointed (on schedule or on SIGUSR1) and resumed ends bit-identical
to the same run uninterrupted — model, optimizer, schedule, data position and per-rank RNG."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


from largebatch.checkpoint import load_checkpoint
from tests.conftest import (REPO, SEED_RUN, SEED_RUN_STEPS, cli, cli_env, run_cli, run_many,
                            run_torchrun)

# tests/conftest.py's SEED_RUN: 60 steps of seed_cnn, which has dropout, so equal weights need
# the RNG streams restored too. Its uninterrupted 2-rank run is the session fixture
# ``seed_straight``, shared with tests/integration/test_faults.py.
BASE = SEED_RUN


def _args(root, out, *extra):
    return [*BASE, f"data.root={root}", "data.download=false", f"log.out_dir={out}", *extra]


def _weights(out: Path) -> dict:
    return load_checkpoint(out / "model.pt")["model"]


def _assert_same(a: dict, b: dict) -> None:
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff == 0.0, f"resumed run differs by {diff}"


def test_resume_from_periodic_checkpoint_is_exact(tmp_path, mnist_root):
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    # The straight run and the first leg of the cut one are independent: side by side.
    ref, first = run_many([cli(*_args(mnist_root, straight, "train.max_steps=14")),
                           cli(*_args(mnist_root, cut, "train.max_steps=6",
                                      "checkpoint.every_steps=6"))])
    assert ref.returncode == 0, ref.stderr[-2000:]
    assert first.returncode == 0, first.stderr[-2000:]
    second = run_cli(*_args(mnist_root, cut, "train.max_steps=14"))  # resume=auto, the default
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from" in second.stdout and "at step 6" in second.stdout
    _assert_same(_weights(straight), _weights(cut))
    steps = [json.loads(l)["step"] for l in (cut / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["kind"] == "train"]
    assert steps == list(range(1, 15))   # nothing written before the cut was lost


def _worker_pids(marker: str) -> dict[int, int]:
    """rank -> pid of the processes whose command line contains ``marker``."""
    pids = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="ignore")
            env = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="ignore")
        except OSError:
            continue
        if marker in cmd and "largebatch" in cmd and "RANK=" in env:
            rank = [e for e in env.split("\0") if e.startswith("RANK=")]
            if rank and "torch.distributed.run" not in cmd:
                pids[int(rank[0][5:])] = int(pid)
    return pids


def test_sigusr1_on_one_rank_checkpoints_all_ranks_and_resumes_exactly(tmp_path, mnist_root,
                                                                       seed_straight):
    """SLURM's pre-emption signal reaches one worker: both ranks stop at the same step."""
    straight = seed_straight(2, "memory")  # the same run with the default loader, memory
    cut = tmp_path / "cut"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "largebatch", *_args(mnist_root, cut, f"checkpoint.dir={cut}/ck")]
    live = subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = cut / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or
                                      metrics.read_text().count('"kind": "train"') < 3):
        time.sleep(0.05)
    pids = _worker_pids(str(cut))
    assert 1 in pids, pids
    os.kill(pids[1], signal.SIGUSR1)
    out, err = live.communicate(timeout=120)
    assert live.returncode == 0, err[-2000:]
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["stop_reason"] == "preempted" and summary["steps"] < SEED_RUN_STEPS
    resumed = run_torchrun(2, *_args(mnist_root, cut, f"checkpoint.dir={cut}/ck"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"at step {summary['steps']}" in resumed.stdout
    final = json.loads((cut / "summary.json").read_text())
    assert final["steps"] == SEED_RUN_STEPS and final["stop_reason"] == "epochs"
    _assert_same(_weights(straight), _weights(cut))


def test_resume_at_another_world_size_reshards(tmp_path, mnist_root):
    # (was: refused; a set of another world size is now resharded, see Checkpointer.load)
    out = tmp_path / "run"
    assert run_cli(*_args(mnist_root, out, "train.max_steps=2",
                          "checkpoint.every_steps=2")).returncode == 0
    proc = run_torchrun(2, *_args(mnist_root, out, "train.max_steps=3"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resharding checkpoint from world 1 to 2" in proc.stdout
    assert "at step 2" in proc.stdout
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
