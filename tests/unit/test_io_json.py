"""Strict JSON everywhere a run writes: a non-finite float is ``null`` beside a sibling
``KEY_nonfinite`` naming it, never the string 'nan' nor a literal NaN, and every reader gets
the number back (files written before the change, with strings, still read)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from largebatch.config import LogConfig
from largebatch.io import json_number, json_safe, json_text, write_json_atomic
from largebatch.metrics import MetricsLogger
from largebatch.plot import eval_metric_names, load_run
from largebatch.study.measure import read_metrics

NAN, INF = float("nan"), float("inf")


def strict(text: str) -> object:
    """``json.loads`` that refuses NaN/Infinity literals (what other languages' parsers do)."""
    def refuse(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def test_nonfinite_values_become_null_with_a_sibling_reason() -> None:
    doc = {"final_loss": NAN, "up": INF, "down": -INF, "ok": 1.5, "n": 3, "flag": True,
           "curve": [1.0, NAN, 2.0, -INF], "inner": {"x": NAN}, "text": "nan"}
    out = json_safe(doc)
    assert out == {"final_loss": None, "final_loss_nonfinite": "nan",
                   "up": None, "up_nonfinite": "inf", "down": None, "down_nonfinite": "-inf",
                   "ok": 1.5, "n": 3, "flag": True,
                   "curve": [1.0, None, 2.0, None], "curve_nonfinite": {"1": "nan", "3": "-inf"},
                   "inner": {"x": None, "x_nonfinite": "nan"}, "text": "nan"}
    assert json_safe(out) == out  # a summary read back and written again is unchanged
    assert strict(json_text(doc)) == out
    assert json_safe(NAN) is None and json_safe([INF]) == [None]  # no key: no sibling


@pytest.mark.parametrize("record, key, want", [
    ({"a": None, "a_nonfinite": "nan"}, "a", NAN),
    ({"a": None, "a_nonfinite": "inf"}, "a", INF),
    ({"a": None, "a_nonfinite": "-inf"}, "a", -INF),
    ({"a": 0.25}, "a", 0.25),
    ({"a": 7}, "a", 7.0),
    ({"a": None}, "a", NAN),  # a null with no reason (e.g. a TAR the set cannot resolve)
    ({}, "a", NAN),
    ({"a": "inf"}, "a", INF),  # a file written before the change
    ({"a": "garbage"}, "a", NAN),
    ({"a": True}, "a", NAN),
])
def test_json_number_reads_back_what_was_written(record: dict, key: str, want: float) -> None:
    got = json_number(record, key)
    assert (math.isnan(got) and math.isnan(want)) or got == want


def test_summary_and_metrics_files_are_strict_json_and_read_back(tmp_path: Path) -> None:
    log = MetricsLogger(LogConfig(out_dir=str(tmp_path), progress=False), True, {})
    log.log({"kind": "train", "step": 1, "loss": 2.0, "lr": 0.1})
    log.log({"kind": "train", "step": 2, "loss": INF, "lr": 0.1})
    log.log({"kind": "eval", "step": 2, "val_acc": NAN, "val_loss": INF})
    log.write_json("summary.json", {"final_val_acc": NAN, "final_val_loss": INF, "steps": 2})
    log.close()
    summary = strict((tmp_path / "summary.json").read_text())
    assert summary == {"final_val_acc": None, "final_val_acc_nonfinite": "nan",
                       "final_val_loss": None, "final_val_loss_nonfinite": "inf", "steps": 2}
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [strict(line) for line in lines]
    assert records[1] == {"kind": "train", "step": 2, "loss": None, "loss_nonfinite": "inf",
                          "lr": 0.1}
    # The study's reader: the infinite loss comes back as inf, not as NaN or a string.
    read = read_metrics(tmp_path)
    assert [json_number(r, "loss") for r in read if r["kind"] == "train"] == [2.0, INF]
    # The plot's reader: eval metrics that are null-with-a-reason are still metrics.
    assert eval_metric_names([load_run(tmp_path, "r")]) == ["val_acc", "val_loss"]


def test_a_file_written_with_strings_before_the_change_still_plots(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text(
        '{"kind": "eval", "step": 1, "val_acc": "nan", "val_loss": 0.5}\n')
    assert eval_metric_names([load_run(tmp_path, "r")]) == ["val_acc", "val_loss"]
    write_json_atomic(tmp_path / "x.json", {"v": -INF})
    assert strict((tmp_path / "x.json").read_text()) == {"v": None, "v_nonfinite": "-inf"}
