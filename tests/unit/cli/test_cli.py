"""The command line: plan output, and bad input as one line with exit code 2 (real processes)."""
from __future__ import annotations

import json
import re

import pytest

from tests.conftest import cli, cli_env, run_cli, run_many

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


BAD_INPUT = [
    (["plan", SEED, "batch.global_size=250", "--world-size", "2"],
     "batch.global_size=250 is not divisible by micro_size 60 x world_size 2"),
    (["plan", SEED, "batch.accum_steps=3", "batch.global_size=240"],
     "batch.global_size=240 != micro_size 60 x accum_steps 3 x world_size 1"),
    (["plan", SEED, "optim.nme=sgd"], "unknown config key 'optim.nme'"),
    (["plan", SEED, "train.epochs=two"], "train.epochs: expected a number"),
    (["plan", "configs/nope.yaml"], "config file not found"),
    (["train", SEED, "data.root=/nonexistent", "data.download=false"], "MNIST not found"),
    (["train", SEED, "model.name=resnet"], "model.name='resnet' is not one of"),
]


@pytest.fixture(scope="module")
def bad_input_runs() -> dict:
    """Every BAD_INPUT command as a real process, once per module and two at a time (each is
    mostly the interpreter's start-up): argv tuple -> its ``Ran``."""
    procs = run_many([cli(*args) for args, _ in BAD_INPUT])
    return {tuple(args): proc for (args, _), proc in zip(BAD_INPUT, procs)}


@pytest.mark.parametrize("args, fragment", BAD_INPUT)
def test_bad_input_exit_2_one_line(bad_input_runs, args, fragment):
    proc = bad_input_runs[tuple(args)]
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert fragment in lines[0]


def _key_row(stdout: str, key: str) -> list[str]:
    """The table row of ``key``, split into its columns (two or more spaces apart)."""
    # Rows are indented by two spaces, wrapped docs by six (a doc may start with a key name).
    rows = [ln for ln in stdout.splitlines() if re.match(rf"  {re.escape(key)}\s", ln)]
    assert len(rows) == 1, (key, rows)
    return re.split(r"\s{2,}", rows[0].strip())


def test_keys_is_a_table_of_type_default_choices_and_doc():
    proc = run_cli("keys", env=cli_env(COLUMNS="100", LARGEBATCH_DATA_ROOT=""))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert _key_row(out, "optim.name") == ["optim.name", "str", "sgd", "sgd, adamw, lars, lamb"]
    assert _key_row(out, "batch.global_size") == ["batch.global_size", "int|null", "null"]
    assert _key_row(out, "optim.betas") == ["optim.betas", "list[float]", "[0.9, 0.999]"]
    assert _key_row(out, "data.root") == ["data.root", "str", "data"]
    assert _key_row(out, "log.wandb.mode")[2:] == ["disabled", "disabled, offline, online"]
    # The doc is printed under its key, and sections are headed by their docstring.
    lines = out.splitlines()
    i = next(n for n, ln in enumerate(lines) if ln.split()[:1] == ["optim.name"])
    assert "'sgd', 'adamw', 'lars' or 'lamb'" in lines[i + 1]
    assert "optim: Optimizer and learning-rate scaling." in lines
    # Every leaf key has a row; no Python repr leaks (None, dataclass reprs, quotes of lists).
    from largebatch.config import describe
    for key, _, _ in describe():
        _key_row(out, key)
    for leak in ("ArmConfig(", "None", "True", "False", "['"):
        assert leak not in out.replace("'sgd', 'adamw'", ""), leak
    assert max(len(ln) for ln in lines) <= 100


def test_keys_default_follows_data_root_env_and_prefix_filters():
    proc = run_cli("keys", "data", env=cli_env(COLUMNS="100", LARGEBATCH_DATA_ROOT="some/where"))
    assert proc.returncode == 0, proc.stderr
    assert _key_row(proc.stdout, "data.root")[:3] == ["data.root", "str", "some/where"]
    assert "optim.name" not in proc.stdout
    bad = run_cli("keys", "nope")
    assert bad.returncode == 2 and bad.stderr.strip() == \
        "largebatch: error: no config key starts with 'nope' (see `largebatch keys`)"


HELP_COMMANDS = [[], ["train"], ["plan"], ["study"], ["keys"]]


@pytest.fixture(scope="module")
def help_runs() -> dict:
    """``largebatch [COMMAND] --help`` for each of HELP_COMMANDS, once per module and two at a
    time: command tuple -> its ``Ran``."""
    procs = run_many([cli(*command, "--help") for command in HELP_COMMANDS])
    return {tuple(command): proc for command, proc in zip(HELP_COMMANDS, procs)}


@pytest.mark.parametrize("command", HELP_COMMANDS)
def test_help_has_examples(help_runs, command):
    proc = help_runs[tuple(command)]
    assert proc.returncode == 0, proc.stderr
    examples = proc.stdout.split("examples:\n", 1)[1]
    lines = [ln.strip() for ln in examples.splitlines() if ln.strip().startswith("largebatch ")]
    assert lines, proc.stdout
    if command:
        assert all(ln.split()[1] == command[0] for ln in lines), lines
    if command == ["plan"]:  # the plan examples read no data: each must run as printed
        for ln, ran in zip(lines, run_many([cli(*ln.split()[1:]) for ln in lines])):
            assert ran.returncode == 0, (ln, ran.stderr)
