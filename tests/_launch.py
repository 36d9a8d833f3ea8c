"""The one launcher of the multi-process tests: real gloo ranks that can neither hang CI nor
fail without saying why.

``spawn(fn, nprocs, *args)`` runs ``fn(rank, world, *args)`` in ``nprocs`` fresh interpreters
(start method ``spawn``) that share one gloo process group, and returns what each rank's ``fn``
returned. Why each piece is there:

* Rendezvous: the parent creates the TCPStore on port 0 and hands its bound port to the ranks,
  so no "free" port is picked and then raced for by another test or process.
* Timeouts: the store and every collective give up after ``timeout`` seconds, each rank dumps
  its Python stacks and exits at that deadline (faulthandler), and the parent kills whatever
  still runs shortly after, so a hang fails the test instead of blocking the suite. The
  deadline counts from the ranks' start, not from their (on shared cores, slow) imports.
* Failure messages name each failed rank with its exit code or signal and the tail of that
  rank's own stdout/stderr: the Python traceback, a C++ ``terminate`` line, faulthandler stacks.
* Teardown: a rank destroys the group and then checks that the group's gloo threads are gone
  before its interpreter shuts down (see ``_teardown``); exit codes are checked.
* Deaths on purpose: a test whose ranks are meant to die (a SIGKILL in the middle of a write)
  passes ``may_die=True`` and gets each rank's ``RankExit`` (how it ended, its result, its
  output) instead of a failure, with the same deadlines, so that it can assert who died how.

Ranks run with ``OMP_NUM_THREADS=1`` (the machine's cores are shared) and the torchrun
variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) set, for code that reads them.
"""
from __future__ import annotations

import contextlib
import faulthandler
import gc
import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, NamedTuple, Optional, overload

import pytest
import torch
import torch.distributed as dist

HOST = "127.0.0.1"
GRACE_S = 10.0  # after a rank fails or the deadline passes: time for the others to report
STARTUP_S = 120.0  # a fresh interpreter importing torch on loaded, shared cores
TAIL_LINES = 60


class RankExit(NamedTuple):
    """How one rank of a ``spawn(..., may_die=True)`` launch ended."""

    reason: Optional[str]
    """None: exit 0 (``fn`` returned, the teardown checked); else what a failure message says
    of the rank: 'killed by SIGKILL', 'exit code 1', 'still running 60 s after the start
    (killed)', ..."""
    result: Any
    """``fn``'s return value where the rank saved one (exit 0), else None."""
    output: str
    """The last ``TAIL_LINES`` lines of the rank's stdout/stderr (tracebacks, stacks)."""


@overload
def spawn(fn: Callable[..., Any], nprocs: int, *args: Any, timeout: float = ...,
          env: Optional[dict[str, str]] = ..., leaks: Optional[str] = ...,
          may_die: Literal[False] = ...) -> list[Any]: ...


@overload
def spawn(fn: Callable[..., Any], nprocs: int, *args: Any, timeout: float = ...,
          env: Optional[dict[str, str]] = ..., leaks: Optional[str] = ...,
          may_die: Literal[True]) -> list[RankExit]: ...


def spawn(fn: Callable[..., Any], nprocs: int, *args: Any, timeout: float = 120.0,
          env: Optional[dict[str, str]] = None, leaks: Optional[str] = None,
          may_die: bool = False) -> list[Any]:
    """Run ``fn(rank, nprocs, *args)`` on ``nprocs`` gloo ranks; fail the test if any rank fails.

    Args:
        fn: a module-level function (pickled by reference into the children).
        nprocs: number of ranks (the world size).
        *args: picklable arguments after ``rank, world``.
        timeout: seconds for the whole launch, and for any single collective or store wait.
        env: extra environment variables for the children (set before they import anything).
        leaks: why ``fn`` leaves the group alive through third-party code that cannot release
            it (DeepSpeed's ZeRO 3). Then the leak check is skipped and each rank ends with
            ``os._exit(0)`` once its result is saved, skipping the interpreter teardown that
            the live threads would race (as largebatch's CLI does). None: the check applies.
        may_die: the ranks are meant to fail (the test kills them): no rank's failure fails the
            test, and each rank's ``RankExit`` is returned for the test to check. Deadlines and
            kills are the same as without it (a peer left blocked on a dead rank gets
            ``GRACE_S``, then is killed), so a launch that should have died but hangs still
            ends, and says so in its ``reason``.

    Returns:
        ``fn``'s return value on each rank, indexed by rank (saved with ``torch.save``); with
        ``may_die``, each rank's ``RankExit``, indexed by rank.
    """
    ctx = multiprocessing.get_context("spawn")
    store = dist.TCPStore(HOST, 0, nprocs, True, timeout=timedelta(seconds=timeout),
                          wait_for_workers=False)
    with tempfile.TemporaryDirectory(prefix="lb-spawn-") as tmp:
        logs = [Path(tmp, f"rank{r}.log") for r in range(nprocs)]
        results = [Path(tmp, f"rank{r}.pt") for r in range(nprocs)]
        procs = []
        try:
            with _child_environment(env):
                for rank in range(nprocs):
                    proc = ctx.Process(target=_child, name=f"rank{rank}",
                                       args=(fn, rank, nprocs, store.port, timeout,
                                             str(results[rank]), leaks, args))
                    with _stdio_to(logs[rank]):
                        proc.start()
                    procs.append(proc)
            outcome = _join(procs, store, timeout)
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.kill()
                    proc.join()
            del store  # stops the store's server thread in this (the pytest) process
        if may_die:
            return [RankExit(outcome[r], _result(results[r]) if outcome[r] is None else None,
                             "\n".join(_tail(logs[r]))) for r in range(nprocs)]
        failed = {r: why for r, why in outcome.items() if why is not None}
        if failed:
            pytest.fail(_report(fn, nprocs, failed, logs), pytrace=False)
        return [torch.load(path, weights_only=False) for path in results]


def _result(path: Path) -> Any:
    """A rank's saved result; None where a rank exited 0 without saving one (``os._exit(0)``
    inside ``fn``), which only a ``may_die`` launch tolerates."""
    return torch.load(path, weights_only=False) if path.exists() else None


def _child(fn: Callable[..., Any], rank: int, world: int, port: int, timeout: float,
           result_path: str, leaks: Optional[str], args: tuple) -> None:
    """One rank: join the group, run ``fn``, save its result, tear down and check the teardown.

    Any failure prints the traceback to this rank's log and exits 1 at once (``os._exit``):
    a broken group's teardown could block, and the failure is already reported.
    """
    faulthandler.enable()  # SIGABRT/SIGSEGV: every thread's Python stack goes to the log
    faulthandler.dump_traceback_later(timeout, exit=True)  # this rank's own deadline
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR=HOST, MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        limit = timedelta(seconds=timeout)
        store = dist.TCPStore(HOST, port, world, False, timeout=limit)
        store.set(f"started/{rank}", "1")  # the parent's clock for this launch starts now
        _preload_before_group()
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=limit)
        del store  # the group holds it; a reference here would outlive the group
        result = fn(rank, world, *args)
        torch.save(result, result_path)
        del result
        _teardown(rank, check=leaks is None)
    except BaseException:  # noqa: BLE001 - report anything, SystemExit included
        traceback.print_exc()
        _flush_and_exit(1)
    faulthandler.cancel_dump_traceback_later()
    if leaks is not None:
        _flush_and_exit(0)


def _flush_and_exit(code: int) -> None:
    """End the rank now, without interpreter teardown (a broken or leaked group's threads)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _preload_before_group() -> None:
    """Import ``torch.distributed.nn.functional`` while no process group exists.

    That module's functions take ``group=group.WORLD`` as *default arguments*, evaluated when
    it is first imported. DDP's constructor imports ``torch._dynamo``, which imports it; inside
    a live group the defaults capture that group, so ``destroy_process_group`` can never free
    it and its gloo threads still run when the interpreter shuts down, the state in which a
    process can abort at exit ("terminate called without an active exception": a C++ thread
    stopped mid-call by finalization). Imported first, the defaults are ``None`` (3 ms).
    """
    import torch.distributed.nn.functional  # noqa: F401


def _teardown(rank: int, check: bool) -> None:
    """Destroy the group, then (``check``) fail if its gloo threads outlive it.

    Threads that outlive the group mean something still holds it; leaving them to interpreter
    teardown is what made runs abort at exit now and then. Here that is a deterministic
    failure naming the cause.
    """
    if dist.is_initialized():
        dist.destroy_process_group()
    if not check:
        return
    # A released group's threads exit asynchronously (e.g. after its last Work is freed): give
    # them up to 5 s; a group something still holds keeps its threads, and fails here.
    deadline = time.monotonic() + 5.0
    while True:
        gc.collect()
        alive = sorted(name for name in _thread_names() if "gloo" in name)
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if alive:
        raise RuntimeError(
            f"rank {rank}: the process group outlived destroy_process_group ({len(alive)} gloo "
            f"threads still run: {', '.join(alive)}); something still references it, and those "
            "threads would meet interpreter teardown")


def _thread_names() -> list[str]:
    """Names of this process's native threads (Linux ``/proc``; empty elsewhere)."""
    names = []
    with contextlib.suppress(OSError):
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError):
                names.append(Path(f"/proc/self/task/{tid}/comm").read_text().strip())
    return names


@contextlib.contextmanager
def _child_environment(extra: Optional[dict[str, str]]) -> Iterator[None]:
    """Children inherit ``os.environ`` as it is when they start: set it for that moment only."""
    wanted = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(extra or {})}
    saved = {key: os.environ.get(key) for key in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _stdio_to(log: Path) -> Iterator[None]:
    """Point fds 1 and 2 at ``log`` while a child starts, so it inherits them from its first
    line on (import errors and C++ messages included); the parent's own fds are restored."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)


def _join(procs: list, store: dist.TCPStore, timeout: float) -> dict[int, Optional[str]]:
    """Wait for every rank; returns rank -> None (exit 0) or why it failed.

    The ``timeout`` counts from when the last rank has started (imports done, store reached),
    which may take up to ``STARTUP_S``. Once a rank fails, the others get ``GRACE_S`` to fail
    on their own (a peer blocked on the dead rank sees its socket close) before they are
    killed; at the deadline everyone left is.
    """
    limit = time.monotonic() + STARTUP_S  # until every rank has started, then the run's
    grace = math.inf  # set once a rank has failed
    started = False
    pending = {proc.sentinel: rank for rank, proc in enumerate(procs)}
    outcome: dict[int, Optional[str]] = {}
    while pending:
        now = time.monotonic()
        if not started and store.check([f"started/{r}" for r in range(len(procs))]):
            started, limit = True, now + timeout + GRACE_S
        if now >= min(limit, grace):
            break
        for sentinel in multiprocessing.connection.wait(list(pending),
                                                        min(limit, grace, now + 0.5) - now):
            rank = pending.pop(sentinel)
            procs[rank].join()
            outcome[rank] = _exit_reason(procs[rank].exitcode)
            if outcome[rank] is not None:
                grace = min(grace, time.monotonic() + GRACE_S)
    for rank in pending.values():
        outcome[rank] = (f"still running {timeout:.0f} s after the start (killed)"
                         if store.check([f"started/{rank}"])
                         else f"not started after {STARTUP_S:.0f} s (killed)")
    return outcome


def _exit_reason(code: Optional[int]) -> Optional[str]:
    """None for exit 0, else 'exit code N' or 'killed by SIGNAME'."""
    if code == 0:
        return None
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def _report(fn: Callable[..., Any], nprocs: int, failed: dict[int, str], logs: list[Path]) -> str:
    """The failure message: which ranks failed how, then each failed rank's output tail."""
    lines = [f"{nprocs}-rank launch of {fn.__module__}.{fn.__qualname__} failed:"]
    lines += [f"  rank {rank}: {why}" for rank, why in sorted(failed.items())]
    for rank in sorted(failed):
        tail = _tail(logs[rank])
        lines += [f"--- rank {rank} output (last {len(tail)} lines) ---", *tail]
    return "\n".join(lines)


def _tail(log: Path) -> list[str]:
    """The last ``TAIL_LINES`` lines a rank wrote (none where it never started writing)."""
    text = log.read_text(errors="replace") if log.exists() else ""
    return text.splitlines()[-TAIL_LINES:]
