"""Branching from a set (``checkpoint.resume=PATH`` into a fresh directory) says what it does.

Safe differences (LR, momentum, weight decay, schedule length, paths) are applied to the
restored state (every optimizer the schedule drives, the Partial FC head's too) and listed in
one line with where the LR jumps; structural ones (model, optimizer, data, batch, seed) are
refused in one line naming both values; a set at its ``max_steps`` branched into a new
``log.out_dir`` finishes there cleanly. A same-directory resume whose schedule length changed
says where the LR jumps.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from largebatch.checkpoint.branch import Change, check_branch, describe
from largebatch.config import ConfigError, load_config
from tests.conftest import REPO, cli, run_cli, run_many

MLP = REPO / "configs" / "mnist" / "mlp.yaml"
FACE = REPO / "configs" / "face" / "synthetic_tiny.yaml"


def _mlp(root: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.root={root}", "data.download=false", "data.subset=480",
            "data.test_subset=100", "batch.global_size=60", "schedule.name=cosine",
            "log.progress=false", "checkpoint.every_steps=4", "train.device=cpu",
            f"log.out_dir={out}", *extra]


@pytest.fixture(scope="module")
def base(tmp_path_factory, mnist_root) -> tuple[Path, Path]:
    """A finished 8-step cosine run (lr 0.05, momentum 0.9): sets of steps 4 and 8."""
    from largebatch.train.build import train
    out = tmp_path_factory.mktemp("branch") / "base"
    summary = train(load_config(MLP, _mlp(mnist_root, out, "train.epochs=1")), quiet=True)
    assert summary["steps"] == 8
    return out, mnist_root


def _build(root: Path, out: Path, *extra: str, config: Path = MLP):
    from largebatch.train.build import build_run
    return build_run(load_config(config, _mlp(root, out, *extra) if config == MLP
                                 else list(extra)))


def test_branch_applies_safe_changes_and_says_so_in_one_line(base, tmp_path, capsys):
    from largebatch.train.build import finish_run
    src, root = base[0] / "checkpoints", base[1]
    new = tmp_path / "new"
    run = _build(root, new, "optim.lr=0.1", "optim.momentum=0.5", "optim.weight_decay=0.001",
                 "train.epochs=2", f"checkpoint.resume={src}")
    out = capsys.readouterr().out.splitlines()
    said = [line for line in out if line.startswith("branching from")]
    assert said == [f"branching from {src / 'step-000008'}: log.out_dir {base[0]} -> {new}, "
                    f"optim.lr 0.05 -> 0.1, optim.momentum 0.9 -> 0.5, optim.weight_decay "
                    f"0.0 -> 0.001, train.epochs 1.0 -> 2.0 (schedule: cosine over 8 -> 16 "
                    f"steps; LR of step 9 0 -> 0.05)"], out
    groups = [g for o in run.engine.optimizers for g in o.param_groups]
    assert {g["momentum"] for g in groups} == {0.5}
    assert groups[0]["weight_decay"] == 0.001 and groups[0]["lr"] == pytest.approx(0.05)
    assert run.engine.optimizer.state  # the set's momentum buffers are kept
    schedule = run.trainer.schedule
    assert (schedule.peak_lr, schedule.total_steps, run.trainer.plan.base_lr) == (0.1, 16, 0.1)
    assert json.loads((new / "config.json").read_text())["optim"]["momentum"] == 0.5
    summary = finish_run(run, run.trainer.fit(), quiet=True)
    assert summary["steps"] == 16
    done = json.loads((new / "checkpoints" / "done.json").read_text())
    assert done["set"] == "step-000016"


@pytest.mark.parametrize("change, shown", [
    ("model.hidden=32", "model.hidden 64 -> 32"),
    ("optim.name=lars", "optim.name sgd -> lars"),
    ("batch.global_size=120", "batch.global_size 60 -> 120"),
    ("train.seed=2", "train.seed 1 -> 2"),
    ("data.subset=960", "data.subset 480 -> 960")])
def test_branch_refuses_structural_changes_in_one_line(base, tmp_path, change, shown):
    src = base[0] / "checkpoints"
    with pytest.raises(ConfigError) as exc:
        _build(base[1], tmp_path / "new", change, "train.epochs=2", f"checkpoint.resume={src}")
    text = str(exc.value)
    assert text.startswith(f"checkpoint.resume={src / 'step-000008'}: cannot branch: {shown} "
                           f"(the set's model, optimizer, data order or batch would not fit "
                           f"this run)") and "\n" not in text, text


def test_a_finished_set_branched_into_a_new_directory_finishes_there(base, tmp_path):
    src, root = base[0] / "checkpoints" / "step-000008", base[1]
    new = tmp_path / "new"
    proc = run_cli("train", str(MLP), *_mlp(root, new, "train.epochs=1",
                                            f"checkpoint.resume={src}"))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc
    assert f"branching from {src}: log.out_dir {base[0]} -> {new}" in proc.stdout
    assert json.loads((new / "summary.json").read_text())["steps"] == 8
    assert json.loads((new / "checkpoints" / "done.json").read_text())["set"] == "step-000008"
    again, status = run_many([cli("train", str(MLP), *_mlp(root, new, "train.epochs=1",
                                                            f"checkpoint.resume={src}")),
                              cli("status", str(MLP), *_mlp(root, new, "train.epochs=1"))])
    assert status.stdout.startswith("finished at step 8 (step-000008)"), status
    assert again.returncode == 0 and "run already finished at step 8" in again.stdout, again


def test_same_directory_resume_with_a_longer_cosine_says_where_the_lr_jumps(base, tmp_path,
                                                                           capsys):
    out = tmp_path / "same"
    shutil.copytree(base[0], out)
    run = _build(base[1], out, "train.epochs=2")
    said = [line for line in capsys.readouterr().out.splitlines()
            if line.startswith("resumed with")]
    assert said == ["resumed with train.epochs 1.0 -> 2.0 (schedule: cosine over 8 -> 16 "
                    "steps; LR of step 9 0 -> 0.025)"], said
    assert run.trainer.schedule.lr == pytest.approx(0.025)


def test_branch_sets_the_sharded_heads_hyperparameters_too(tmp_path, capsys):
    from largebatch.train.build import train
    face = ["face.num_classes=31", "face.embedding_size=8", "face.samples_per_class=4",
            "face.min_samples_per_class=2", "face.eval_identities=6", "face.eval_pairs=20",
            "face.image_size=8", "model.hidden=16", "batch.global_size=20", "optim.name=sgd",
            "optim.lr=0.01", "optim.momentum=0.9", "optim.weight_decay=0.0005",
            "schedule.warmup_steps=0", "train.epochs=1", "log.progress=false",
            "face.val_targets=[]", "train.device=cpu"]
    first = tmp_path / "first"
    train(load_config(FACE, [*face, "train.max_steps=3", "checkpoint.every_steps=3",
                             f"log.out_dir={first}"]), quiet=True)
    run = _build(Path(), Path(), *face, "train.max_steps=6", "optim.momentum=0.5",
                 "optim.weight_decay=0.001", f"log.out_dir={tmp_path / 'second'}",
                 f"checkpoint.resume={first / 'checkpoints'}", config=FACE)
    assert len(run.engine.optimizers) == 2  # the backbone's and the head's (PartialFCSGD)
    for optimizer in run.engine.optimizers:
        assert optimizer.param_groups[0]["momentum"] == 0.5
        assert optimizer.param_groups[0]["weight_decay"] == 0.001
    said = [line for line in capsys.readouterr().out.splitlines()
            if line.startswith("branching from")]
    assert len(said) == 1 and "optim.momentum 0.9 -> 0.5, optim.weight_decay 0.0005 -> " \
        "0.001, train.max_steps 3 -> 6" in said[0], said


# ---- the rules, key by key ----------------------------------------------------------------
def _cfg(**sections) -> dict:
    base = {"model": {"name": "mlp"}, "optim": {"name": "sgd", "lr": 0.1},
            "batch": {"global_size": 64, "micro_size": 32, "accum_steps": 1},
            "engine": {"name": "auto"}, "train": {"precision": "fp32", "epochs": 1.0},
            "checkpoint": {"resume": "auto"}}
    for section, values in sections.items():
        base[section] = {**base[section], **values}
    return base


@pytest.mark.parametrize("section, values, reshards, refused", [
    ("batch", {"micro_size": 16, "accum_steps": 2}, True, False),
    ("batch", {"micro_size": 16, "accum_steps": 2}, False, True),
    ("batch", {"global_size": 128}, True, True),
    ("engine", {"name": "ddp"}, True, False),
    ("engine", {"name": "deepspeed"}, False, True),
    ("train", {"precision": "bf16"}, False, False),
    ("train", {"precision": "fp16"}, False, True),
    ("checkpoint", {"resume": "/some/set"}, False, False),
    ("optim", {"lr": 0.2}, False, False),
    ("model", {"name": "seed_cnn"}, False, True),
])
def test_structural_rules(section, values, reshards, refused, tmp_path):
    saved, current = _cfg(), _cfg(**{section: values})
    if refused:
        with pytest.raises(ConfigError, match="cannot branch"):
            check_branch(saved, current, tmp_path, reshards)
    else:
        safe = check_branch(saved, current, tmp_path, reshards)
        assert [c.key for c in safe] == [f"{section}.{k}" for k in sorted(values)
                                         if section != "checkpoint"]


def test_the_line_lists_every_safe_change_and_the_schedule_note(tmp_path):
    line = describe(tmp_path, [Change("optim.lr", 0.1, 0.05), Change("train.epochs", 10, 20)],
                    "cosine over 100 -> 200 steps; LR of step 51 0.05 -> 0.0427")
    assert line == (f"branching from {tmp_path}: optim.lr 0.1 -> 0.05, train.epochs 10 -> 20 "
                    f"(schedule: cosine over 100 -> 200 steps; LR of step 51 0.05 -> 0.0427)")
    assert describe(tmp_path, [], "") == f"branching from {tmp_path}: no configuration changes"
