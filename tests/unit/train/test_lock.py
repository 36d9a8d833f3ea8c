"""One run per output folder: a second run into a folder another process holds stops in one
line naming the folder and the holder's pid, exit 2, having touched nothing (one process and
two torchrun ranks: every rank says it, none waits); the holder's death, SIGKILL included,
frees the folder at once (the kernel drops a ``flock`` with its last descriptor)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from largebatch.train.storage import LOCK_NAME, lock_folder
from tests.conftest import CONFIGS, REPO, cli, cli_env, run_cli, run_many, torchrun

CONFIG = str(CONFIGS / "mnist" / "mlp.yaml")
HOLD = ("import sys, time; from pathlib import Path; "
        "from largebatch.train.storage import lock_folder; "
        "lock_folder(Path(sys.argv[1])); print('locked', flush=True); time.sleep(120)")


def args(root: Path, out: Path, *extra: str) -> list[str]:
    """A 3-step mlp run into ``out``."""
    return ["train", CONFIG, f"data.root={root}", "data.download=false", "data.subset=240",
            "batch.global_size=60", "train.max_steps=3", "log.progress=false",
            f"log.out_dir={out}", *extra]


def hold(folder: Path) -> subprocess.Popen:
    """Another process that takes the lock the way a run does, and keeps it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=REPO, env=cli_env(),
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_stops_in_one_line_and_a_killed_holder_frees_the_folder(
        mnist_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    holder = hold(out)
    try:
        info = json.loads((out / LOCK_NAME).read_text())
        assert (info["pid"], info["host"]) == (holder.pid, socket.gethostname())
        want = f"log.out_dir={out} is in use by another run (pid {holder.pid} on " \
               f"{socket.gethostname()}, since "
        one, two = run_many([cli(*args(mnist_root, out)),
                             torchrun(2, *args(mnist_root, out, "engine.name=ddp"))],
                            timeout=180)
        assert one.returncode == 2, one
        lines = one.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"largebatch: error: {want}"), one
        # Under torchrun every rank learns rank 0's verdict (a broadcast) and says it.
        assert two.returncode != 0, two
        assert two.stderr.count(f"largebatch: error: {want}") == 2, two
        # (torchrun's agent prints its own ChildFailedError traceback; no rank printed one)
        assert "largebatch/" not in two.stderr.replace(f"log.out_dir={out}", ""), two
        # Nothing of either run was written: only the holder's lock file is there.
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    # The holder was killed: no stale lock. A run takes the folder, finishes, and a relaunch
    # (a requeue after it ended) takes it again.
    first = run_cli(*args(mnist_root, out))
    assert first.returncode == 0, first
    again = run_cli(*args(mnist_root, out))
    assert again.returncode == 0 and "run already finished at step 3" in again.stdout, again
    assert json.loads((out / LOCK_NAME).read_text())["pid"] != holder.pid


def test_one_process_may_take_its_own_folder_again_and_releases_it(tmp_path: Path) -> None:
    a, b = lock_folder(tmp_path), lock_folder(tmp_path)  # e.g. the study, train() twice
    a.release()
    probe = [sys.executable, "-c", HOLD.replace("time.sleep(120)", "pass"), str(tmp_path)]
    blocked = subprocess.run(probe, cwd=REPO, env=cli_env(), capture_output=True, text=True)
    assert blocked.returncode == 1 and f"(pid {os.getpid()} on" in blocked.stderr
    b.release()  # the last hold: the lock is free
    free = subprocess.run(probe, cwd=REPO, env=cli_env(), capture_output=True, text=True)
    assert free.returncode == 0 and free.stdout.strip() == "locked", free.stderr
