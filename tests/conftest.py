"""Shared fixtures: the real MNIST (skipped cleanly without it, unless required) and process
helpers. Multi-process tests inside pytest use ``tests._launch.spawn``."""
from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TAIL_LINES = 40


def _data_root() -> Path | None:
    """``$LARGEBATCH_DATA_ROOT``, else ``data/`` (where the README's first command downloads),
    if it holds MNIST in torchvision's layout."""
    root = Path(os.environ.get("LARGEBATCH_DATA_ROOT") or REPO / "data")
    if (root / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        return root.resolve()
    return None


def required(variable: str) -> bool:
    """Whether ``variable`` (e.g. LARGEBATCH_REQUIRE_DATA, set by .ci/run) is set and not 0."""
    return os.environ.get(variable, "") not in ("", "0")


def skip_unless_required(reason: str, variable: str) -> NoReturn:
    """Skip with ``reason``; where ``variable`` says this must be available (CI), fail instead,
    so that CI cannot pass by silently testing less."""
    if required(variable):
        pytest.fail(f"{reason} [{variable}=1: required here, so this fails instead of skipping]",
                    pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """The real MNIST root (torchvision layout); skips the test when it is absent, or fails it
    when ``LARGEBATCH_REQUIRE_DATA=1``."""
    root = _data_root()
    if root is None:
        where = os.environ.get("LARGEBATCH_DATA_ROOT") or REPO / "data"
        skip_unless_required(f"real MNIST not found in {where} (no MNIST/raw/"
                             "train-images-idx3-ubyte): set LARGEBATCH_DATA_ROOT to its folder",
                             "LARGEBATCH_REQUIRE_DATA")
    return root


def free_port() -> int:
    """A free TCP port on loopback, for code that binds it itself (torchrun, Slurm daemons)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for subprocesses: one thread per process (2 shared cores), no wandb network."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


class Ran(subprocess.CompletedProcess):
    """A finished command whose repr is a readable summary: the command, how it ended and the
    tails of its stdout and stderr (what ``assert proc.returncode == 0`` shows on failure)."""

    def __repr__(self) -> str:
        return _summary(self.args, _ending(self.returncode), self.stdout, self.stderr)


def run_cli(*args: str, timeout: int = 300, env: dict | None = None) -> Ran:
    """``python -m largebatch ARGS`` as a real process."""
    return _run([sys.executable, "-m", "largebatch", *args], timeout, env)


def run_torchrun(nproc: int, *args: str, timeout: int = 300, env: dict | None = None) -> Ran:
    """``torchrun --standalone --nproc_per_node N -m largebatch ARGS`` as real processes."""
    return _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={nproc}", "-m", "largebatch", *args], timeout, env)


def _run(cmd: list[str], timeout: float, env: dict | None) -> Ran:
    """Run ``cmd`` in its own process group from the repository root.

    At the timeout the whole group is killed (torchrun's workers too, which ``subprocess.run``
    would leave running on the shared cores) and the test fails with the output so far.
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env or cli_env(), cwd=REPO, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        pytest.fail(_summary(cmd, f"still running after {timeout} s (killed)", out, err),
                    pytrace=False)
    except BaseException:  # e.g. Ctrl-C: leave no workers behind
        _kill_group(proc)
        proc.communicate()
        raise
    return Ran(cmd, proc.returncode, out, err)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _ending(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"exit code {code}"


def _summary(cmd, ending: str, out: str | None, err: str | None) -> str:
    shown = shlex.join(str(c) for c in cmd) if isinstance(cmd, (list, tuple)) else str(cmd)
    lines = [f"`{shown}`: {ending}"]
    for name, text in (("stdout", out), ("stderr", err)):
        tail = (text or "").splitlines()[-TAIL_LINES:]
        lines += [f"--- {name} (last {len(tail)} lines) ---", *tail]
    return "\n".join(lines)


def model_weights(out: Path) -> dict:
    """The final weights a run wrote to ``out/model.pt`` (weights_only load)."""
    from largebatch.checkpoint import load_checkpoint
    return load_checkpoint(out / "model.pt")["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    """Bit equality of two state dicts, naming the first tensor that differs and by how much."""
    import torch
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs by {(a[k] - b[k]).abs().max().item()}"
