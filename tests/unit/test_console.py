"""What a person watching a run reads: lines per logged step and per evaluation, no carriage
returns off a terminal, a bar that resumes at its step; TensorBoard scalars; Ctrl-C that
checkpoints like SIGTERM (and a second one that aborts)."""
from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from largebatch.console import Console, duration
from tests.conftest import REPO, cli_env, run_cli

LINE = re.compile(r"^step (\d+)/(\d+) \(\d+%\) \| epoch [\d.]+ \| loss [\d.e+-]+ \| lr [\d.e+-]+"
                  r"( \| grad [\d.e+-]+)? \| ([\d-]+) samples/s \| eta (\S+)$")


def _train(step: int, samples: int, time_s: float) -> dict:
    return {"kind": "train", "step": step, "epoch": step / 10, "samples": samples, "loss": 2.5,
            "grad_norm": 1.25, "lr": 0.1, "time_s": time_s}


def test_lines_carry_the_records_numbers_and_the_rate_between_them() -> None:
    out = io.StringIO()
    console = Console(True, out, tty=False)
    console.begin(0, 100)
    console.record(_train(1, 60, 2.0))
    console.record(_train(2, 120, 3.0))  # 60 samples in 1 s of training: 60 samples/s
    console.record({"kind": "eval", "step": 2, "epoch": 0.2, "samples": 120, "val_acc": 0.875,
                    "time_s": 3.0})
    console.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 3
    first, second = LINE.match(lines[0]), LINE.match(lines[1])
    assert first and second, lines
    assert first.group(4) == "-" and second.group(4) == "60"
    # 98 steps left at 1.5 s of training per step since the start: 147 s
    assert second.group(5) == duration(98 * 1.5) == "2m27s"
    assert lines[2] == "eval step 2 | epoch 0.2 | val_acc 0.875"


def test_a_resumed_bar_continues_from_its_step() -> None:
    out = io.StringIO()
    console = Console(True, out, tty=True)
    console.begin(40, 100, time_s=80.0)  # resumed at step 40 after 80 s of training
    assert console._bar.n == 40 and console._bar.total == 100
    console.record(_train(41, 2460, 82.0))
    assert console._bar.n == 41
    eta = LINE.match([s for s in out.getvalue().replace("\r", "\n").splitlines()
                      if s.startswith("step 41")][0]).group(5)
    assert eta == duration(59 * 2.0)  # 2 s per step since the resume, 59 steps left
    console.close()


def test_off_means_silent() -> None:
    out = io.StringIO()
    console = Console(False, out, tty=False)
    console.begin(0, 10)
    console.record(_train(1, 60, 1.0))
    assert out.getvalue() == ""


def _mlp_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "configs/mnist/mlp.yaml", f"data.root={root}", "data.download=false",
            "data.subset=1200", "data.test_subset=200", "batch.global_size=120",
            "train.epochs=2", f"log.out_dir={out}", "log.every_steps=5", *extra]


def test_a_real_run_prints_plain_lines_and_tensorboard_scalars(mnist_root, tmp_path) -> None:
    """A run whose stdout is a pipe (a Slurm log): a line per 5 steps and per evaluation, no
    carriage return; TensorBoard's event file holds the same losses as metrics.jsonl."""
    out = tmp_path / "run"
    proc = run_cli(*_mlp_args(mnist_root, out, "log.tensorboard=true"))
    assert proc.returncode == 0, proc
    assert "\r" not in proc.stdout
    steps = [int(m.group(1)) for m in map(LINE.match, proc.stdout.splitlines()) if m]
    assert steps == [5, 10, 15, 20], proc.stdout  # 10 steps per epoch, 2 epochs
    assert sum(line.startswith("eval step ") for line in proc.stdout.splitlines()) == 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    logged = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if r["kind"] == "train"]
    scalars = events.Scalars("train/loss")
    assert [e.step for e in scalars] == [r["step"] for r in logged]
    assert [e.value for e in scalars] == pytest.approx([r["loss"] for r in logged], rel=1e-6)


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "largebatch", *args], cwd=REPO,
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _wait_for_step(out: Path, step: int, proc: subprocess.Popen, limit: float = 120) -> None:
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + limit
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and any(json.loads(l).get("step", 0) >= step
                                    for l in metrics.read_text().splitlines() if l.strip()):
            return
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"the run never reached step {step}: {proc.communicate()[0][-2000:]}")


def test_ctrl_c_checkpoints_then_a_second_one_aborts(mnist_root, tmp_path) -> None:
    """The first SIGINT finishes the step and writes a resumable set, like SIGTERM; during a
    second run the second SIGINT aborts at once (KeyboardInterrupt, exit 130)."""
    out = tmp_path / "run"
    args = _mlp_args(mnist_root, out, "train.epochs=50", "log.every_steps=1")
    proc = _start(args)
    _wait_for_step(out, 3, proc)
    os.killpg(proc.pid, signal.SIGINT)
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, text
    assert "Ctrl-C: checkpointing after this step" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "preempted"
    status = run_cli("status", *args[1:], "--json")
    assert json.loads(status.stdout)["state"] == "resumable"
    assert json.loads(status.stdout)["step"] == summary["steps"]
    proc = _start(args)  # resumes from that set
    _wait_for_step(out, summary["steps"] + 2, proc)
    os.killpg(proc.pid, signal.SIGINT)
    seen = []
    for line in proc.stdout:  # the handler has run once it says so: now the second Ctrl-C
        seen.append(line)
        if "Ctrl-C: checkpointing" in line:
            os.killpg(proc.pid, signal.SIGINT)
            break
    text = "".join(seen) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, text
