"""The test harness itself: ``mnist_root`` skips or, where required (CI), fails; the launcher
``tests._launch.spawn`` reports every way a rank can fail and never hangs."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests._launch import GRACE_S, STARTUP_S, RankExit, spawn
from tests.conftest import REPO, _run, cli_env

TINY = "def test_needs_mnist(mnist_root):\n    assert (mnist_root / 'MNIST' / 'raw').is_dir()\n"


def _pytest_tiny(tmp_path: Path, root: Path, require: str | None) -> subprocess.CompletedProcess:
    """pytest on a one-test file using ``mnist_root`` from tests/conftest.py (``-p``)."""
    (tmp_path / "test_tiny.py").write_text(TINY)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # not the repository's addopts
    env = cli_env(LARGEBATCH_DATA_ROOT=str(root), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    env.pop("LARGEBATCH_REQUIRE_DATA", None)
    if require is not None:
        env["LARGEBATCH_REQUIRE_DATA"] = require
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "tests.conftest",
           "-p", "no:cacheprovider", "-c", str(tmp_path / "pytest.ini"),
           "--rootdir", str(tmp_path), str(tmp_path / "test_tiny.py")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=REPO)


def test_missing_mnist_fails_where_required_and_skips_elsewhere(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    failed = _pytest_tiny(tmp_path, empty, require="1")
    assert failed.returncode == 1 and "1 error" in failed.stdout, failed.stdout
    assert f"real MNIST not found in {empty}" in failed.stdout
    assert "LARGEBATCH_REQUIRE_DATA=1" in failed.stdout
    skipped = _pytest_tiny(tmp_path, empty, require="0")  # 0 (or unset): not required
    assert skipped.returncode == 0 and "1 skipped" in skipped.stdout, skipped.stdout
    assert f"real MNIST not found in {empty}" in skipped.stdout  # -rs prints the reason
    present = tmp_path / "present"
    (present / "MNIST" / "raw").mkdir(parents=True)
    (present / "MNIST" / "raw" / "train-images-idx3-ubyte").touch()
    passed = _pytest_tiny(tmp_path, present, require="1")
    assert passed.returncode == 0 and "1 passed" in passed.stdout, passed.stdout


def _gone(pid: int) -> bool:
    """The process has exited (a zombie awaiting its reaper counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


def test_cli_timeout_kills_the_whole_process_group_and_shows_the_output() -> None:
    # A parent that starts a worker (as torchrun does), reports its pid, then both hang.
    script = ("import subprocess, sys, time\n"
              "w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
              "print('worker', w.pid, flush=True)\n"
              "time.sleep(120)\n")
    with pytest.raises(pytest.fail.Exception) as failure:
        _run([sys.executable, "-c", script], timeout=5, env=None)
    message = str(failure.value)
    assert "still running after 5 s (killed)" in message and "--- stderr" in message, message
    pid = int(message.split("worker ", 1)[1].split()[0])
    deadline = time.monotonic() + 10
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(pid), f"worker {pid} survived the timeout"


# ---- the launcher: what the ranks run ---------------------------------------------------------
_KEPT: list = []


def _ddp_after_the_group(rank: int, world: int) -> dict:
    # DDP's constructor imports torch._dynamo, which imported inside a live group bound it to
    # torch.distributed.nn.functional's default arguments: it outlived destroy_process_group
    # and its threads met interpreter teardown (the abort at exit).
    ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 1))
    ddp(torch.ones(1, 2)).sum().backward()
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return {"sum": float(t), "omp": os.environ.get("OMP_NUM_THREADS"), "rank": os.environ["RANK"]}


def _keeps_the_group(rank: int, world: int) -> None:
    _KEPT.append(dist.group.WORLD)


def _raises_on_rank_1(rank: int, world: int) -> None:
    if rank == 1:
        raise ValueError("rank 1 gives up")
    dist.barrier()


def _aborts_on_rank_1(rank: int, world: int) -> None:
    if rank == 1:
        os.abort()
    dist.barrier()


def _hangs_on_rank_0(rank: int, world: int) -> None:
    if rank == 0:
        time.sleep(600)
    dist.barrier()


def _rank_1_is_killed(rank: int, world: int) -> dict:
    # rank 0 makes no collective after the death: its clean exit is deterministic
    if rank == 1:
        print("rank 1: SIGKILL now", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    return {"rank": rank, "world": world}


def _rank_1_is_killed_during_a_barrier(rank: int, world: int) -> None:
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()  # rank 0 waits for a peer that is gone


def _rank_0_raises_and_rank_1_is_killed(rank: int, world: int) -> None:
    if rank == 0:
        raise ValueError("rank 0 gives up")
    os.kill(os.getpid(), signal.SIGKILL)


def test_results_per_rank_and_the_group_is_freed_although_ddp_came_after_it() -> None:
    got = spawn(_ddp_after_the_group, 2, timeout=90)  # the thread check passed on both ranks
    assert got == [{"sum": 3.0, "omp": "1", "rank": "0"}, {"sum": 3.0, "omp": "1", "rank": "1"}]


@pytest.mark.parametrize("fn, expected", [
    (_keeps_the_group, ["rank 0: exit code 1", "outlived destroy_process_group",
                        "pt_gloo_runloop"]),
    (_raises_on_rank_1, ["rank 1: exit code 1", "ValueError: rank 1 gives up",
                         "_raises_on_rank_1"]),
    (_aborts_on_rank_1, ["rank 1: killed by SIGABRT", "Fatal Python error: Aborted",
                         "_aborts_on_rank_1"]),
])
def test_failures_name_the_rank_and_show_its_output(fn, expected: list[str]) -> None:
    with pytest.raises(pytest.fail.Exception) as failure:
        spawn(fn, 2, timeout=60)
    for text in expected:
        assert text in str(failure.value), str(failure.value)


def test_a_hang_fails_at_the_timeout_with_the_stacks() -> None:
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as failure:
        spawn(_hangs_on_rank_0, 2, timeout=10)
    # rank 0 dumps its stacks and exits 10 s after its start (its imports may take long here)
    assert time.monotonic() - start < STARTUP_S + 10 + GRACE_S
    message = str(failure.value)
    assert "rank 0: exit code 1" in message and "Timeout (0:00:10)!" in message, message
    assert "in _hangs_on_rank_0" in message


# ---- the launcher: ranks that are meant to die (may_die) -------------------------------------
def test_may_die_returns_how_each_rank_ended_instead_of_failing() -> None:
    rank0, rank1 = spawn(_rank_1_is_killed, 2, timeout=60, may_die=True)
    assert rank1.reason == "killed by SIGKILL" and rank1.result is None
    assert rank1.output.splitlines() == ["rank 1: SIGKILL now"]  # its own output, all of it
    # the survivor exited 0 through the checked teardown, with its result
    assert rank0 == RankExit(None, {"rank": 0, "world": 2}, "")


def test_may_die_reports_exceptions_as_exits_with_their_traceback() -> None:
    rank0, rank1 = spawn(_rank_0_raises_and_rank_1_is_killed, 2, timeout=60, may_die=True)
    assert (rank0.reason, rank0.result) == ("exit code 1", None)
    assert rank0.output.splitlines()[-1] == "ValueError: rank 0 gives up", rank0.output
    assert "in _rank_0_raises_and_rank_1_is_killed" in rank0.output
    assert (rank1.reason, rank1.result) == ("killed by SIGKILL", None)


def test_may_die_a_peer_blocked_on_the_dead_rank_fails_on_its_own_within_the_grace() -> None:
    start = time.monotonic()
    rank0, rank1 = spawn(_rank_1_is_killed_during_a_barrier, 2, timeout=60, may_die=True)
    # rank 0's barrier sees the dead peer's socket close and raises: its own exit 1 with
    # gloo's error, not its 60 s deadline (faulthandler's "Timeout") nor the parent's kill
    assert rank0.reason == "exit code 1" and "in _rank_1_is_killed_during_a_barrier" in \
        rank0.output, rank0
    last = rank0.output.splitlines()[-1]
    assert last.startswith("RuntimeError: ") and "by peer" in last, rank0.output
    assert "Timeout (" not in rank0.output
    assert rank1.reason == "killed by SIGKILL"
    assert time.monotonic() - start < STARTUP_S + GRACE_S


def test_may_die_still_ends_a_hang_at_the_timeout() -> None:
    start = time.monotonic()
    rank0, rank1 = spawn(_hangs_on_rank_0, 2, timeout=10, may_die=True)
    assert time.monotonic() - start < STARTUP_S + 10 + GRACE_S
    assert rank0.reason == "exit code 1" and "Timeout (0:00:10)!" in rank0.output, rank0
    assert "in _hangs_on_rank_0" in rank0.output
    assert rank1.reason is not None and rank1.result is None  # its barrier never completed
