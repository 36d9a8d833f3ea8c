"""The project's own sbatch scripts on a real single-node Slurm cluster (slurm/local-cluster.sh).

Needs root and the Slurm daemons (`bash slurm/local-cluster.sh install`, which .ci/run does);
skips with the reason otherwise, or fails with it under ``LARGEBATCH_REQUIRE_SLURM=1`` (which
.ci/run sets). The cluster lives in a private temp dir on free ports, so it never touches
/etc/slurm nor another cluster on the machine.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import torch

from largebatch.dist import detect_launch
from tests.conftest import REPO, cli_env, free_port, skip_unless_required

SCRIPT = REPO / "slurm" / "local-cluster.sh"
REQUIRE = "LARGEBATCH_REQUIRE_SLURM"  # set by .ci/run: there a missing cluster is a failure
MAX_STEPS = 40
JOB_TIMEOUT = 240


@dataclass
class Cluster:
    """A running local cluster: SLURM_CONF and the environment its clients need."""

    conf: str
    env: dict[str, str]

    def run(self, *cmd: str, check: bool = True, **env: str) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster, from the repository root."""
        return subprocess.run(list(cmd), capture_output=True, text=True, timeout=60, cwd=REPO,
                              env={**self.env, **env}, check=check)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Start munged + slurmctld + slurmd; stop them by their pid files at the end."""
    if os.geteuid() != 0:
        skip_unless_required("the local Slurm cluster needs root (slurmd runs jobs as their "
                             "user)", REQUIRE)
    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "munged") if not shutil.which(b)]
    if missing:
        skip_unless_required(f"Slurm not installed ({', '.join(missing)} missing): "
                             f"run `bash slurm/local-cluster.sh install`", REQUIRE)
    # A short path: munged's and slurmd's unix sockets live under it.
    state = tempfile.mkdtemp(prefix="lbslurm-", dir="/tmp")
    env = cli_env(LARGEBATCH_SLURM_DIR=state, LARGEBATCH_SLURM_CTLD_PORT=str(free_port()),
                  LARGEBATCH_SLURM_D_PORT=str(free_port()))
    started = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True,
                             timeout=120, env=env)
    if started.returncode != 0:
        subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, timeout=60, env=env)
        skip_unless_required(f"local Slurm cluster did not start: "
                             f"{started.stderr.strip()[-500:]}", REQUIRE)
    conf = started.stdout.strip().splitlines()[-1].removeprefix("SLURM_CONF=")
    env.update(SLURM_CONF=conf, LARGEBATCH_PYTHON=sys.executable)
    yield Cluster(conf, env)
    subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, timeout=60, env=env)
    shutil.rmtree(state, ignore_errors=True)


def submit(cluster: Cluster, *args: str, **env: str) -> str:
    """sbatch --parsable ...; returns the job id."""
    return cluster.run("sbatch", "--parsable", *args, **env).stdout.strip().split(";")[0]


def job_info(cluster: Cluster, job_id: str) -> dict[str, str]:
    """`scontrol show job` as key -> value (JobState, ExitCode, Restarts, ...)."""
    text = cluster.run("scontrol", "-o", "show", "job", job_id).stdout
    return dict(f.split("=", 1) for f in text.split() if "=" in f)


def wait_job(cluster: Cluster, job_id: str, timeout: float = JOB_TIMEOUT) -> dict[str, str]:
    """Poll squeue until the job has left the queue (sbatch --wait polls slowly)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not cluster.run("squeue", "-h", "-j", job_id, "-o", "%T", check=False).stdout.strip():
            return job_info(cluster, job_id)
        time.sleep(0.5)
    cluster.run("scancel", job_id, check=False)
    raise AssertionError(f"job {job_id} still queued after {timeout} s: {job_info(cluster, job_id)}")


def train_args(mnist_root: Path, out_dir: Path) -> list[str]:
    """seed.yaml at global 60 = micro 30 x 2 tasks, a few steps on the real MNIST."""
    return ["configs/mnist/seed.yaml", f"train.max_steps={MAX_STEPS}", "batch.micro_size=30",
            f"log.out_dir={out_dir}", f"data.root={mnist_root}", "data.download=false",
            "data.test_subset=1000", "log.progress=false"]


def assert_summary(out_dir: Path, log: Path) -> dict:
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["steps"] == MAX_STEPS, log.read_text()[-2000:]
    assert summary["world_size"] == 2
    assert summary["plan"]["global_size"] == 60
    assert (summary["plan"]["micro_size"], summary["plan"]["accum_steps"]) == (30, 1)
    assert math.isfinite(summary["final_val_acc"]) and 0.0 <= summary["final_val_acc"] <= 1.0
    return summary


@dataclass
class Job:
    """A submitted train.sbatch job: its id, the run's out_dir and the job's log file."""

    job_id: str
    out_dir: Path
    log: Path


def test_srun_sets_rank_vars_and_batch_shell_is_one_process(cluster: Cluster, tmp_path: Path):
    dumper = tmp_path / "dump_env.py"
    dumper.write_text("import json, os, sys\njson.dump(dict(os.environ), open(sys.argv[1], 'w'))\n")
    dump = f"{sys.executable} {dumper} {tmp_path}"
    job = submit(cluster, "--ntasks=2", "--output=/dev/null",
                 f"--wrap={dump}/batch.json && srun bash -c '{dump}/step-$SLURM_PROCID.json'")
    assert wait_job(cluster, job)["JobState"] == "COMPLETED"
    batch = detect_launch(json.loads((tmp_path / "batch.json").read_text()))
    # The batch shell has SLURM_PROCID=0 and SLURM_NTASKS=2 but is one process.
    assert (batch.launcher, batch.world_size, batch.rank) == ("none", 1, 0)
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
    for rank in (0, 1):
        env = json.loads((tmp_path / f"step-{rank}.json").read_text())
        assert (env["SLURM_PROCID"], env["SLURM_STEP_NUM_TASKS"], env["SLURM_LOCALID"]) \
            == (str(rank), "2", str(rank))
        denv = detect_launch(env)
        assert (denv.launcher, denv.rank, denv.world_size, denv.local_rank) == ("slurm", rank, 2, rank)
        assert denv.master_addr == host


def test_scripts_pass_sbatch_validation(cluster: Cluster):
    # --test-only: the real sbatch parses every #SBATCH line and checks the request fits.
    for script, args in (("slurm/train.sbatch", ["configs/mnist/seed.yaml"]),
                         ("slurm/study.sbatch", [])):
        proc = cluster.run("sbatch", "--test-only", "--ntasks=1", script, *args, check=False)
        assert proc.returncode == 0 and "to start at" in proc.stderr, proc.stderr


SIGNALLED = [("srun", "USR1"), ("srun", "TERM"), ("torchrun", "USR1"), ("torchrun", "TERM")]
SIGNAL_AT = 5  # training steps logged before the signal: mid-training, not during start-up


@dataclass
class Submitted:
    """A train.sbatch job of the ``jobs`` fixture, and how it went: ``info`` once it has left
    the queue (``scontrol show job``), or ``error`` saying why the fixture gave up on it."""

    job: Job
    signal: str | None = None  # sent with `scancel --batch` once signal_at steps are logged
    signal_at: int = SIGNAL_AT
    signalled: bool = False
    info: dict[str, str] | None = None
    error: str | None = None


@pytest.fixture(scope="module")
def jobs(cluster: Cluster, mnist_root: Path, tmp_path_factory) -> dict:
    """Every train.sbatch job of this module, submitted together and driven to the end at once:
    the uninterrupted torchrun-form job (the reference), the four signalled jobs (each launcher
    form x each signal) and the one-task run without checkpoints.

    The one-node cluster runs one 2-task job at a time (2 CPUs), in submission order: while a
    signalled job waits out its requeue delay (~10-15 s, see slurm/local-cluster.sh) the next
    one trains instead of the cluster idling, and each job is signalled once its own run has
    logged its steps, as one job alone would be. Every job's checks stay with its test.

    Returns ``"reference"``, ``(form, sig)`` and ``"no_checkpoints"`` -> ``Submitted``.
    """
    # key -> (launcher form, tasks, signal, signal_at, extra overrides)
    specs = {"reference": ("torchrun", 2, None, 0, []),
             **{(f, g): (f, 2, g, SIGNAL_AT, []) for f, g in SIGNALLED},
             "no_checkpoints": ("torchrun", 1, "USR1", 3,
                                ["batch.micro_size=60", "checkpoint.resume=never"])}
    out: dict = {}
    for key, (form, tasks, sig, at, extra) in specs.items():
        tmp = tmp_path_factory.mktemp(key if isinstance(key, str) else f"{form}-{sig}")
        env = {"LARGEBATCH_LAUNCH": "srun"} if form == "srun" else {}
        job_id = submit(cluster, f"--ntasks={tasks}", f"--output={tmp}/job-%j.out",
                        "slurm/train.sbatch", *train_args(mnist_root, tmp / "run"), *extra,
                        MASTER_PORT=str(free_port()), **env)
        out[key] = Submitted(Job(job_id, tmp / "run", tmp / f"job-{job_id}.out"), sig, at)
    # Each job may queue behind all the others: JOB_TIMEOUT each, in all.
    deadline = time.monotonic() + JOB_TIMEOUT * len(out)
    pending, next_poll = list(out.values()), 0.0
    while pending:
        for sub in pending:  # every 0.05 s: the signal must land mid-run, not after it
            if (sub.signal and not sub.signalled
                    and _steps_logged(sub.job.out_dir) >= sub.signal_at):
                cluster.run("scancel", "--batch", f"--signal={sub.signal}", sub.job.job_id)
                sub.signalled = True
        if time.monotonic() >= next_poll:  # which jobs have left the queue: one squeue call
            ids = ",".join(sub.job.job_id for sub in pending)
            queued = set(cluster.run("squeue", "-h", "-j", ids, "-o", "%i",
                                     check=False).stdout.split())
            for sub in [sub for sub in pending if sub.job.job_id not in queued]:
                sub.info = job_info(cluster, sub.job.job_id)
                pending.remove(sub)
            next_poll = time.monotonic() + 0.5
        if pending and time.monotonic() > deadline:
            for sub in pending:
                cluster.run("scancel", sub.job.job_id, check=False)
                sub.error = (f"job {sub.job.job_id} still queued after {JOB_TIMEOUT * len(out)} "
                             f"s (signalled: {sub.signalled}): "
                             f"{job_info(cluster, sub.job.job_id)}\n" + _log_tail(sub.job.log))
            break
        time.sleep(0.05)
    return out


def _steps_logged(out_dir: Path) -> int:
    metrics = out_dir / "metrics.jsonl"
    return metrics.read_text().count('"kind": "train"') if metrics.is_file() else 0


def _log_tail(log: Path) -> str:
    return log.read_text()[-3000:] if log.is_file() else f"(no {log})"


def finished(sub: Submitted) -> dict[str, str]:
    """The job's final ``scontrol`` record; fails the test where the fixture gave up on it."""
    assert sub.error is None, sub.error
    assert sub.info is not None
    return sub.info


@pytest.fixture(scope="module")
def torchrun_job(jobs: dict) -> Job:
    """The default form: one srun task per node running torchrun (2 processes), waited for:
    the uninterrupted reference of the signalled jobs."""
    info = finished(jobs["reference"])
    job = jobs["reference"].job
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), _log_tail(job.log)
    return job


def test_train_sbatch_two_tasks_torchrun_form(torchrun_job: Job):
    assert "--nproc_per_node=2" in torchrun_job.log.read_text()
    assert "launch torchrun" in torchrun_job.log.read_text()
    assert_summary(torchrun_job.out_dir, torchrun_job.log)


@pytest.mark.parametrize("form,sig", SIGNALLED)
def test_signal_requeues_and_completes_like_uninterrupted(jobs: dict, torchrun_job: Job,
                                                          form: str, sig: str):
    """Each launcher form (torchrun: one task per node running torchrun; srun: one task per
    rank) x each signal sent to the batch shell once training runs: USR1 is what
    `--signal=B:USR1@90` sends before the time limit, TERM what Slurm sends on pre-emption
    (`scancel --batch --signal` delivers both the same way now). Checkpoint at one step,
    requeue, resume, complete with the uninterrupted job's weights (srun's one task per rank
    trains exactly like torchrun) and every step logged once."""
    sub = jobs[(form, sig)]
    info, job = finished(sub), sub.job
    assert sub.signalled, _log_tail(job.log)
    text = job.log.read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), \
        text[-3000:]
    assert f"SIG{sig}" in text and "requeueing job" in text and "restart 1" in text, text
    # largebatch's side of the hand-off: checkpoint on the signal, resume after the requeue.
    resumed_at = re.search(r"resumed from \S+ at step (\d+)", text)
    assert resumed_at and SIGNAL_AT <= int(resumed_at.group(1)) < MAX_STEPS, text[-3000:]
    records = [json.loads(line) for line in (job.out_dir / "metrics.jsonl").open()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, MAX_STEPS + 1))
    assert_summary(job.out_dir, job.log)
    ref = torch.load(torchrun_job.out_dir / "model.pt", weights_only=True)["model"]
    got = torch.load(job.out_dir / "model.pt", weights_only=True)["model"]
    for key in ref:
        assert torch.equal(got[key], ref[key]), key


def test_run_without_checkpoints_is_not_requeued(jobs: dict):
    """checkpoint.resume=never writes no sets: a signal (USR1 after 3 steps, one task) ends the
    job; requeueing it would restart from step 0 at every time limit (the loop the old script
    had)."""
    sub = jobs["no_checkpoints"]
    info = finished(sub)
    assert sub.signalled, _log_tail(sub.job.log)
    text = sub.job.log.read_text()
    assert info["Restarts"] == "0" and "not requeued (fresh" in text, text[-3000:]
