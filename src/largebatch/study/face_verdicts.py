"""The face study's verdicts, each computed from the table's rows (pure functions).

Accuracy is the held-out verification accuracy at the end of the same epoch budget
(``final_verification_acc``). A batch "keeps" the accuracy when it is within ``TOL`` (0.5
point) of the reference: the best accuracy of any fixed-batch arm at a batch <= ``SMALL``.
Each verdict is a ``FaceVerdict``: its answer in one line, the numbers that decided it
(written to study.json, re-derived by the tests) and the lines behind it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from largebatch.study._util import finite
from largebatch.study._util import fmt as _fmt

TOL = 0.005  # "within 0.5 verification point"
SMALL = 512  # the small batches the reference accuracy comes from
GOAL_BATCH = 8192  # the floor: this batch or larger within TOL of the reference
AGREE_FACTOR = 4.0  # noise scale and measurement "agree" within two doublings
NAIVE, RECIPES = "naive", ("linear", "goyal", "lars", "lamb")  # the recipes, by arm name
FIXED = (NAIVE, *RECIPES)  # the fixed-batch arms
PFC_PREFIX = "pfc_"


@dataclass
class FaceVerdict:
    """One question of the face study, answered from the table."""

    key: str
    title: str
    answer: str
    numbers: dict[str, Any] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)


def acc_by_batch(rows: list[dict], arm: str) -> dict[int, float]:
    """{batch: final verification accuracy} of an arm's runs with a finite accuracy."""
    return {r["batch_size"]: r["final_verification_acc"] for r in rows
            if r["arm"] == arm and r.get("status") == "ran"
            and finite(r.get("final_verification_acc"))}


def reference(rows: list[dict]) -> Optional[tuple[float, str, int]]:
    """(accuracy, arm, batch) of the best fixed-batch run at a batch <= SMALL, or None."""
    best = [(acc, arm, b) for arm in FIXED for b, acc in acc_by_batch(rows, arm).items()
            if b <= SMALL]
    return max(best) if best else None


def best_recipe(rows: list[dict]) -> dict[int, tuple[float, str]]:
    """{batch: (accuracy, arm)} of the best recipe (linear, goyal, lars, lamb) at each batch."""
    out: dict[int, tuple[float, str]] = {}
    for arm in RECIPES:
        for b, acc in acc_by_batch(rows, arm).items():
            if b not in out or acc > out[b][0]:
                out[b] = (acc, arm)
    return dict(sorted(out.items()))


def naive_harm(rows: list[dict]) -> FaceVerdict:
    """Where the naive rule starts to lose accuracy against its own smallest batch, and how
    fast (points per doubling from the last batch that kept it to the largest)."""
    v = FaceVerdict("naive_harm", "Where the naive rule starts to lose accuracy", "")
    pts = sorted(acc_by_batch(rows, NAIVE).items())
    v.lines = [f"naive: {', '.join(f'bs {b}: {a:.4f}' for b, a in pts)}"]
    onset = next((i for i, (_, a) in enumerate(pts) if a < pts[0][1] - TOL), None)
    if onset is None:
        v.answer = "not tested: no naive run" if not pts else "no loss within the sweep"
        v.numbers = {"onset_batch": None, "points_per_doubling": None}
        return v
    (b0, a0), (b1, a1) = pts[onset - 1], pts[-1]
    per = 100 * (a0 - a1) / math.log2(b1 / b0)
    v.numbers = {"onset_batch": pts[onset][0], "last_kept_batch": b0,
                 "points_per_doubling": per, "largest_batch": b1, "largest_acc": a1}
    v.answer = (f"loses from bs {pts[onset][0]} (below {pts[0][1] - TOL:.4f}, its bs "
                f"{pts[0][0]} minus {TOL * 100:g} point); {per:.2f} points per doubling from bs "
                f"{b0} ({a0:.4f}) to bs {b1} ({a1:.4f})")
    return v


def recovery(rows: list[dict]) -> FaceVerdict:
    """How much of the naive rule's loss (against its own smallest batch) each recipe
    recovers, at every batch the naive rule lost at: (recipe - naive) / (base - naive)."""
    v = FaceVerdict("recovery", "How much of the harm each recipe recovers", "")
    naive = dict(sorted(acc_by_batch(rows, NAIVE).items()))
    base = next(iter(naive.values()), math.nan)
    lost = [b for b, a in naive.items() if a < base - TOL]
    if not lost:
        v.answer = "not tested: the naive rule lost no accuracy"
        return v
    shares: dict[str, float] = {}
    for arm in RECIPES:
        acc = acc_by_batch(rows, arm)
        per = [(b, (acc[b] - naive[b]) / (base - naive[b])) for b in lost if b in acc]
        if not per:
            continue
        shares[arm] = sum(s for _, s in per) / len(per)
        v.lines.append(f"{arm}: " + ", ".join(f"bs {b}: {s:.0%}" for b, s in per)
                       + f" (mean {shares[arm]:.0%})")
    v.numbers = {"lost_batches": lost, "base": base, "mean_recovered": shares}
    ranked = sorted(shares.items(), key=lambda kv: -kv[1])
    v.answer = ("; ".join(f"{arm} {s:.0%}" for arm, s in ranked) + " of the naive loss "
                f"(to {base:.4f}) on average over bs {', '.join(map(str, lost))}; 100% = back "
                f"to the naive rule's smallest batch, < 0 = worse than naive"
                if ranked else "not tested: no recipe ran at a batch the naive rule lost at")
    return v


def largest_kept(rows: list[dict], ref: float) -> tuple[FaceVerdict, FaceVerdict]:
    """The largest batch the best recipe keeps within TOL, and the issue's goal at GOAL_BATCH."""
    best = best_recipe(rows)
    v = FaceVerdict("largest_kept", f"Largest batch within {TOL * 100:g} point of the best "
                    f"small batch", "")
    v.lines = ["best recipe: " + ", ".join(f"bs {b}: {a:.4f} ({arm})"
                                          for b, (a, arm) in best.items())]
    kept = [b for b, (a, _) in best.items() if a >= ref - TOL]
    top = max(kept) if kept else None
    v.numbers = {"largest_batch": top, "arm": best[top][1] if top else None,
                 "acc": best[top][0] if top else None}
    v.answer = (f"bs {top} ({best[top][1]}, {best[top][0]:.4f} against {ref:.4f})" if top else
                "none: no recipe run is within the tolerance")
    g = FaceVerdict("goal", f"Goal: a batch >= {GOAL_BATCH} within {TOL * 100:g} point", "")
    big = {b: ab for b, ab in best.items() if b >= GOAL_BATCH}
    met = [b for b in big if big[b][0] >= ref - TOL]
    if not big:
        g.answer, g.numbers = f"not tested: no recipe ran at a batch >= {GOAL_BATCH}", {"met": None}
        return v, g
    b = max(met) if met else max(big, key=lambda k: big[k][0])
    gap = 100 * (ref - big[b][0])
    g.numbers = {"met": bool(met), "batch": b, "arm": big[b][1], "gap_points": gap}
    g.answer = (f"{'met' if met else 'NOT met'}: best at bs >= {GOAL_BATCH} is {big[b][1]} at "
                f"bs {b}, {big[b][0]:.4f}, {gap:.2f} points below {ref:.4f}")
    return v, g


def _pfc_row(rows: list[dict], arm: str) -> Optional[dict]:
    return next((r for r in rows if r["arm"] == arm and r.get("status") == "ran"), None)


def pfc_cost(rows: list[dict]) -> FaceVerdict:
    """Partial FC sampling: accuracy lost against time and head memory saved, vs rate 1.0."""
    v = FaceVerdict("pfc", "Partial FC sampling: accuracy against time and memory", "")
    pfc = sorted((r for r in rows if r["arm"].startswith(PFC_PREFIX) and r.get("status") == "ran"),
                 key=lambda r: -r["sample_rate"])
    full = next((r for r in pfc if r["sample_rate"] == 1.0), None)
    if full is None or len(pfc) < 2:
        v.answer = "not tested: needs the sample-rate 1.0 run and a sampled one"
        return v
    parts, per = [], {}
    for r in pfc:
        if r is full:
            continue
        d_acc = 100 * (r["final_verification_acc"] - full["final_verification_acc"])
        t = r["epoch_time_s"] / full["epoch_time_s"]
        mem = r["logits_mb"] / full["logits_mb"]
        per[str(r["sample_rate"])] = {"acc_points": d_acc, "epoch_time_ratio": t,
                                      "logits_ratio": mem,
                                      "fc_memory_ratio": r["fc_memory_mb"] / full["fc_memory_mb"]}
        parts.append(f"rate {r['sample_rate']:g}: {d_acc:+.2f} points, epoch time x{t:.2f}, "
                     f"logits x{mem:.2f} (bs {r['batch_size']})")
    v.numbers = per
    v.answer = "; ".join(parts) + " against rate 1.0"
    return v


def noise_pays(rows: list[dict], ref: float, kept: Optional[int]) -> FaceVerdict:
    """Where B_simple says batches stop paying, against where the accuracy says they do."""
    v = FaceVerdict("noise", "Where the noise scale says batches stop paying", "")
    arm = next((a for a in ("goyal", "lamb", "lars", "linear", NAIVE) if acc_by_batch(rows, a)),
               None)  # the warmup recipe's own B_simple first: the others may diverge
    pts = [r for r in rows if r["arm"] == arm and r.get("status") == "ran"
           and finite(r.get("noise_scale_late"))]
    if not pts:
        v.answer = "not tested: no run measured B_simple"
        return v
    vals = sorted(r["noise_scale_late"] for r in pts)
    b_noise = vals[len(vals) // 2]
    v.lines = [f"{arm}: late B_simple " + ", ".join(f"{_fmt(r['noise_scale_late'])} (bs "
                                                  f"{r['batch_size']})" for r in pts)]
    beyond = [b for b in best_recipe(rows) if kept is None or b > kept]
    measured = min(beyond) if beyond else None  # the first batch the best recipe loses at
    v.numbers = {"arm": arm, "b_simple": b_noise, "measured_stop": measured}
    if measured is None:
        v.answer = (f"B_simple ~{b_noise:.3g} (median late value, arm {arm}); the accuracy kept "
                    f"up at every batch of the sweep, so no measured stop to compare")
        return v
    ratio = max(measured / b_noise, b_noise / measured)
    agree = ratio <= AGREE_FACTOR
    v.numbers["agree"] = agree
    v.answer = (f"B_simple ~{b_noise:.3g} (median late value, arm {arm}); the best recipe first "
                f"loses > {TOL * 100:g} point at bs {measured}: "
                f"{'agree' if agree else 'disagree'} (x{ratio:.1f}, tolerance x{AGREE_FACTOR:g})")
    return v


def face_verdicts(rows: list[dict]) -> list[FaceVerdict]:
    """Every face verdict, in the issue's order (empty when no small-batch reference ran)."""
    ref = reference(rows)
    if ref is None:
        return [FaceVerdict("reference", "Reference", f"not tested: no run at bs <= {SMALL}")]
    acc, arm, b = ref
    head = FaceVerdict("reference", "Reference: best small batch", f"{acc:.4f} ({arm}, bs {b})",
                       {"acc": acc, "arm": arm, "batch": b})
    kept, goal = largest_kept(rows, acc)
    return [head, naive_harm(rows), recovery(rows), kept, goal, pfc_cost(rows),
            noise_pays(rows, acc, kept.numbers["largest_batch"])]
