"""The face study's measurements: verification figures, the head's cost and the adaptive batch.

Pure functions of a run's records and config (unit-testable without training), added to the
row ``measure.convergence_columns`` makes: the final and best verification accuracy and
TAR@FAR on the held-out identities, the Partial FC head's memory per rank and logits per
micro-step (what sampling saves), and for ``batch.adapt=goodput`` the batch it ended at.
"""
from __future__ import annotations

import math
from typing import Any

from largebatch.config import Config
from largebatch.io import json_number
from largebatch.plan import BatchPlan

#: The accuracy each task's target follows when ``train.target_metric`` is empty.
PRIMARY = {"classification": "val_acc", "face": "verification_acc"}
#: The TAR@FAR the face table reports (2,000 held-out pairs resolve FAR 1e-3, not 1e-4).
TAR_KEY = "tar_at_far_1e-3"
FACE_COLUMNS = ["sample_rate", "final_verification_acc", "best_verification_acc",
                "final_verification_std", f"final_{TAR_KEY}", f"best_{TAR_KEY}",
                "head_rows", "fc_memory_mb", "logits_mb", "final_global_size",
                "mean_global_size"]


def primary_metric(cfg: Config) -> str:
    """The metric the run's target follows: ``train.target_metric``, else the task's own."""
    return cfg.train.target_metric or PRIMARY.get(cfg.task.name, "val_acc")


def _best(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return max(finite) if finite else math.nan


def head_cost(cfg: Config, plan: BatchPlan) -> dict[str, Any]:
    """The Partial FC head's rows per window, memory per rank and logits per micro-step (MB),
    as ``largebatch plan`` reports them (``FaceTask.plan_report``)."""
    from largebatch.tasks.face import FaceTask  # lazily: torch and the face head
    head = FaceTask(cfg).plan_report(plan)["face_head"]
    return {"head_rows": head["num_sample"], "fc_memory_mb": head["total_bytes"] / 2 ** 20,
            "logits_mb": head["logits_bytes"] / 2 ** 20}


def batch_path(records: list[dict[str, Any]], plan: BatchPlan) -> dict[str, Any]:
    """The global batch a run ended at and its mean over the run's logged steps
    (the configured one when the plan never changed: only ``batch.adapt`` changes it)."""
    train = sorted((r for r in records if r["kind"] == "train"), key=lambda r: r["step"])
    changes = sorted((r for r in records if r["kind"] == "plan_change"),
                     key=lambda r: r["step"])
    size, sizes, i = plan.global_size, [], 0
    for r in train:  # the size in force at each logged step
        while i < len(changes) and changes[i]["step"] < r["step"]:
            size, i = changes[i]["global_size"], i + 1
        sizes.append(size)
    final = changes[-1]["global_size"] if changes else plan.global_size
    return {"final_global_size": final,
            "mean_global_size": sum(sizes) / len(sizes) if sizes else math.nan}


def face_columns(summary: dict[str, Any], records: list[dict[str, Any]], cfg: Config,
                 plan: BatchPlan) -> dict[str, Any]:
    """The face fields of one convergence run's row (see ``FACE_COLUMNS``)."""
    evals = [r for r in records if r["kind"] == "eval"]
    cols = {"sample_rate": cfg.face.sample_rate,
            "final_verification_acc": json_number(summary, "final_verification_acc"),
            "best_verification_acc": _best([json_number(r, "verification_acc") for r in evals]),
            "final_verification_std": json_number(summary, "final_verification_std"),
            f"final_{TAR_KEY}": json_number(summary, f"final_{TAR_KEY}"),
            f"best_{TAR_KEY}": _best([json_number(r, TAR_KEY) for r in evals])}
    cols.update(head_cost(cfg, plan))
    cols.update(batch_path(records, plan))
    return cols


def face_curve(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Verification accuracy and TAR@FAR along the way: one point per evaluation."""
    return [{"step": r["step"], "epoch": r["epoch"], "samples": r["samples"],
             "time_s": r["time_s"], "verification_acc": json_number(r, "verification_acc"),
             TAR_KEY: json_number(r, TAR_KEY)} for r in records if r["kind"] == "eval"]
