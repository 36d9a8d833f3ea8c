"""Faults injected into real runs: exact resume after a checkpoint and after a real SIGKILL
(1 process and 2 torchrun ranks, both loaders, dropout), metrics.jsonl holding every step once,
and non-finite losses (train.nonfinite=skip|stop)."""
from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from largebatch.checkpoint import list_sets, load_checkpoint
from tests._launch import spawn
from tests.conftest import (SEED_RUN_STEPS as STEPS, assert_same_weights, cli, cli_env,
                            model_weights, REPO, run_cli, run_torchrun, seed_run_args as _args)

# The runs here are tests/conftest.py's SEED_RUN (60 steps of the dropout CNN, 10 steps an
# epoch), compared bit for bit with its uninterrupted run: the session fixture
# ``seed_straight`` trains that once per (world size, loader) for this file and
# tests/integration/test_resume.py.


def _records(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def _train_steps(out: Path) -> list[int]:
    return [r["step"] for r in _records(out) if r["kind"] == "train"]


def _launch(world: int, args: list[str], **kw) -> list[str]:
    if world == 1:
        return [sys.executable, "-m", "largebatch", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={world}", "-m", "largebatch", *args]


def _run(world: int, args: list[str]) -> subprocess.CompletedProcess:
    return run_cli(*args) if world == 1 else run_torchrun(world, *args)


def _straight(seed_straight, world: int, loader: str) -> dict:
    """Final weights of the uninterrupted run (trained once per session, see above)."""
    return model_weights(seed_straight(world, loader))


# ---- exact resume, no kill: the DataLoader must not touch the global RNG ---------------------
def test_torch_loader_resume_from_a_mid_run_set_is_bit_identical(tmp_path, seed_straight,
                                                                 mnist_root):
    """Sets every 15 steps; the run is cut back to its step-15 set (as if killed at step 60
    before the closing evaluation): resuming redoes 16..60 with the same dropout masks."""
    out = tmp_path / "run"
    args = _args(mnist_root, out, "torch", "checkpoint.every_steps=15", "checkpoint.keep=5")
    # The checkpointing run does not depend on the reference: side by side with it.
    reference, proc = seed_straight(1, "torch", alongside=cli(*args))
    straight = model_weights(reference)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same_weights(model_weights(out), straight)  # checkpointing itself changes nothing
    ck = out / "checkpoints"
    for s in list_sets(ck)[1:]:
        shutil.rmtree(s.path)
    for f in (ck / "done.json", out / "model.pt", out / "summary.json"):
        f.unlink()
    assert _train_steps(out) == list(range(1, STEPS + 1))
    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "at step 15" in resumed.stdout
    assert_same_weights(model_weights(out), straight)
    # metrics.jsonl: 16..60 were logged by both runs, kept once (the first run's are dropped).
    assert _train_steps(out) == list(range(1, STEPS + 1))
    evals = [r["step"] for r in _records(out) if r["kind"] == "eval"]
    assert evals == list(range(10, STEPS + 1, 10))


# ---- a real SIGKILL at a random step ---------------------------------------------------------
def _wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    metrics, deadline = out / "metrics.jsonl", time.time() + timeout
    while not metrics.exists() or metrics.read_text().count('"kind": "train"') < step:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline, f"the run never reached step {step}"
        time.sleep(0.01)


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once, as a node failure or the OOM killer
    would (nothing runs a handler). torchrun starts its workers in their own sessions, so
    a process-group kill would leave them running."""
    import psutil
    root = psutil.Process(pid)
    procs = [*root.children(recursive=True), root]
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs[:-1], timeout=30)  # not the root: Popen must reap it (its code)


@pytest.mark.slow
# Both world sizes and both loaders, in two runs, not four: each pair shares its uninterrupted
# reference with other tests (the torch-loader resume above; the elastic restart below and
# test_resume.py's SIGUSR1 test).
@pytest.mark.parametrize("world,loader", [(1, "torch"), (2, "memory")])
def test_sigkill_at_a_random_step_then_resume_is_bit_identical(tmp_path, seed_straight,
                                                               mnist_root, world, loader):
    straight = _straight(seed_straight, world, loader)
    kill_at = random.randint(8, STEPS - 5)
    out = tmp_path / "cut"
    args = _args(mnist_root, out, loader, "checkpoint.every_steps=7")
    live = subprocess.Popen(_launch(world, args), cwd=REPO, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_step(out, kill_at, live)
    finally:
        _kill_tree(live.pid)
        live.communicate(timeout=60)
    assert live.returncode == -signal.SIGKILL
    assert not (out / "summary.json").exists()
    logged = _train_steps(out)
    resumed = _run(world, args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    step = int(resumed.stdout.split("at step ")[1].split()[0])
    assert step <= max(logged) and step % 7 == 0, (step, max(logged))
    assert_same_weights(model_weights(out), straight)
    assert _train_steps(out) == list(range(1, STEPS + 1)), f"killed at {max(logged)}"


def _worker_of_rank(root_pid: int, rank: int, timeout: float = 60):
    """The torchrun worker process whose environment says ``RANK=rank``."""
    import psutil
    deadline = time.time() + timeout
    while time.time() < deadline:
        for child in psutil.Process(root_pid).children(recursive=True):
            try:
                env = child.environ()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if env.get("RANK") == str(rank) and env.get("LOCAL_RANK") is not None:
                return child
        time.sleep(0.05)
    raise AssertionError(f"no torchrun worker with RANK={rank}")


@pytest.mark.slow
def test_torchrun_elastic_restart_after_a_rank_is_killed_resumes_exactly(tmp_path,
                                                                        seed_straight,
                                                                        mnist_root):
    """``--max-restarts 1``: one rank SIGKILLed mid-run; torchrun's agent stops the other,
    restarts the group, which resumes from the newest complete set and ends with the
    uninterrupted run's weights (metrics.jsonl: every step once)."""
    straight = _straight(seed_straight, 2, "memory")
    out = tmp_path / "elastic"
    args = _args(mnist_root, out, "memory", "checkpoint.every_steps=7")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--max-restarts=1", "-m", "largebatch", *args]
    live = subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        victim = _worker_of_rank(live.pid, 1)
        _wait_for_step(out, random.randint(10, STEPS - 15), live)
        victim.kill()
        stdout, stderr = live.communicate(timeout=300)
    finally:
        if live.poll() is None:
            _kill_tree(live.pid)
            live.communicate(timeout=60)
    assert live.returncode == 0, stderr[-3000:]
    assert "resumed from" in stdout, stdout[-2000:]  # the restarted group resumed a set
    assert_same_weights(model_weights(out), straight)
    assert _train_steps(out) == list(range(1, STEPS + 1))


# ---- non-finite loss or gradients: train.nonfinite=skip|stop ----------------------------------
class _NanGrad(torch.autograd.Function):
    """Identity forward; the gradient flowing back is ``fill`` (NaN or inf) everywhere."""

    fill = float("nan")

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, _NanGrad.fill)


def _poison(task, bad_window: int, how: str, rank_ok=lambda: True) -> None:
    """Make the task's loss non-finite in the ``bad_window``-th window (1-based), in ``how``:
    'loss' (NaN value, finite gradient), 'grad' (finite value, NaN gradient), 'inf_grad'."""
    real, windows = task.loss, [0]
    begin = task.begin_window

    def counting_begin(labels):
        windows[0] += 1
        return begin(labels)

    def loss(model, x, y):
        out = real(model, x, y)
        if windows[0] != bad_window or not rank_ok():
            return out
        if how == "loss":
            return out + out.detach() * float("nan")
        _NanGrad.fill = float("inf") if how == "inf_grad" else float("nan")
        return _NanGrad.apply(out)
    task.loss, task.begin_window = loss, counting_begin


def _snapshot(trainer) -> dict:
    opt = trainer.engine.optimizer.state_dict()
    return {"params": [p.detach().clone() for p in trainer.model.parameters()],
            "opt": {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()}
                    for k, s in opt["state"].items()},
            "lr": trainer.schedule.lr, "sched": trainer.schedule.state_dict(),
            "step": trainer.state.step, "samples": trainer.state.samples}


def _assert_same_state(a: dict, b: dict) -> None:
    for x, y in zip(a["params"], b["params"]):
        assert torch.equal(x, y)
    assert a["opt"].keys() == b["opt"].keys()
    for k in a["opt"]:
        for n, v in a["opt"][k].items():
            assert torch.equal(v, b["opt"][k][n]) if torch.is_tensor(v) else v == b["opt"][k][n]
    assert (a["lr"], a["sched"], a["step"], a["samples"]) == (b["lr"], b["sched"], b["step"],
                                                              b["samples"])


def _mlp_cfg(root: Path, out: Path, *extra: str):
    from largebatch.config import load_config
    return load_config(REPO / "configs/mnist/mlp.yaml", [
        f"data.root={root}", "data.download=false", "data.subset=960", "data.test_subset=1000",
        "batch.global_size=96",
        "batch.micro_size=48", "train.epochs=1", "train.max_steps=8", "log.progress=false",
        "optim.name=sgd", "optim.momentum=0.9", "optim.lr=0.05", "schedule.warmup_steps=6",
        "train.device=cpu", "engine.name=auto", f"log.out_dir={out}", *extra])


def _train_recording(run, bad_window: int) -> tuple[dict, list[dict]]:
    """Fit ``run``; returns the summary and state snapshots around every window."""
    trainer, snaps = run.trainer, []
    real_step = trainer.train_step

    def step(*a, **kw):
        before = _snapshot(trainer)
        result = real_step(*a, **kw)
        snaps.append({"before": before, "after": _snapshot(trainer), "applied": result[2]})
        return result
    trainer.train_step = step
    from largebatch.train.build import finish_run
    return finish_run(run, trainer.fit(), quiet=True), snaps


@pytest.mark.parametrize("how", ["loss", "grad"])
def test_nonfinite_skip_drops_the_step_and_changes_nothing(tmp_path, mnist_root, how):
    from largebatch.train.build import build_run
    run = build_run(_mlp_cfg(mnist_root, tmp_path / "run", "train.nonfinite=skip"), quiet=True)
    _poison(run.trainer.task, 4, how)
    summary, snaps = _train_recording(run, 4)
    # 9 windows for 8 steps: the 4th left parameters, momentum, LR schedule and counters as
    # they were; the window after it is step 4.
    assert [s["applied"] for s in snaps] == [True] * 3 + [False] + [True] * 5
    bad = snaps[3]
    _assert_same_state(bad["before"], bad["after"])
    # the counters move outside train_step: not after the skip, then again one a window
    assert [s["before"]["step"] for s in snaps] == [0, 1, 2, 3, 3, 4, 5, 6, 7]
    assert snaps[4]["after"]["lr"] != snaps[4]["before"]["lr"]  # still in warmup: it moves
    assert summary["steps"] == 8 and summary["skipped_steps"] == 1
    assert summary["stop_reason"] == "max_steps" and not summary["diverged"]
    recs = _records(tmp_path / "run")
    assert [r["step"] for r in recs if r["kind"] == "train"] == list(range(1, 9))
    skips = [r for r in recs if r["kind"] == "skip"]
    assert len(skips) == 1 and skips[0]["step"] == 3 and skips[0]["skipped_steps"] == 1
    assert [r["skipped_steps"] for r in recs if r["kind"] == "train"] == [0] * 3 + [1] * 5
    for p in run.trainer.model.parameters():
        assert torch.isfinite(p).all()


def test_nonfinite_stop_names_the_step_and_checkpoints_the_last_good_state(tmp_path, mnist_root,
                                                                          capsys):
    from largebatch.train.build import build_run
    out = tmp_path / "run"
    run = build_run(_mlp_cfg(mnist_root, out, "checkpoint.every_steps=100"), quiet=True)
    assert run.cfg.train.nonfinite == "stop"  # the default
    _poison(run.trainer.task, 5, "grad")
    summary, snaps = _train_recording(run, 5)
    lines = [l for l in capsys.readouterr().out.splitlines() if "non-finite" in l]
    assert lines == ["largebatch: non-finite loss or gradients at step 5 (loss nan); stopped "
                     "with the last good state, step 4"], lines
    assert summary["stop_reason"] == "diverged" and summary["diverged"]
    assert summary["steps"] == 4
    recs = _records(out)
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2, 3, 4, 5]
    assert [r for r in recs if r["kind"] == "train"][-1]["applied"] is False
    assert len(snaps) == 5 and not snaps[4]["applied"]
    good = snaps[4]["before"]  # the state after step 4
    assert good["step"] == 4
    _assert_same_state(good, snaps[4]["after"])
    sets = list_sets(out / "checkpoints")
    assert [s.name for s in sets] == ["step-000004"]
    saved = load_checkpoint(sets[0].path / "trainer.pt")["engine"]["model"]
    for (name, w), p in zip(saved.items(), good["params"]):
        assert torch.equal(w, p), name


def test_fp16_scaler_overflow_does_not_advance_schedule_or_step(tmp_path, mnist_root):
    from largebatch.train.build import build_run
    run = build_run(_mlp_cfg(mnist_root, tmp_path / "run", "train.precision=fp16"), quiet=True)
    _poison(run.trainer.task, 3, "inf_grad")
    scaler = run.engine._scaler
    scale0 = scaler.get_scale()
    summary, snaps = _train_recording(run, 3)
    assert [s["applied"] for s in snaps] == [True] * 2 + [False] + [True] * 6
    _assert_same_state(snaps[2]["before"], snaps[2]["after"])
    assert scaler.get_scale() == scale0 / 2  # torch's GradScaler backed off exactly once
    assert [s["before"]["step"] for s in snaps] == [0, 1, 2, 2, 3, 4, 5, 6, 7]
    assert summary["steps"] == 8 and summary["skipped_steps"] == 1


def _two_rank_worker(rank: int, world: int, root: str, out: str) -> dict:
    from largebatch.dist import DistEnv
    from largebatch.train.build import build_run
    run = build_run(_mlp_cfg(Path(root), Path(out), "train.nonfinite=skip"),
                    DistEnv("torchrun", rank=rank, world_size=world, local_rank=rank), quiet=True)
    # Only rank 1's loss is NaN, and its gradient stays finite: nothing but the agreed flag
    # tells rank 0 to drop that step too.
    _poison(run.trainer.task, 4, "loss", rank_ok=lambda: rank == 1)
    summary, snaps = _train_recording(run, 4)
    return {"summary": {k: summary[k] for k in ("steps", "skipped_steps")},
            "applied": [s["applied"] for s in snaps],
            "same": all(torch.equal(a, b) for a, b in zip(snaps[3]["before"]["params"],
                                                           snaps[3]["after"]["params"])),
            "params": [p.detach().clone() for p in run.trainer.model.parameters()]}


@pytest.mark.slow
def test_nonfinite_on_one_rank_is_skipped_by_both(tmp_path, mnist_root):
    r0, r1 = spawn(_two_rank_worker, 2, str(mnist_root), str(tmp_path / "run"), timeout=180)
    for r in (r0, r1):
        assert r["applied"] == [True] * 3 + [False] + [True] * 5
        assert r["summary"] == {"steps": 8, "skipped_steps": 1} and r["same"]
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)  # the ranks never drifted apart


# ---- evaluation: the same number of forward passes on every rank -----------------------------
def test_eval_shards_are_padded_to_equal_batches_counting_each_sample_once(mnist_root):
    from largebatch.config import load_config
    from largebatch.data.loaders import PAD_LABEL, build_eval_loader
    from largebatch.data.mnist import load_mnist_tensors
    cfg = load_config(REPO / "configs/mnist/mlp.yaml", [f"data.root={mnist_root}",
                                                        "data.download=false",
                                                        "data.test_subset=4001"]).data
    images, labels = load_mnist_tensors(cfg, train=False)
    for world in (2, 3, 7):
        loaders = [build_eval_loader(cfg, r, world, torch.device("cpu"), 1000)
                   for r in range(world)]
        batches = [list(l) for l in loaders]
        assert len({len(b) for b in batches}) == 1  # every rank: the same number of passes
        assert len({tuple(len(y) for _, y in b) for b in batches}) == 1
        real = torch.cat([torch.cat([y for _, y in b]) for b in batches])
        assert (real == PAD_LABEL).sum() == (-4001) % world
        assert torch.equal(real[real != PAD_LABEL].sort().values, labels.sort().values)


def _plain_eval(weights: dict, root: Path, n: int) -> tuple[float, float]:
    """Accuracy and mean NLL of ``weights`` over the first ``n`` test images, one process."""
    import torch.nn.functional as F
    from largebatch.config import load_config
    from largebatch.data.mnist import load_mnist_tensors, normalize_uint8
    from largebatch.models import build_model
    cfg = load_config(REPO / "configs/mnist/mlp.yaml", [f"data.root={root}",
                                                        "data.download=false",
                                                        f"data.test_subset={n}"])
    model = build_model(cfg.model)
    model.load_state_dict(weights)
    model.eval()
    images, labels = load_mnist_tensors(cfg.data, train=False)
    with torch.no_grad():
        out = model(normalize_uint8(images)).double()
    return ((out.argmax(1) == labels).double().mean().item(),
            F.nll_loss(out, labels).item())


@pytest.mark.slow
def test_zero3_two_ranks_uneven_test_split_finishes_and_matches_one_process(tmp_path,
                                                                            mnist_root):
    out = tmp_path / "run"
    proc = run_torchrun(2, "train", "configs/mnist/mlp.yaml", f"data.root={mnist_root}",
                        "data.download=false", "data.subset=480", "data.test_subset=4001",
                        "log.progress=false", f"log.out_dir={out}",
                        "engine.name=deepspeed", "engine.zero_stage=3", timeout=300,
                        env=cli_env(TORCH_EXTENSIONS_DIR=str(tmp_path / "ext")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2  # 480 samples, global batch 240
    acc, loss = _plain_eval(model_weights(out), mnist_root, 4001)
    assert abs(summary["final_val_acc"] - acc) <= 1e-6, (summary["final_val_acc"], acc)
    assert abs(summary["final_val_loss"] - loss) <= 1e-6, (summary["final_val_loss"], loss)
