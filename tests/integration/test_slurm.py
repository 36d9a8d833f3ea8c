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


def wait_training(metrics: Path, steps: int, job: str, log: Path) -> None:
    """Until the job's run has logged ``steps`` training steps (signal mid-training, not during
    start-up). The job may first queue behind others on the one-node cluster."""
    deadline = time.monotonic() + JOB_TIMEOUT
    while not metrics.is_file() or metrics.read_text().count('"kind": "train"') < steps:
        assert time.monotonic() < deadline, (job, log.is_file() and log.read_text()[-3000:])
        time.sleep(0.05)


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


@pytest.fixture(scope="module")
def torchrun_job(cluster: Cluster, mnist_root: Path, tmp_path_factory) -> Job:
    """The default form: one srun task per node running torchrun (2 processes), waited for:
    the uninterrupted reference of the signalled jobs."""
    tmp = tmp_path_factory.mktemp("torchrun")
    job = submit(cluster, "--ntasks=2", f"--output={tmp}/job-%j.out", "slurm/train.sbatch",
                 *train_args(mnist_root, tmp / "run"), MASTER_PORT=str(free_port()))
    info = wait_job(cluster, job)
    log = tmp / f"job-{job}.out"
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log.read_text()[-3000:]
    return Job(job, tmp / "run", log)


def test_train_sbatch_two_tasks_torchrun_form(torchrun_job: Job):
    assert "--nproc_per_node=2" in torchrun_job.log.read_text()
    assert "launch torchrun" in torchrun_job.log.read_text()
    assert_summary(torchrun_job.out_dir, torchrun_job.log)


def signal_mid_training(cluster: Cluster, mnist_root: Path, tmp: Path, form: str,
                        sig: str) -> Job:
    """Submit ``form`` (torchrun: one task per node running torchrun; srun: one task per
    rank) and send ``sig`` to the batch shell once training runs: USR1 is what
    `--signal=B:USR1@90` sends before the time limit, TERM what Slurm sends on pre-emption
    (`scancel --batch --signal` delivers both the same way now)."""
    env = {"LARGEBATCH_LAUNCH": "srun"} if form == "srun" else {}
    job = submit(cluster, "--ntasks=2", f"--output={tmp}/job-%j.out", "slurm/train.sbatch",
                 *train_args(mnist_root, tmp / "run"), MASTER_PORT=str(free_port()), **env)
    # Signal mid-training (not during start-up): the workers checkpoint at one common step.
    wait_training(tmp / "run" / "metrics.jsonl", 5, job, tmp / f"job-{job}.out")
    cluster.run("scancel", "--batch", f"--signal={sig}", job)
    return Job(job, tmp / "run", tmp / f"job-{job}.out")


@pytest.mark.parametrize("form,sig", [("srun", "USR1"), ("srun", "TERM"),
                                      ("torchrun", "USR1"), ("torchrun", "TERM")])
def test_signal_requeues_and_completes_like_uninterrupted(cluster: Cluster, torchrun_job: Job,
                                                          mnist_root: Path, tmp_path: Path,
                                                          form: str, sig: str):
    """Each launcher form x each signal: checkpoint at one step, requeue, resume, complete
    with the uninterrupted job's weights (srun's one task per rank trains exactly like
    torchrun) and every step logged once."""
    job = signal_mid_training(cluster, mnist_root, tmp_path, form, sig)
    info = wait_job(cluster, job.job_id)
    text = job.log.read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), \
        text[-3000:]
    assert f"SIG{sig}" in text and "requeueing job" in text and "restart 1" in text, text
    # largebatch's side of the hand-off: checkpoint on the signal, resume after the requeue.
    resumed_at = re.search(r"resumed from \S+ at step (\d+)", text)
    assert resumed_at and 5 <= int(resumed_at.group(1)) < MAX_STEPS, text[-3000:]
    records = [json.loads(line) for line in (job.out_dir / "metrics.jsonl").open()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, MAX_STEPS + 1))
    assert_summary(job.out_dir, job.log)
    ref = torch.load(torchrun_job.out_dir / "model.pt", weights_only=True)["model"]
    got = torch.load(job.out_dir / "model.pt", weights_only=True)["model"]
    for key in ref:
        assert torch.equal(got[key], ref[key]), key


def test_run_without_checkpoints_is_not_requeued(cluster: Cluster, mnist_root: Path,
                                                 tmp_path: Path):
    """checkpoint.resume=never writes no sets: a signal ends the job; requeueing it would
    restart from step 0 at every time limit (the loop the old script had)."""
    job = submit(cluster, "--ntasks=1", f"--output={tmp_path}/job-%j.out", "slurm/train.sbatch",
                 *train_args(mnist_root, tmp_path / "run"), "batch.micro_size=60",
                 "checkpoint.resume=never", MASTER_PORT=str(free_port()))
    wait_training(tmp_path / "run" / "metrics.jsonl", 3, job, tmp_path / f"job-{job}.out")
    cluster.run("scancel", "--batch", "--signal=USR1", job)
    info = wait_job(cluster, job)
    text = (tmp_path / f"job-{job}.out").read_text()
    assert info["Restarts"] == "0" and "not requeued (fresh" in text, text[-3000:]
