"""Every launcher ends in the same `largebatch train`: same plan, same final parameters.

Real processes over gloo on CPU, through the project's own scripts in launch/: torchrun (the
reference), the deepspeed launcher (CPU accelerator), accelerate (its torchrun path with
ACCELERATE_USE_CPU=1), and two torchrun agents as two nodes on one host. With the same seed,
data and world size every launch runs the same DDP arithmetic in the same rank layout, so the
parameters must be bit-identical (the two-node run is held to 1e-6 as the issue states:
the c10d rendezvous may number the two agents either way, and a 2-way sum is commutative).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from largebatch.config import ConfigError, load_config
from largebatch.dist import DistEnv
from largebatch.dist import check_launch
from largebatch.train.build import plan_for
from tests.conftest import REPO, cli_env, free_port, run_cli

MLP = "configs/mnist/mlp.yaml"
MAX_STEPS = 4
TIMEOUT = 240


def _args(mnist_root: Path, out_dir: Path, *extra: str) -> list[str]:
    """The tiny run every launcher starts: 2400 samples, 4 steps of global 240 (2 ranks)."""
    return [MLP, f"data.root={mnist_root}", "data.download=false", "data.subset=2400",
            "data.test_subset=500", f"train.max_steps={MAX_STEPS}", "log.progress=false",
            f"log.out_dir={out_dir}", *extra]


def _env(**extra: str) -> dict[str, str]:
    """One thread per process, this interpreter for the scripts' PYTHON."""
    return cli_env(PYTHON=sys.executable, **extra)


def _run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=REPO)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def _params(out_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(out_dir / "model.pt", weights_only=True)["model"]


def _plan(out_dir: Path) -> dict:
    return json.loads((out_dir / "plan.json").read_text())


def _assert_same_run(out_dir: Path, ref_dir: Path, atol: float = 0.0) -> None:
    """Same plan, world size 2, MAX_STEPS steps, and the reference's parameters."""
    assert _plan(out_dir) == _plan(ref_dir)
    summary = json.loads((out_dir / "summary.json").read_text())
    assert (summary["steps"], summary["world_size"]) == (MAX_STEPS, 2)
    got, ref = _params(out_dir), _params(ref_dir)
    assert got.keys() == ref.keys()
    for key in ref:
        diff = (got[key] - ref[key]).abs().max().item()
        assert diff <= atol, f"{key}: max |diff| {diff} > {atol}"


@pytest.fixture(scope="module")
def reference(mnist_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """torchrun, 2 processes on one node, through launch/torchrun.sh."""
    out = tmp_path_factory.mktemp("launch") / "torchrun"
    proc = _run(["bash", "launch/torchrun.sh", *_args(mnist_root, out)],
                _env(NPROC_PER_NODE="2"))
    _ok(proc)
    return out


def test_torchrun_plan_is_the_configs_plan_at_world_2(reference: Path, mnist_root: Path):
    cfg = load_config(REPO / MLP, [f"data.root={mnist_root}", "data.download=false",
                                   "data.subset=2400"])
    expected = plan_for(cfg, 2).to_json()
    assert _plan(reference) == expected
    assert (expected["global_size"], expected["micro_size"], expected["accum_steps"]) == (240, 60, 2)
    summary = json.loads((reference / "summary.json").read_text())
    assert (summary["steps"], summary["world_size"], summary["engine"]) == (MAX_STEPS, 2, "ddp")


def test_deepspeed_launcher_cpu_matches_torchrun(reference: Path, mnist_root: Path, tmp_path: Path):
    # `deepspeed --num_gpus 2` starts 2 processes with DeepSpeed's CPU accelerator (no GPU).
    # engine.name=ddp: this test is about the launcher; the DeepSpeed engine has its own tests.
    out = tmp_path / "deepspeed"
    proc = _run(["bash", "launch/deepspeed.sh", *_args(mnist_root, out, "engine.name=ddp")],
                _env(NUM_GPUS="2", MASTER_PORT=str(free_port())))
    _ok(proc)
    _assert_same_run(out, reference)


def test_accelerate_cpu_multi_gpu_form_matches_torchrun(reference: Path, mnist_root: Path,
                                                        tmp_path: Path):
    # launch/accelerate.sh runs: ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu
    #   --num_processes 2 --config_file launch/accelerate_cpu.yaml -m largebatch train ...
    out = tmp_path / "accelerate"
    proc = _run(["bash", "launch/accelerate.sh", *_args(mnist_root, out)],
                _env(ACCELERATE_USE_CPU="1", NPROC_PER_NODE="2", MASTER_PORT=str(free_port())))
    _ok(proc)
    _assert_same_run(out, reference)


def test_two_torchrun_agents_as_two_nodes_match_one_node(reference: Path, mnist_root: Path,
                                                         tmp_path: Path):
    out = tmp_path / "two-nodes"
    port = str(free_port())
    procs = []
    for node_rank in (0, 1):
        env = _env(NNODES="2", NODE_RANK=str(node_rank), NPROC_PER_NODE="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RDZV_ID=f"test-{port}")
        procs.append(subprocess.Popen(["bash", "launch/torchrun_multinode.sh",
                                       *_args(mnist_root, out)], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        logs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    _assert_same_run(out, reference, atol=1e-6)


def test_accelerate_cpu_flag_starts_one_process_and_is_refused(mnist_root: Path, tmp_path: Path):
    # `accelerate launch --cpu --num_processes 2` runs its one-process launcher: largebatch
    # must stop in one line (exit 2) instead of training alone with another plan.
    out = tmp_path / "accelerate-cpu"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "largebatch", "train",
           *_args(mnist_root, out)]
    proc = _run(cmd, _env())
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("largebatch: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "accelerate launch started 1 process" in errors[0]
    assert "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu" in errors[0]
    # accelerate re-raises the child's status: the largebatch process itself exited 2.
    assert proc.returncode != 0 and "returned non-zero exit status 2" in proc.stderr
    assert not (out / "metrics.jsonl").exists()


# The environments below are the ones accelerate 1.15 really produced (printed from a child
# of `accelerate launch`), trimmed to the variables that matter.
_ACCEL = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO"}


@pytest.mark.parametrize("env, denv, fragment", [
    ({**_ACCEL, "ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
     DistEnv("none"), "accelerate launch started 1 process"),
    ({"WORLD_SIZE": "4"}, DistEnv("none"), "WORLD_SIZE=4 is set but RANK is not"),
    ({**_ACCEL, "ACCELERATE_USE_CPU": "True"}, DistEnv("none"), None),  # --num_processes 1
    ({**_ACCEL, "RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"},
     DistEnv("torchrun", rank=1, world_size=2), None),  # --multi_gpu: torchrun underneath
    ({"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}, DistEnv("none"), None),  # no launcher
    ({"WORLD_SIZE": "1"}, DistEnv("none"), None),
])
def test_check_launch(env, denv, fragment):
    if fragment is None:
        check_launch(denv, env)
        return
    with pytest.raises(ConfigError, match=fragment):
        check_launch(denv, env)


def test_wandb_online_without_key_fails_in_one_line_before_training(mnist_root: Path,
                                                                    tmp_path: Path):
    home = tmp_path / "home"
    home.mkdir()
    env = _env(HOME=str(home), NETRC=str(home / ".netrc"))
    for key in ("WANDB_API_KEY", "WANDB_MODE"):
        env.pop(key, None)
    out = tmp_path / "wandb"
    proc = run_cli("train", *_args(mnist_root, out, "log.wandb.mode=online"), env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("largebatch: error: log.wandb.mode=online")
    assert "Traceback" not in proc.stderr
    assert not (out / "metrics.jsonl").exists() and not (out / "model.pt").exists()
