"""Stop signals from the first instruction: a SIGUSR1 or SIGTERM that reaches ``largebatch
train`` while it is still starting (importing torch, reading MNIST, building the model) used to
kill it silently (SIGUSR1: exit 138, nothing saved). Now the CLI remembers it from its first
line and the trainer acts on it: one line, a set at the first step, exit 0, ``status``
resumable (what a Slurm requeue needs), and the relaunch finishes the run. A command that
does not train still dies of the signal. Real processes, real signals."""
from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from largebatch.checkpoint import list_sets
from tests.conftest import CONFIGS, REPO, cli, cli_env, run_cli

CONFIG = str(CONFIGS / "mnist" / "mlp.yaml")


def args(root: Path, out: Path) -> list[str]:
    """A 4-step mlp run (one epoch of 240 samples at batch 60) into ``out``."""
    return ["train", CONFIG, f"data.root={root}", "data.download=false", "data.subset=240",
            "batch.global_size=60", "log.progress=false", f"log.out_dir={out}"]


def caught(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler for ``sig`` (its SigCgt mask in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def signalled(argv: list[str], sig: int, after: float = 0.0) -> subprocess.CompletedProcess:
    """Run ``argv``; send ``sig`` ``after`` seconds after its first handler for it is in
    place (the CLI's first lines: the process is still importing); wait for it to end."""
    proc = subprocess.Popen(argv, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not caught(proc.pid, sig):
            assert proc.poll() is None and time.monotonic() < deadline, "no handler installed"
            time.sleep(0.001)
        time.sleep(after)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


@pytest.mark.parametrize("sig, after", [(signal.SIGUSR1, 0.0), (signal.SIGTERM, 1.0)],
                         ids=["USR1-at-the-first-line", "TERM-while-importing"])
def test_a_stop_signal_during_start_up_checkpoints_the_first_step_then_resumes(
        mnist_root: Path, tmp_path: Path, sig: int, after: float) -> None:
    out = tmp_path / "run"
    proc = signalled(cli(*args(mnist_root, out)), sig, after)
    name = signal.Signals(sig).name
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    assert f"largebatch: {name} during start-up: checkpointing after the first step, " \
           f"then stopping" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert [s.name for s in list_sets(out / "checkpoints")] == ["step-000001"]
    # The summary of a run stopped before any evaluation: strict JSON, the metrics it never
    # measured null with their reason (not the string "nan", not a literal NaN).
    summary = json.loads((out / "summary.json").read_text(),
                         parse_constant=lambda c: pytest.fail(f"literal {c}"))
    assert (summary["stop_reason"], summary["steps"]) == ("preempted", 1)
    assert summary["final_val_acc"] is None and summary["final_val_acc_nonfinite"] == "nan"
    if sig != signal.SIGUSR1:  # the set is the same whichever signal made it: resumed once
        return
    status = run_cli("status", *args(mnist_root, out)[1:])
    assert status.stdout.startswith("resumable at step 1 (step-000001)"), status
    again = run_cli(*args(mnist_root, out))
    assert again.returncode == 0 and "at step 1" in again.stdout, again
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


def test_a_command_that_does_not_train_still_dies_of_the_signal(tmp_path: Path) -> None:
    proc = signalled(cli("status", CONFIG, f"log.out_dir={tmp_path}"), signal.SIGTERM)
    assert proc.returncode == -signal.SIGTERM, (proc.returncode, proc.stdout, proc.stderr)
