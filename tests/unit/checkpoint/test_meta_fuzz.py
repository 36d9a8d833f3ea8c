"""Metadata fuzzing: manifests, done markers and set files that lie, against real sets.

Every variant starts from a real run folder (two sets of strict stand-in parts written by a
real ``Checkpointer``; for the done-marker variants also ``done.json`` and the final
``model.pt``), breaks one thing in it, and then asks, each under a 5 s alarm:

* ``run_status``: no exception, and the state the variant deserves (``resumable`` from the
  previous good set, ``finished``, ``other_format``, ...);
* ``Checkpointer.find('auto')`` (+ ``load``): the previous good set with the bad one moved to
  ``*.corrupt`` and one warning line naming it, or ONE ``ConfigError`` line, never another
  exception, never a hang.

The variants are generated systematically (a table per field, whole-file damage, the file list,
the done marker, the final weights, the parts inside the files) plus a seeded random batch;
``test_variant_count`` pins how many there are of each kind. A few of them also run as real
``largebatch status`` / ``largebatch train`` processes (``test_meta_fuzz_cli.py``).
"""
from __future__ import annotations

import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from largebatch.checkpoint import run_status
from largebatch.config import ConfigError
from tests.unit.checkpoint._meta_variants import (NEWEST, PAYLOAD_MARK, PREVIOUS, VARIANTS,
                                                  resigned_part, changed)
from tests.unit.checkpoint._sets import Parts, checkpointer, write_run


# ---- running one variant ------------------------------------------------------------------------
class _Alarm:
    """Fail (TimeoutError) if the block runs longer than ``seconds``: a hang is a failure."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __enter__(self) -> None:
        def ring(*_: Any) -> None:
            raise TimeoutError(f"still running after {self.seconds} s")
        self.old = signal.signal(signal.SIGALRM, ring)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc: Any) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self.old)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layouts")
    for name, done in (("running", False), ("finished", True)):
        write_run(root / name, done)
    return {"running": root / "running", "finished": root / "finished"}


STATUS = {"valid": None, "corrupt": ("resumable", 1), "other_format": ("other_format", 2),
          "other_config": ("resumable", 2), "done_ignored": ("resumable", 2),
          "weights_bad": ("resumable", 2), "part_bad": ("resumable", 2),
          "refused": ("resumable", 2)}


def check_variant(run: Path, layout: str, expect: str, capsys: Any) -> str:
    """Status and find/load of a mutated run; returns the outcome seen (for the counts)."""
    ck_dir = run / "checkpoints"
    with _Alarm(5.0):
        status = run_status(ck_dir, run / "model.pt")
    want = STATUS.get(expect) or (("finished" if layout == "finished" else "resumable"), 2)
    if expect != "random":
        assert (status["state"], status["step"]) == want, status
    capsys.readouterr()
    parts = Parts()
    ck = parts.register(checkpointer(ck_dir))
    try:
        with _Alarm(5.0):
            found = ck.find("auto")
            if found is not None:
                ck.load(found)
    except ConfigError as exc:
        assert "\n" not in str(exc) and str(exc), exc
        assert expect in ("other_format", "other_config", "refused", "random"), exc
        assert not list(ck_dir.glob("*.corrupt")), "refused, not moved"
        assert not PAYLOAD_MARK.exists()
        return "config_error"
    assert not PAYLOAD_MARK.exists()
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    step = parts.step_of()
    assert ck.loaded.step == step
    moved = sorted(p.name for p in ck_dir.glob("*.corrupt"))  # the newest set, renamed
    assert moved in ([], [f"{NEWEST}.corrupt"], ["step-000005.corrupt"]), moved
    if expect == "random":  # what status said is what a relaunch does
        assert (status["state"] in ("resumable", "finished")) and status["step"] == step, \
            (status, step)
    else:
        assert step == (1 if expect in ("corrupt", "part_bad") else 2), (expect, step, err)
    assert bool(moved) == (step == 1) and len(err) == (1 if step == 1 else 0), err
    if err:
        assert moved[0][:-len(".corrupt")] in err[0], err
        assert err[0].startswith("largebatch: warning: "), err
        if expect == "part_bad":
            assert "part " in err[0] or "holds " in err[0] or "says " in err[0], err
    return "previous_set" if step == 1 else "newest_set"


@pytest.mark.parametrize("name, layout, mutate, expect", VARIANTS,
                         ids=[v[0] for v in VARIANTS])
def test_variant(name, layout, mutate, expect, layouts, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(layouts[layout], run, symlinks=True)
    mutate(run)
    check_variant(run, layout, expect, capsys)


def test_variant_count():
    counts: dict[str, int] = {}
    for _, _, _, expect in VARIANTS:
        counts[expect] = counts.get(expect, 0) + 1
    assert len(VARIANTS) >= 200, counts
    assert counts == {"corrupt": 168, "other_format": 3, "valid": 20, "other_config": 3,
                      "done_ignored": 59, "weights_bad": 10, "part_bad": 19, "refused": 1,
                      "random": 40}, counts


def test_a_bad_part_with_no_earlier_set_is_one_line(layouts, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(layouts["running"], run)
    shutil.rmtree(run / "checkpoints" / PREVIOUS)
    resigned_part("trainer.pt", lambda o: changed(o, counter=torch.zeros(1)))(run)
    ck = Parts().register(checkpointer(run / "checkpoints"))
    with pytest.raises(ConfigError) as exc:
        ck.load(ck.find("auto"))
    text = str(exc.value)
    assert "\n" not in text and "trainer.pt part 'counter'" in text and \
        "no earlier complete set" in text, text
    assert (run / "checkpoints" / f"{NEWEST}.corrupt").is_dir()
    assert capsys.readouterr().err == ""  # the error is the one line
