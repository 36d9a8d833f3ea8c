"""Checkpoint sets: layout and checksums, keep-K, kills at every point of a write (real SIGKILL
of real gloo ranks), corrupt and hostile sets, the finished-run marker, and SIGTERM to a real
training run (one process, and the torchrun agent of two) resuming bit-identically."""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from largebatch.checkpoint import manager as ckmod
from largebatch.checkpoint import publish as pubmod  # (the rename and the pruning)
from largebatch.checkpoint import (Checkpointer, list_sets, load_checkpoint, rank_file,
                                   verify_set)
from largebatch.config import ConfigError
from tests._launch import spawn
from tests.conftest import (assert_same_weights, cli_env, model_weights, REPO, run_cli,
                          run_torchrun)

# ---- a stand-in run part: the checkpointer only needs state_dict / load_state_dict


class FakeTrainer:
    """A few tensors and counters; ``advance`` draws from the torch RNG like a training step."""

    def __init__(self) -> None:
        self.state = SimpleNamespace(step=0)
        self.w = torch.zeros(5)

    def advance(self) -> None:
        self.state.step += 1
        self.w = self.w + torch.randn(5)

    def state_dict(self) -> dict:
        return {"step": self.state.step, "w": self.w.clone()}

    def load_state_dict(self, sd: dict) -> None:
        self.state.step = sd["step"]
        self.w = sd["w"]


def _save(ck: Checkpointer, trainer: FakeTrainer) -> None:
    """Save ``trainer`` as the checkpointer's one part, at its step."""
    _bind(ck, trainer)
    ck.save(trainer.state.step, {"epoch": 0, "consumed": trainer.state.step,
                                 "plan": {"global_size": 8}})


def _load(ck: Checkpointer, trainer: FakeTrainer, found) -> None:
    _bind(ck, trainer)
    ck.load(found)


def _bind(ck: Checkpointer, trainer: FakeTrainer) -> None:
    try:
        ck.register("trainer", trainer)
    except ValueError:  # registered already (the same run's part)
        pass


def _single(directory: Path, keep: int = 2) -> Checkpointer:
    return Checkpointer(directory, 0, 1, barrier=lambda: None, keep=keep,
                        config={"optim": {"lr": 0.1}}, verbose=False)


def _saved(directory: Path, steps: int, keep: int = 2) -> tuple[Checkpointer, dict[int, dict]]:
    """Sets for steps 1..steps; returns the checkpointer and each step's saved tensor/draws."""
    ck, trainer, seen = _single(directory, keep), FakeTrainer(), {}
    for _ in range(steps):
        trainer.advance()
        seen[trainer.state.step] = {"w": trainer.w.clone(), "next": _next_draws()}
        _save(ck, trainer)
    return ck, seen


def _next_draws() -> list[float]:
    """The next torch and Python draws, without consuming them."""
    t, p = torch.get_rng_state(), random.getstate()
    draws = torch.rand(3).tolist() + [random.random()]
    torch.set_rng_state(t)
    random.setstate(p)
    return draws


# ---- layout ------------------------------------------------------------------------------------
def test_set_layout_and_manifest_checksums(tmp_path):
    trainer = FakeTrainer()
    for _ in range(120):
        trainer.advance()
    ck = _single(tmp_path)
    _save(ck, trainer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000120"]  # no temp left over
    s = tmp_path / "step-000120"
    assert sorted(p.name for p in s.iterdir()) == ["manifest.json", "rank-00000.pt", "trainer.pt"]
    manifest = json.loads((s / "manifest.json").read_text())
    assert (manifest["step"], manifest["world_size"]) == (120, 1)
    assert manifest["config"] == {"optim": {"lr": 0.1}} and manifest["plan"] == {"global_size": 8}
    for name in ("rank-00000.pt", "trainer.pt"):  # an independent hash of what is on disk
        data = (s / name).read_bytes()
        assert manifest["files"][name] == {"sha256": hashlib.sha256(data).hexdigest(),
                                           "bytes": len(data)}
    saved = torch.load(s / "trainer.pt", weights_only=True)
    assert torch.equal(saved["trainer"]["w"], trainer.w)
    rng = torch.load(s / "rank-00000.pt", weights_only=True)["rng"]
    assert torch.equal(rng["torch"], torch.get_rng_state()) and rng["python"] == random.getstate()


def test_keep_prunes_only_once_the_newer_set_is_complete(tmp_path, monkeypatch):
    complete_at_delete = []
    real_rmtree = shutil.rmtree

    def spy(path, *a, **k):  # what is complete at the moment anything is deleted
        complete_at_delete.append([s.name for s in list_sets(tmp_path)
                                   if _verifies(s.path)])
        real_rmtree(path, *a, **k)
    monkeypatch.setattr(pubmod.shutil, "rmtree", spy)
    _saved(tmp_path, 5, keep=2)
    assert [s.name for s in list_sets(tmp_path)] == ["step-000004", "step-000005"]
    # Each deletion (of steps 1, 2, 3) happened with the two newer sets already complete.
    assert complete_at_delete == [["step-000002", "step-000003"],
                                  ["step-000003", "step-000004"],
                                  ["step-000004", "step-000005"]]


def _verifies(path: Path) -> bool:
    try:
        verify_set(path)
        return True
    except ckmod.CorruptSet:
        return False


# ---- kills at each point of a 2-rank write: real gloo ranks, real SIGKILL ----------------------
def _max_reduce(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _arm_kill(kill: str, rank: int) -> None:
    """SIGKILL this process at one point of writing step 4's set."""
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731
    if kill == "rank1_mid_file" and rank == 1:
        def half_write(path, data):
            with open(path, "wb") as fh:
                fh.write(data[:len(data) // 2])
            die()
        ckmod.write_durable = half_write
    elif kill == "rank0_before_rename" and rank == 0:
        real = os.rename

        def rename(src, dst):
            if Path(src).name == ".step-000004.tmp":
                die()
            real(src, dst)
        pubmod.os.rename = rename
    elif kill == "rank0_mid_prune" and rank == 0:
        def rmtree(path, *a, **k):
            next(Path(path).iterdir()).unlink()  # one file of the old set gone, then death
            die()
        pubmod.shutil.rmtree = rmtree


def _rank_main(rank: int, world: int, directory: str, kill: str, phase: str) -> None:
    """One rank (a ``tests._launch.spawn`` function): write steps 1-4, dying as ``kill`` says,
    or resume from what the write left; what each rank saw and resumed goes to JSON files."""
    torch.manual_seed(100 + rank)  # each rank its own streams: restored per rank
    random.seed(200 + rank)
    ck = Checkpointer(directory, rank, world, dist.barrier, agree=_max_reduce, keep=2,
                      config={"run": 1}, verbose=False)
    trainer, out = FakeTrainer(), Path(directory).parent
    if phase == "write":
        for _ in range(4):
            trainer.advance()
            record = {"w": trainer.w.tolist(), "next": _next_draws()}
            (out / f"seen-r{rank}-s{trainer.state.step}.json").write_text(json.dumps(record))
            if trainer.state.step == 4:
                _arm_kill(kill, rank)
            _save(ck, trainer)
    else:
        found = ck.find("auto")
        _load(ck, trainer, found)
        got = {"step": trainer.state.step, "w": trainer.w.tolist(), "next": _next_draws()}
        (out / f"resumed-r{rank}.json").write_text(json.dumps(got))


@pytest.mark.slow
@pytest.mark.parametrize("kill, resumes_at", [("rank1_mid_file", 3), ("rank0_before_rename", 3),
                                              ("rank0_mid_prune", 4)])
def test_sigkill_during_a_two_rank_write_leaves_a_resumable_set(tmp_path, kill, resumes_at):
    directory = tmp_path / "ck"
    killed = int(kill[len("rank")])  # the rank that _arm_kill kills
    exits = spawn(_rank_main, 2, str(directory), kill, "write", timeout=60, may_die=True)
    assert exits[killed].reason == "killed by SIGKILL", exits
    # the survivor is left in save()'s next barrier with a dead peer: gloo's error, exit 1
    assert exits[1 - killed].reason == "exit code 1", exits
    names = [s.name for s in list_sets(directory)]
    assert names == (["step-000002", "step-000003"] if resumes_at == 3
                     else ["step-000003", "step-000004"])
    assert all(_verifies(directory / n) for n in names)  # what is published is whole
    spawn(_rank_main, 2, str(directory), kill, "resume", timeout=60)
    shared = json.loads((tmp_path / f"seen-r0-s{resumes_at}.json").read_text())["w"]
    for rank in (0, 1):
        got = json.loads((tmp_path / f"resumed-r{rank}.json").read_text())
        seen = json.loads((tmp_path / f"seen-r{rank}-s{resumes_at}.json").read_text())
        assert got["step"] == resumes_at and got["w"] == shared
        assert got["next"] == seen["next"]  # this rank's own RNG streams, exactly
    other = json.loads((tmp_path / f"seen-r1-s{resumes_at}.json").read_text())["next"]
    assert other != json.loads((tmp_path / f"seen-r0-s{resumes_at}.json").read_text())["next"]
    assert not list(directory.glob(".step-*"))  # the dead write's leftovers were cleared


# ---- corrupt and hostile sets ------------------------------------------------------------------
def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "flipped_byte": (lambda s: _flip_byte(s / "trainer.pt"), "trainer.pt"),
    "truncated": (lambda s: (s / "rank-00000.pt").write_bytes(
        (s / "rank-00000.pt").read_bytes()[:100]), "rank-00000.pt"),
    "missing_file": (lambda s: (s / "rank-00000.pt").unlink(), "rank-00000.pt"),
    "bad_manifest": (lambda s: (s / "manifest.json").write_text("{\"format\": 1, \"st"),
                     "manifest.json"),
}


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
def test_corrupt_newest_set_is_named_and_the_previous_one_used(tmp_path, capsys, how):
    _, seen = _saved(tmp_path, 3)
    corrupt, culprit = CORRUPTIONS[how]
    corrupt(tmp_path / "step-000003")
    ck = _single(tmp_path)
    found = ck.find("auto")
    assert found.step == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step-000003" in err[0] and culprit in err[0], err
    trainer = FakeTrainer()
    _load(ck, trainer, found)
    assert trainer.state.step == 2 and torch.equal(trainer.w, seen[2]["w"])
    assert _next_draws() == seen[2]["next"]
    # Nothing deleted: the bad set is renamed out of the way, its files kept for inspection.
    assert (tmp_path / "step-000003.corrupt").is_dir()
    assert [s.name for s in list_sets(tmp_path)] == ["step-000002"]


class Payload:
    """Pickles to a call that would create ``marker``: what a hostile checkpoint carries."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(set_dir: Path, name: str, data: bytes) -> None:
    """Replace ``name`` and re-sign the manifest (the attacker controls the whole set)."""
    (set_dir / name).write_bytes(data)
    manifest = json.loads((set_dir / "manifest.json").read_text())
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (set_dir / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", ["trainer.pt", "rank-00000.pt"])
@pytest.mark.parametrize("fmt", ["torch_zip", "raw_pickle"])
def test_hostile_pickle_is_refused_naming_the_file_and_never_runs(tmp_path, name, fmt):
    marker = tmp_path / "payload_ran"
    _saved(tmp_path / "ck", 1)
    if fmt == "torch_zip":
        buf = io.BytesIO()
        torch.save({"run": Payload(marker)}, buf)
        data = buf.getvalue()
    else:
        data = pickle.dumps(Payload(marker), protocol=2)
    pickle.loads(pickle.dumps(Payload(tmp_path / "control")))  # the payload is live...
    assert (tmp_path / "control").exists()
    set_dir = tmp_path / "ck" / "step-000001"
    _plant(set_dir, name, data)
    ck = _single(tmp_path / "ck")
    found = ck.find("auto")  # checksums match: only the load can tell
    with pytest.raises(ConfigError) as exc:
        _load(ck, FakeTrainer(), found)
    assert str(set_dir / name) in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match="refused"):
        load_checkpoint(set_dir / name)
    assert not marker.exists()  # ...but never ran


# ---- real runs through the CLI -----------------------------------------------------------------
BASE = ["train", "configs/mnist/seed.yaml", "data.subset=1200", "batch.global_size=120",
        "train.epochs=6", "log.progress=false", "schedule.warmup_steps=5",
        "data.test_subset=1000"]  # 60 steps, dropout; 6 evaluations of 1000 test images (fast)


def _args(root, out, *extra):
    return [*BASE, f"data.root={root}", "data.download=false", f"log.out_dir={out}", *extra]


def _train_steps(out: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, mnist_root) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    proc = run_cli(*_args(mnist_root, out, "train.max_steps=6"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_finished_run_relaunched_exits_at_once(finished_run, mnist_root, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    done = json.loads((out / "checkpoints" / "done.json").read_text())
    assert done["step"] == 6 and done["set"] == "step-000006"
    before = {f: (out / f).read_bytes() for f in ("metrics.jsonl", "summary.json")}
    sets = sorted(p.name for p in (out / "checkpoints").iterdir())
    weights = model_weights(out)
    proc = run_cli(*_args(mnist_root, out, "train.max_steps=6"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [l for l in proc.stdout.splitlines() if "finished" in l or "resumed" in l]
    assert lines == [f"largebatch: run already finished at step 6 (max_steps, "
                     f"{out / 'checkpoints' / 'done.json'}); nothing to do"]
    for f, data in before.items():
        assert (out / f).read_bytes() == data, f"{f} changed"  # no step, nothing re-logged
    assert json.loads((out / "summary.json").read_text())["steps"] == 6
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == sets
    assert_same_weights(model_weights(out), weights)


def test_hostile_set_in_a_real_run_is_refused_in_one_line(finished_run, mnist_root, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    marker = tmp_path / "payload_ran"
    buf = io.BytesIO()
    torch.save({"run": Payload(marker)}, buf)
    set_dir = out / "checkpoints" / "step-000006"
    _plant(set_dir, "trainer.pt", buf.getvalue())
    proc = run_cli(*_args(mnist_root, out, "train.max_steps=6"))
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("largebatch: error: checkpoint file "
                                               f"{set_dir / 'trainer.pt'} refused"), err
    assert not marker.exists()


def _wait_for_steps(out: Path, n: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    metrics, deadline = out / "metrics.jsonl", time.time() + timeout
    while not metrics.exists() or metrics.read_text().count('"kind": "train"') < n:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline, "the run never reached its first steps"
        time.sleep(0.02)


def _check_preempted_set(out: Path, world: int) -> int:
    """The pre-empted run's summary step has a complete set, and no done marker."""
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "preempted" and 3 <= summary["steps"] < 60, summary
    step = summary["steps"]
    newest = list_sets(out / "checkpoints")[-1]
    assert newest.name == f"step-{step:06d}"
    info = verify_set(newest.path)
    assert info.world_size == world and info.step == step
    assert set(info.files) == {"trainer.pt", *(rank_file(r) for r in range(world))}
    assert not (out / "checkpoints" / "done.json").exists()
    return step


@pytest.fixture(scope="module")
def straight_single(tmp_path_factory, mnist_root) -> dict:
    out = tmp_path_factory.mktemp("straight1") / "run"
    proc = run_cli(*_args(mnist_root, out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return model_weights(out)


@pytest.mark.slow
def test_sigterm_single_process_checkpoints_then_resumes_exactly(tmp_path, mnist_root,
                                                                  straight_single):
    out = tmp_path / "cut"
    live = subprocess.Popen([sys.executable, "-m", "largebatch", *_args(mnist_root, out)],
                            cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_steps(out, 3, live)
    live.send_signal(signal.SIGTERM)
    _, err = live.communicate(timeout=120)
    assert live.returncode == 0, err[-2000:]
    step = _check_preempted_set(out, world=1)
    resumed = run_cli(*_args(mnist_root, out))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"at step {step}" in resumed.stdout
    assert json.loads((out / "summary.json").read_text())["steps"] == 60
    assert_same_weights(model_weights(out), straight_single)
    assert _train_steps(out) == list(range(1, 61))  # every step exactly once


@pytest.fixture(scope="module")
def straight_two_ranks(tmp_path_factory, mnist_root) -> dict:
    out = tmp_path_factory.mktemp("straight2") / "run"
    proc = run_torchrun(2, *_args(mnist_root, out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return model_weights(out)


@pytest.mark.slow
def test_sigterm_to_the_torchrun_agent_checkpoints_both_ranks_then_resumes_exactly(
        tmp_path, mnist_root, straight_two_ranks):
    out = tmp_path / "cut"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "largebatch", *_args(mnist_root, out)]
    agent = subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    _wait_for_steps(out, 3, agent)
    agent.send_signal(signal.SIGTERM)  # the agent forwards it to both workers
    _, err = agent.communicate(timeout=120)
    # torchrun itself reports the signal (exit 1, "Received 15 death signal"); the workers
    # finished their step, wrote one common set and the summary, and exited cleanly.
    assert "Received 15 death signal" in err, err[-2000:]
    assert "SIGKILL" not in err and "exitcode" not in err, err[-2000:]
    step = _check_preempted_set(out, world=2)
    resumed = run_torchrun(2, *_args(mnist_root, out))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"at step {step}" in resumed.stdout
    assert_same_weights(model_weights(out), straight_two_ranks)
    assert _train_steps(out) == list(range(1, 61))


# ---- which set auto/never/PATH pick ------------------------------------------------------------
def test_auto_refuses_a_set_of_another_config_but_allows_longer_training(tmp_path):
    _saved(tmp_path, 2)
    other = Checkpointer(tmp_path, 0, 1, lambda: None, config={"optim": {"lr": 0.5}})
    with pytest.raises(ConfigError, match=r"another configuration \(optim.lr: 0.1 -> 0.5\)"):
        other.find("auto")
    newer_code = Checkpointer(tmp_path, 0, 1, lambda: None,
                              config={"optim": {"lr": 0.1}, "train": {"new_key": 1}})
    assert newer_code.find("auto").step == 2  # a key only one side knows is not compared
    ckmod.check_same_run({"train": {"max_steps": 6, "epochs": 1.0, "seed": 1},
                          "log": {"out_dir": "a"}},
                         {"train": {"max_steps": 99, "epochs": 3.0, "seed": 1},
                          "log": {"out_dir": "b"}}, tmp_path)  # train longer, log elsewhere
    with pytest.raises(ConfigError, match="train.seed: 1 -> 2"):
        ckmod.check_same_run({"train": {"seed": 1}}, {"train": {"seed": 2}}, tmp_path)


def test_never_refuses_to_start_over_an_earlier_runs_sets(tmp_path):
    _saved(tmp_path, 1)
    with pytest.raises(ConfigError, match=f"checkpoint.resume=never but {tmp_path} holds"):
        _single(tmp_path).find("never")
    assert _single(tmp_path / "fresh").find("never") is None


def test_path_seeds_a_fresh_directory_then_auto_continues_there(tmp_path):
    _, seen = _saved(tmp_path / "old", 3)
    mine = _single(tmp_path / "new")
    src = tmp_path / "old" / "step-000002"
    found = mine.find(str(src))
    assert found.path == src  # an explicit set, not the newest of its directory
    trainer = FakeTrainer()
    _load(mine, trainer, found)
    assert torch.equal(trainer.w, seen[2]["w"])
    assert mine.find(str(tmp_path / "old")).step == 3  # a directory: its newest set
    trainer.advance()
    _save(mine, trainer)  # the run's own first set: from now on PATH is not looked at
    assert mine.find(str(src)).path == tmp_path / "new" / "step-000003"
    with pytest.raises(ConfigError, match="no such checkpoint set or directory"):
        _single(tmp_path / "other").find(str(tmp_path / "nope"))
