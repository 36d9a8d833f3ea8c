"""Every verification figure of one pair set, as ``largebatch eval`` reports it, and its ROC.

``set_report`` gathers, from the squared distances and labels of a set: the 10-fold accuracy,
its std, every fold's accuracy and threshold (``verification.ten_fold``), TAR at each FAR over
the whole set (``verification.tar_at_far``, honest: None with a note below ``1 / FAR``
impostors), insightface's val@FAR per FAR (``val_far.val_at_far``) and, under ``metrics``,
exactly the figures the training evaluation logs for the set (``verification_metrics``).

``roc`` is the exact ROC of the whole set: one point per distinct distance ``u`` (accept
``dist < u``, as everywhere here) plus ``+inf`` (accept all), so every operating point the
pairs allow is on it; ``write_roc`` saves it as CSV and as a PNG (TAR against FAR, FAR on a
log axis, the reported TAR@FAR points marked).
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from largebatch.face.val_far import val_at_far
from largebatch.face.verification import (FARS, as_numpy, far_resolution_note, tar_at_far,
                                          ten_fold, verification_metrics)


def set_report(dist: torch.Tensor | np.ndarray, issame: torch.Tensor | np.ndarray,
               name: str, fars: Sequence[str] = FARS) -> dict[str, Any]:
    """All figures of one set (JSON-ready: floats, None, lists, strings).

    Args:
        dist: squared L2 distances of the pairs, in pair order.
        issame: whether each pair is genuine.
        name: the set's name (the prefix of its training metrics, e.g. ``lfw``).
        fars: the FARs of TAR@FAR and val@FAR, as decimals (``"1e-3"``).
    """
    d, same = as_numpy(dist, np.float64), as_numpy(issame, np.float64) > 0.5
    tf = ten_fold(d, same)
    impostors = int(np.count_nonzero(~same))
    notes: dict[str, str] = {}
    tars: dict[str, float | None] = {}
    vals: dict[str, dict[str, Any]] = {}
    for far in fars:
        note = far_resolution_note(impostors, far)
        tars[far] = None if note else tar_at_far(d, same, far)
        if note:
            notes[f"tar_at_far_{far}"] = note
        v = val_at_far(d, same, far)
        vals[far] = {"val": v.val, "std": v.std, "far": v.far, "fold_val": list(v.fold_val),
                     "fold_far": list(v.fold_far),
                     "fold_thresholds": list(v.fold_thresholds)}
        if v.note:
            notes[f"val_at_far_{far}"] = v.note
    return {"pairs": len(d), "genuine": len(d) - impostors, "impostors": impostors,
            "acc": tf.acc, "std": tf.std, "threshold": tf.threshold,
            "fold_acc": list(tf.fold_acc), "fold_thresholds": list(tf.fold_thresholds),
            "tar_at_far": tars, "val_at_far": vals, "notes": notes,
            "metrics": verification_metrics(d, same, name)}


def summary_line(name: str, r: dict[str, Any]) -> str:
    """One printed line: ``lfw: acc 0.9950 +- 0.0030 | TAR@FAR 1e-3 0.9870, 1e-4 - | ...``."""
    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"
    tar = ", ".join(f"{far} {num(v)}" for far, v in r["tar_at_far"].items())
    val = ", ".join(f"{far} {num(v['val'])}" + ("" if v["val"] is None else
                                                f" +- {num(v['std'])} (far {v['far']:.2g})")
                    for far, v in r["val_at_far"].items())
    return (f"{name}: acc {r['acc']:.4f} +- {r['std']:.4f} | TAR@FAR {tar} | val@FAR {val} | "
            f"threshold {r['threshold']:.3f} | {r['pairs']} pairs ({r['genuine']} genuine, "
            f"{r['impostors']} impostor)")


def roc(dist: torch.Tensor | np.ndarray, issame: torch.Tensor | np.ndarray
        ) -> dict[str, np.ndarray]:
    """The exact ROC: ``threshold`` (ascending distinct distances, then ``inf``), ``far``,
    ``tar``, ``false_accepts``, ``true_accepts`` of ``accept = dist < threshold``.

    Raises:
        ValueError: no genuine or no impostor pair.
    """
    d, same = as_numpy(dist, np.float64), as_numpy(issame, np.float64) > 0.5
    genuine, impostor = np.sort(d[same]), np.sort(d[~same])
    if len(genuine) == 0 or len(impostor) == 0:
        raise ValueError(f"a ROC needs genuine and impostor pairs (got {len(genuine)} "
                         f"genuine, {len(impostor)} impostor)")
    thresholds = np.append(np.unique(d[np.isfinite(d)]), math.inf)
    fa = np.searchsorted(impostor, thresholds, side="left")  # how many are < t
    ta = np.searchsorted(genuine, thresholds, side="left")
    return {"threshold": thresholds, "far": fa / len(impostor), "tar": ta / len(genuine),
            "false_accepts": fa, "true_accepts": ta}


def write_roc(stem: Path, name: str, curve: dict[str, np.ndarray],
              marks: dict[str, float | None]) -> tuple[Path, Path]:
    """``STEM.csv`` (every ROC point) and ``STEM.png`` (TAR against FAR, log FAR axis).

    Args:
        stem: path without suffix.
        name: the set's name (the figure's title).
        curve: ``roc``'s output.
        marks: FAR -> reported TAR (None: not marked).
    """
    csv_path, png_path = stem.with_suffix(".csv"), stem.with_suffix(".png")
    with open(csv_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        keys = ("threshold", "far", "tar", "false_accepts", "true_accepts")
        writer.writerow(keys)
        for row in zip(*(curve[k].tolist() for k in keys)):
            writer.writerow([repr(float(v)) if isinstance(v, float) else v for v in row])
    import matplotlib
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.5))
    # A log axis cannot show FAR 0: those points (no false accept) sit at its left edge.
    floor = 1.0 / max(1, int(curve["false_accepts"][-1]))
    left = min([floor, *(float(f) for f in marks)]) / 2
    ax.step(np.where(curve["far"] > 0, curve["far"], left), curve["tar"], where="post",
            label="ROC (FAR 0 at the left edge)")
    for far, tar in marks.items():
        if tar is not None:
            ax.plot([float(far)], [tar], "o", label=f"TAR@FAR {far} = {tar:.4f}")
    ax.set_xscale("log")
    ax.set_xlim(left=left, right=1.0)
    ax.set(xlabel="false accept rate", ylabel="true accept rate", title=f"{name}: ROC")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return csv_path, png_path
