"""Hostile configuration: >= 300 invalid configs and overrides, each of which must end in exit 2
with one line ``largebatch: error: ...`` naming the offending key (never a traceback).

Most go through ``largebatch.cli.main([...])`` in this process (fast); a sample goes through a
real ``python -m largebatch plan`` process."""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from largebatch.cli import main
from largebatch.config import Config, choices
from largebatch.config.keys import key_rows
from tests.conftest import CONFIGS, cli, run_many

MLP = str(CONFIGS / "mnist" / "mlp.yaml")
ROWS = key_rows(Config)
NUMERIC = [r.key for r in ROWS if r.type in ("int", "float", "int|null", "float|null")]
FLOATS = [r.key for r in ROWS if r.type.startswith("float")]
INTS = [r.key for r in ROWS if r.type.startswith("int")]
BOOLS = [r.key for r in ROWS if r.type == "bool"]
LISTS = [r.key for r in ROWS if r.type.startswith("list[")]
SECTIONS = sorted({r.key.rsplit(".", 1)[0] for r in ROWS})


def _override_cases() -> list[tuple[list[str], str]]:
    """(overrides on mlp.yaml, the key the one-line error must name)."""
    cases: list[tuple[list[str], str]] = []
    cases += [([f"{k}=abc"], k) for k in NUMERIC + BOOLS]                  # wrong type
    cases += [([f"{k}=[1, 2]"], k) for k in NUMERIC]                       # a list for a number
    cases += [([f"{k}=1.5"], k) for k in INTS]                             # a fraction for an int
    cases += [([f"{k}={v}"], k) for k in FLOATS for v in (".nan", "nan")]  # NaN
    cases += [([f"{k}=abc"], k) for k in LISTS]                            # not a list
    cases += [([f"{k}=bogus"], k) for k in choices()]                       # not a choice
    cases += [([f"{s}.no_such_key=1"], f"{s}.no_such_key") for s in SECTIONS]  # unknown key
    cases += [(["nosection.lr=1"], "nosection"), (["optimiser.lr=0.1"], "optimiser")]
    bad_values = {
        "optim.lr": ("0", "-0.1", ".inf", "-.inf"), "train.epochs": ("0", "-1", ".inf"),
        "log.every_steps": ("0", "-3"), "train.max_steps": ("-1",), "data.subset": ("-5",),
        "train.eval_every_samples": ("-1",), "schedule.warmup_steps": ("-1",),
        "schedule.warmup_epochs": ("-0.5", ".inf"), "optim.weight_decay": ("-1e-4", ".inf"),
        "optim.grad_clip": ("-1", ".inf"), "train.time_budget_s": ("-1",),
        "train.target_acc": ("1.5", "-0.1", ".inf"), "optim.momentum": ("1", "-0.1", "1.5"),
        "engine.zero_stage": ("4", "-1"), "batch.global_size": ("0", "-120"),
        "batch.micro_size": ("0", "-60"), "train.max_loss": ("0", "-1"),
        "data.test_subset": ("-1",), "data.num_workers": ("-1",), "checkpoint.keep": ("0", "-1"),
        "checkpoint.every_steps": ("-1",), "optim.eps": ("-1e-8", ".inf"),
        "optim.betas": ("[0.9]", "[0.9, 1.0]", "[-0.1, 0.9]", "[0.9, .nan]"),
        "engine.expected_world_size": ("-2",), "schedule.total_steps": ("-1",),
    }
    cases += [([f"{k}={v}"], k) for k, vs in bad_values.items() for v in vs]
    cases += [(["batch.global_size=100", "batch.micro_size=60"], "batch.global_size"),
              (["batch.micro_size=7"], "batch.global_size")]  # not divisible
    cases += [(["optim.name=sgd", "optim.betas=[0.8, 0.9]"], "optim.betas"),  # n/a to sgd
              (["optim.name=adamw", "optim.momentum=0", "optim.nesterov=true"], "optim.nesterov"),
              (["optim.name=sgd", "optim.trust_coef=0.01"], "optim.trust_coef")]
    return cases


OVERRIDES = _override_cases()


def _files(tmp: Path) -> list[tuple[list[str], str]]:
    """Config files that cannot be read or parsed: (argv after 'plan', what must be named)."""
    cases = [([str(tmp / "missing.yaml")], "missing.yaml")]
    unreadable = tmp / "unreadable.yaml"
    unreadable.write_text("optim:\n  lr: 0.1\n")
    unreadable.chmod(0)
    if os.geteuid() != 0:  # root reads it anyway
        cases.append(([str(unreadable)], "unreadable.yaml"))
    cases.append(([str(unreadable / "below.yaml")], "below.yaml"))  # parent is a file
    cases.append(([str(tmp)], tmp.name))  # a directory
    texts = {"malformed": "optim: [lr: 0.1\n", "tabs": "optim:\n\tlr: 0.1\n",
             "tag": "optim: !!python/object/apply:os.system ['true']\n",
             "tag2": "optim:\n  lr: !!python/name:os.getcwd\n", "custom_tag": "optim: !mine 1\n",
             "list_top": "- 1\n- 2\n", "scalar_top": "42\n", "bad_section": "optim: 3\n",
             "dup_unknown": "optim:\n  lr: 0.1\n  lr_typo: 2\n", "binary": "\x00\x01\x02"}
    # What the error must name: the file, or the key when the YAML parses but is wrong.
    named = {"bad_section": "optim", "dup_unknown": "optim.lr_typo"}
    for name, text in texts.items():
        f = tmp / f"{name}.yaml"
        f.write_text(text)
        cases.append(([str(f)], named.get(name, f"{name}.yaml")))
    return cases


def _check_one_line(code, err: str, key: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, (code, err[-500:])
    assert len(lines) == 1, err[-1500:]
    assert lines[0].startswith("largebatch: error: ") and key in lines[0], lines[0]
    assert "Traceback" not in err


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def test_there_are_at_least_300_cases(tmp_path):
    assert len(OVERRIDES) + len(_files(tmp_path)) >= 300, len(OVERRIDES)


@pytest.mark.parametrize("overrides,key", OVERRIDES, ids=[" ".join(o) for o, _ in OVERRIDES])
def test_invalid_override_is_one_line_naming_the_key(overrides, key, capsys):
    code, err = _cli(["plan", MLP, *overrides, "--world-size", "2"], capsys)
    _check_one_line(code, err, key)


def test_invalid_files_are_one_line_naming_the_file(tmp_path, capsys):
    bad = []
    for argv, name in _files(tmp_path):
        code, err = _cli(["plan", *argv, "--world-size", "1"], capsys)
        try:
            _check_one_line(code, err, name)
        except AssertionError as exc:
            bad.append(f"{argv}: {exc}")
    assert not bad, "\n".join(bad)


def test_a_sample_through_real_processes(tmp_path):
    rng = random.Random(9)
    sample = rng.sample(OVERRIDES, 8)
    files = _files(tmp_path)
    cases = sample + [(f[0], f[1]) for f in files if "tag" in f[1]][:2]
    argvs = [overrides if overrides and overrides[0].endswith(".yaml") else [MLP, *overrides]
             for overrides, _ in cases]
    # Ten independent processes, two at a time (each is mostly the interpreter's start-up).
    procs = run_many([cli("plan", *argv, "--world-size", "2") for argv in argvs], timeout=120)
    for (_, key), proc in zip(cases, procs):
        _check_one_line(proc.returncode, proc.stderr, key)
