"""Storage checked up front and failing clean, with real processes on real filesystems.

Up front: a ``checkpoint.dir`` that is a file, lies under a file, is read-only (a read-only
bind mount) or too small (a 1 MiB tmpfs) is refused before the first step in one line naming
the key and the numbers, exit 2, nothing written (a file size limit, ``RLIMIT_FSIZE``:
``EFBIG`` at the write call, fails the first save: one line, exit 74). Mid-run: a tmpfs filled while the run
saves a set every step ends in one line, exit 74, every earlier set intact, ``status``
resumable from the newest; a relaunch once there is room finishes the run. Two gloo ranks,
one of them out of space: both stop in one line, no rank waits. Mounts need root; where
``mount`` is refused those cases skip (the 2-rank case runs anywhere).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from largebatch.checkpoint import list_sets
from largebatch.checkpoint.store import verify_set
from largebatch.errors import STORAGE_EXIT_CODE
from tests._launch import spawn
from tests.conftest import CONFIGS, cli, run_cli, run_many

CONFIG = str(CONFIGS / "mnist" / "mlp.yaml")
#: The mlp of configs/mnist/mlp.yaml: 784 -> 64 -> 10, float32 (by hand, not from the code).
PARAM_BYTES = (784 * 64 + 64 + 64 * 10 + 10) * 4


def args(root: Path, out: Path, *extra: str) -> list[str]:
    """A 4-step-per-epoch mlp run (240 samples, batch 60) into ``out``."""
    return ["train", CONFIG, f"data.root={root}", "data.download=false", "data.subset=240",
            "batch.global_size=60", "log.progress=false", f"log.out_dir={out}", *extra]


def one_error_line(stderr: str) -> str:
    """The one ``largebatch: error:`` line stderr holds (no traceback, nothing else)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("largebatch: error: "), stderr
    return lines[0]


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator:
    """``mount(kind, size_or_source)`` -> a fresh mount point: a tmpfs of that size, or a
    read-only bind of a folder; all unmounted at the end. Skips where mounting is refused."""
    points: list[Path] = []

    def mount(kind: str, arg: str) -> Path:
        point = tmp_path / f"mnt{len(points)}"
        point.mkdir()
        cmd = (["mount", "-t", "tmpfs", "-o", f"size={arg}", "tmpfs", str(point)]
               if kind == "tmpfs" else ["mount", "--bind", arg, str(point)])
        if shutil.which("mount") is None or subprocess.run(cmd, capture_output=True).returncode:
            pytest.skip(f"cannot mount here ({' '.join(cmd)} refused)")
        points.append(point)
        if kind == "ro":
            subprocess.run(["mount", "-o", "remount,ro,bind", str(point)], check=True)
        return point
    yield mount
    for point in reversed(points):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def test_unusable_folders_are_refused_before_the_first_step(mnist_root: Path, tmp_path: Path,
                                                            mounts) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    source = tmp_path / "ro-source"
    source.mkdir()
    read_only, tiny = mounts("ro", str(source)), mounts("tmpfs", "1m")
    cases = {  # checkpoint.dir (or log.out_dir) -> what the line must say
        "file": (f"checkpoint.dir={blocker}", f"checkpoint.dir={blocker} is a file, not a folder"),
        "under_file": (f"checkpoint.dir={blocker}/ck",
                       f"checkpoint.dir={blocker}/ck cannot be created (Not a directory)"),
        "read_only_existing": (f"checkpoint.dir={read_only}", f"checkpoint.dir={read_only} "
                               "is not writable (Read-only file system)"),
        "out_dir_read_only": (None, f"log.out_dir={read_only}/out cannot be created "
                              "(Read-only file system)"),
        # 3 sets at once (keep 2 + the one being written) x 3 x the parameters' bytes
        "too_small": (f"checkpoint.dir={tiny}", f"checkpoint.dir={tiny} has "
                      f"{shutil.disk_usage(tiny).free / 1e6:.1f} MB free, the run needs about "
                      f"{3 * 3 * PARAM_BYTES / 1e6:.1f} MB"),
    }
    outs = {name: (f"{read_only}/out" if ck is None else tmp_path / name)
            for name, (ck, _) in cases.items()}
    # And a file size limit (RLIMIT_FSIZE, bash's ulimit -f in KiB) below a set's ~0.4 MB,
    # above model.pt's 0.2 MB: the first save's write call fails with EFBIG (Python ignores
    # SIGXFSZ), after the compute: one line, exit 74, nothing published.
    limited = tmp_path / "limited"
    fsize = ["bash", "-c", 'ulimit -f 293 && exec "$@"', "bash",
             *cli(*args(mnist_root, limited, "train.max_steps=3"))]
    *ran, capped = run_many([*(cli(*args(mnist_root, outs[name], *([ck] if ck else [])))
                               for name, (ck, _) in cases.items()), fsize], timeout=120)
    for (name, (_, want)), proc in zip(cases.items(), ran):
        assert proc.returncode == 2, (name, proc)
        line = one_error_line(proc.stderr)
        assert want in line, (name, line)
        out = Path(outs[name])
        assert not (out / "metrics.jsonl").exists() and not (out / "config.json").exists()
    assert "1.0 MB free, the run needs about 1.8 MB" in one_error_line(ran[-1].stderr)
    assert list(tiny.iterdir()) == []  # the probe was removed
    assert capped.returncode == STORAGE_EXIT_CODE, capped
    line = one_error_line(capped.stderr)
    assert "saving the set of step 3 failed on rank 0: File too large" in line, line
    assert list_sets(limited / "checkpoints") == [] and not (limited / "model.pt").exists()
    assert not list((limited / "checkpoints").glob(".step-*"))
    status = run_cli("status", CONFIG, f"log.out_dir={limited}", "--json")
    assert json.loads(status.stdout)["state"] == "fresh"


def _fill_after_first_set(directory: Path, done: threading.Event) -> None:
    """Fill ``directory``'s filesystem to the last byte once its first set exists."""
    while not done.is_set() and not list_sets(directory):
        time.sleep(0.002)
    with open(directory.parent / "filler", "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def test_a_full_disk_mid_run_is_one_line_and_status_tells_the_truth(mnist_root: Path,
                                                                     mounts) -> None:
    disk = mounts("tmpfs", "4m")
    out = disk / "run"
    run_args = args(mnist_root, out, "train.epochs=50", "checkpoint.every_steps=1",
                    "log.every_steps=1000")
    done = threading.Event()
    filler = threading.Thread(target=_fill_after_first_set, args=(out / "checkpoints", done))
    filler.start()
    try:
        failed = run_cli(*run_args, timeout=180)
    finally:
        done.set()
        filler.join()
    assert failed.returncode == STORAGE_EXIT_CODE, failed
    line = one_error_line(failed.stderr)
    assert "No space left on device" in line and "earlier" in line, line
    sets = list_sets(out / "checkpoints")
    assert sets and sets[-1].step < 200  # it stopped mid-run
    for found in sets:  # every complete set left verifies (sha256 of every file)
        assert verify_set(found.path).step == found.step
    assert not list((out / "checkpoints").glob(".step-*"))  # the temp set was removed
    status = run_cli("status", *run_args[1:], "--json")
    assert json.loads(status.stdout) | {"note": ""} == {
        "state": "resumable", "step": sets[-1].step, "set": sets[-1].name, "note": "",
        "dir": str(out / "checkpoints")}
    (out / "filler").unlink()  # room again: the relaunch resumes and finishes
    again = run_cli(*run_args, "checkpoint.every_steps=0", timeout=180)
    assert again.returncode == 0, again
    assert f"resumed from {sets[-1].path} at step {sets[-1].step}" in again.stdout
    status = json.loads(run_cli("status", *run_args[1:], "--json").stdout)
    assert (status["state"], status["step"]) == ("finished", 200)


def _save_twice(rank: int, world: int, directory: str) -> str:
    """Two ranks save step 1, then step 2 with rank 1's write failing (ENOSPC)."""
    import torch.distributed as dist

    from largebatch.checkpoint import Checkpointer
    from largebatch.checkpoint import manager
    from largebatch.errors import StorageError

    class Part:
        def state_dict(self) -> dict:
            return {"x": rank}

    def agree(values: list[float]) -> list[float]:
        import torch
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()
    ck = Checkpointer(directory, rank, world, dist.barrier, agree=agree, keep=3,
                      config={"train": {"seed": 1}})
    ck.register("trainer", Part())
    facts = {"epoch": 0, "consumed": 0, "plan": None}
    ck.save(1, facts)
    real = manager.write_durable

    def full(path: Path, data: bytes) -> None:
        if rank == 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)
    manager.write_durable = full
    try:
        ck.save(2, facts)
    except StorageError as exc:
        return str(exc)
    return "saved"


def test_one_rank_out_of_space_stops_both_ranks_and_keeps_the_earlier_set(
        tmp_path: Path) -> None:
    lines = spawn(_save_twice, 2, str(tmp_path))
    assert "failed on rank 1: No space left on device" in lines[1], lines
    assert "failed on rank 0: another rank's write failed" in lines[0], lines
    assert [s.name for s in list_sets(tmp_path)] == ["step-000001"]
    assert verify_set(tmp_path / "step-000001").world_size == 2
    assert not list(tmp_path.glob(".step-*"))
