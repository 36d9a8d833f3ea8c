"""The command line: plan output, and bad input as one line with exit code 2 (real processes)."""
from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli

SEED = "configs/mnist/seed.yaml"


def test_plan_json_derives_accum():
    proc = run_cli("plan", SEED, "batch.global_size=4096", "batch.micro_size=512",
                   "--world-size", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert (plan["global_size"], plan["micro_size"], plan["accum_steps"], plan["world_size"]) \
        == (4096, 512, 2, 4)
    assert plan["steps_per_epoch"] == -(-60000 // 4096)


def test_plan_text_is_human_readable():
    proc = run_cli("plan", SEED)
    assert proc.returncode == 0
    assert "global 60 = micro 60 x accum 1 x world 1" in proc.stdout


@pytest.mark.parametrize("args, fragment", [
    (["plan", SEED, "batch.global_size=250", "--world-size", "2"],
     "batch.global_size=250 is not divisible by micro_size 60 x world_size 2"),
    (["plan", SEED, "batch.accum_steps=3", "batch.global_size=240"],
     "batch.global_size=240 != micro_size 60 x accum_steps 3 x world_size 1"),
    (["plan", SEED, "optim.nme=sgd"], "unknown config key 'optim.nme'"),
    (["plan", SEED, "train.epochs=two"], "train.epochs: expected a number"),
    (["plan", "configs/nope.yaml"], "config file not found"),
    (["train", SEED, "data.root=/nonexistent", "data.download=false"], "MNIST not found"),
    (["train", SEED, "model.name=resnet"], "model.name='resnet' is not one of"),
])
def test_bad_input_exit_2_one_line(args, fragment):
    proc = run_cli(*args)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert fragment in lines[0]


def test_keys_lists_documented_keys():
    proc = run_cli("keys")
    assert proc.returncode == 0
    assert "batch.global_size" in proc.stdout and "log.wandb.mode" in proc.stdout
