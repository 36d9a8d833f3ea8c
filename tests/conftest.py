"""Shared fixtures: the real MNIST (skipped cleanly without it, unless required), process
helpers, and the straight reference runs several files compare against (``seed_straight``:
trained once per session, on first use). Multi-process tests inside pytest use
``tests._launch.spawn``."""
from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, NoReturn, Optional, Sequence

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
    return _run(cli(*args), timeout, env)


def run_torchrun(nproc: int, *args: str, timeout: int = 300, env: dict | None = None) -> Ran:
    """``torchrun --standalone --nproc_per_node N -m largebatch ARGS`` as real processes."""
    return _run(torchrun(nproc, *args), timeout, env)


def run_many(cmds: Sequence[Sequence[str]], timeout: int = 300, env: dict | None = None,
             parallel: int = 2) -> list[Ran]:
    """Run independent commands (argv lists, e.g. ``cli(...)``), ``parallel`` at a time; returns
    their ``Ran`` in the order given.

    For tests that start several short processes whose cost is the interpreter and torch
    import (~3 s of one core each): two at a time keep both cores busy while this process
    waits. Each command is run as ``run_cli`` runs it (own process group, the same timeout
    handling); a timeout or an interrupt kills every command still running.
    """
    started: list[subprocess.Popen] = []
    stopping = threading.Event()

    def one(cmd: list[str]) -> Ran:
        if stopping.is_set():  # another command failed: start nothing more
            raise RuntimeError("not started: an earlier command of run_many failed")
        return _run(cmd, timeout, env, started.append)

    with ThreadPoolExecutor(max(1, parallel)) as pool:
        futures = [pool.submit(one, list(cmd)) for cmd in cmds]
        try:
            return [future.result() for future in futures]
        except BaseException:
            stopping.set()
            for future in futures:
                future.cancel()
            for proc in started:
                _kill_group(proc)
            raise


def cli(*args: str) -> list[str]:
    """The argv of ``python -m largebatch ARGS`` (for ``run_many``)."""
    return [sys.executable, "-m", "largebatch", *args]


def torchrun(nproc: int, *args: str) -> list[str]:
    """The argv of ``torchrun --standalone --nproc_per_node N -m largebatch ARGS``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", "-m", "largebatch", *args]


def _run(cmd: list[str], timeout: float, env: dict | None,
         started: Optional[Callable[[subprocess.Popen], None]] = None) -> Ran:
    """Run ``cmd`` in its own process group from the repository root.

    At the timeout the whole group is killed (torchrun's workers too, which ``subprocess.run``
    would leave running on the shared cores) and the test fails with the output so far.
    ``started`` is told the process once it runs (``run_many`` kills it on an interrupt).
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env or cli_env(), cwd=REPO, start_new_session=True)
    if started is not None:
        started(proc)
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


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch's intra-op threads in this (the pytest) process set to 1 for the block, then
    restored: for small in-process computations whose thread count is not what they test.
    On the shared 2-core machine, two OpenMP threads in a busy moment are several times slower
    than one (measured: 10 steps of the MNIST MLP 0.26 s on one thread, 1.3-4.5 s on two)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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


# ---- straight reference runs shared across files -----------------------------------------------
# The uninterrupted run that the resume and fault tests (tests/integration/test_resume.py,
# test_faults.py) compare a checkpointed, killed, signalled or restarted run against, bit for
# bit, and whose outputs the trainer's torchrun test checks (tests/unit/train/test_trainer.py):
# 60 steps of the dropout CNN (seed_cnn has two dropout layers: equal weights need the RNG
# streams restored too), 10 steps an epoch. Those files build their own runs from SEED_RUN, so
# a change here changes both sides of every comparison.
SEED_RUN = ["train", "configs/mnist/seed.yaml", "data.subset=1200", "batch.global_size=120",
            "train.epochs=6", "log.progress=false", "schedule.warmup_steps=5",
            "data.test_subset=1000"]  # 6 evaluations of 1000 test images, not 10,000: a third faster
SEED_RUN_STEPS = 60


def seed_run_args(root: Path, out: Path, loader: str, *extra: str) -> list[str]:
    """``SEED_RUN`` on the real MNIST at ``root`` with ``loader``, writing to ``out``."""
    return [*SEED_RUN, f"data.root={root}", "data.download=false", f"data.loader={loader}",
            f"log.out_dir={out}", *extra]


@pytest.fixture(scope="session")
def seed_straight(mnist_root: Path, tmp_path_factory) -> Callable[..., Path]:
    """``get(world, loader)``: the output folder (model.pt, summary.json, metrics.jsonl) of the
    uninterrupted ``SEED_RUN`` with ``world`` processes (torchrun for 2) and ``loader``. Each is
    trained once per session, by the first test that asks; a failed run fails that test and is
    tried again by the next. Treat the folder as read-only.

    ``get(world, loader, alongside=ARGV)`` also runs the command ``ARGV`` (``cli(...)``), side
    by side with the straight run where that still has to be trained (``run_many``), and
    returns ``(folder, the command's Ran)``: for a test whose own first run does not depend on
    the reference."""
    done: dict[tuple[int, str], Path] = {}

    def get(world: int, loader: str, alongside: Optional[Sequence[str]] = None):
        ran = None
        if (world, loader) not in done:
            out = tmp_path_factory.mktemp(f"straight-w{world}-{loader}") / "run"
            args = seed_run_args(mnist_root, out, loader)
            cmd = cli(*args) if world == 1 else torchrun(world, *args)
            proc, *rest = run_many([cmd] + ([alongside] if alongside is not None else []))
            assert proc.returncode == 0, proc
            done[(world, loader)] = out
            ran = rest[0] if rest else None
        elif alongside is not None:
            (ran,) = run_many([alongside])
        return done[(world, loader)] if alongside is None else (done[(world, loader)], ran)
    return get
