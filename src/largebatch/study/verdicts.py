"""The study's verdicts: claims A-C judged from the report rows of one run, and where batch
sizes stop paying, judged from the measured gradient noise scale (``stop_paying``).

Pure functions, unit-tested on synthetic rows: a claim is split into parts, each part
"holds", "does not hold" or is "not tested" (e.g. batch 1 is not in a quick sweep), with the
numbers that decided it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from largebatch.study._util import fmt as _fmt
from largebatch.study._util import finite

HOLDS, PARTLY, FAILS, UNTESTED = "holds", "partly holds", "does not hold", "not tested"
BLOW_UP_LOSS = 5 * 2.302585  # a loss 5x chance level (ln 10): one outlier with too large an LR
CHANCE_ACC = 0.2  # a 10-class net that never beats this has collapsed
TIME_TOL = 0.10  # timings within 10% count as "not rising" (noise of a shared CPU)
DATA_DOMINATES = 0.5  # data loading "dominates" at >= 50% of the epoch
MANY_MORE_EPOCHS = 2.0  # "many more epochs": at least this factor over the fastest batch
CLAIM_C_FASTEST = (6, 60)  # the claim's batch-size range of least time to target


@dataclass
class Verdict:
    """One claim, its parts and the overall verdict computed from them."""

    claim: str
    title: str
    statement: str
    parts: list[tuple[str, str, str]] = field(default_factory=list)  # (part, verdict, why)
    extra: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        """holds if every tested part holds, does not hold if none does, else partly."""
        tested = [v for _, v, _ in self.parts if v != UNTESTED]
        if not tested:
            return UNTESTED
        if all(v == HOLDS for v in tested):
            return HOLDS
        if not any(v == HOLDS for v in tested):
            return FAILS
        return PARTLY


def arm_rows(rows: list[dict], arm: str) -> list[dict]:
    """The rows of ``arm`` that ran, by batch size."""
    return sorted((r for r in rows if r["arm"] == arm and r.get("status") == "ran"),
                  key=lambda r: r["batch_size"])


def reference_arm(rows: list[dict]) -> Optional[str]:
    """The arm the claims are about: 'seed' when present, else the first arm."""
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    return "seed" if "seed" in arms else (arms[0] if arms else None)


def _series(rows: list[dict], key: str) -> str:
    return ", ".join(f"{_fmt(r[key])} (bs {r['batch_size']})" for r in rows)


def _first_rise(rows: list[dict], key: str, tol: float) -> Optional[tuple[dict, dict]]:
    for a, b in zip(rows, rows[1:]):
        if b[key] > a[key] * (1 + tol):
            return a, b
    return None


def _epoch_time_part(pts: list[dict], loader: str) -> tuple[str, str, str]:
    e, d = f"{loader}_epoch_time_s", f"{loader}_data_time_s"
    name = f"epoch time falls with the batch until loading dominates ({loader} loader)"
    dom = next((i for i, r in enumerate(pts) if r[d] >= DATA_DOMINATES * r[e]), None)
    region = pts if dom is None else pts[:dom + 1]
    if dom is None:
        r = max(pts, key=lambda r: r[d] / r[e])
        where = (f"loading never dominates (largest share {r[d] / r[e]:.0%} at bs "
                 f"{r['batch_size']})")
    else:
        where = (f"loading dominates from bs {pts[dom]['batch_size']} "
                 f"({pts[dom][d] / pts[dom][e]:.0%} of the epoch)")
        if dom + 1 < len(pts):
            last = pts[-1]
            where += (f"; after that the epoch takes {last[e]:.3g} s at bs {last['batch_size']} "
                      f"({last[e] / pts[dom][e] - 1:+.0%})")
    if len(region) < 2:
        return name, UNTESTED, f"{where}: nothing left to fall. Epoch s: {_series(pts, e)}"
    rise = _first_rise(region, e, TIME_TOL)
    if rise is None and region[-1][e] < region[0][e]:
        why = (f"{region[0][e]:.3g} s at bs {region[0]['batch_size']} -> {region[-1][e]:.3g} s "
               f"at bs {region[-1]['batch_size']}; {where}. Epoch s: {_series(pts, e)}")
        return name, HOLDS, why
    a, b = rise or (region[0], region[-1])
    return name, FAILS, (f"rises from {a[e]:.3g} s (bs {a['batch_size']}) to {b[e]:.3g} s "
                         f"(bs {b['batch_size']}) before loading dominates; {where}. "
                         f"Epoch s: {_series(pts, e)}")


def _compute_part(pts: list[dict], loader: str) -> tuple[str, str, str]:
    c = f"{loader}_compute_time_s"
    name = f"pure compute time keeps falling ({loader} loader)"
    rise = _first_rise(pts, c, TIME_TOL)
    if rise is None and pts[-1][c] < pts[0][c]:
        return name, HOLDS, f"compute s per epoch: {_series(pts, c)}"
    a, b = rise or (pts[0], pts[-1])
    return name, FAILS, (f"compute per epoch rises from {a[c]:.3g} s (bs {a['batch_size']}) to "
                         f"{b[c]:.3g} s (bs {b['batch_size']}); compute s: {_series(pts, c)}")


def claim_a(rows: list[dict], arm: str, loaders: list[str]) -> Verdict:
    """Claim A (speed), judged per loader from the extrapolated epoch timings."""
    v = Verdict("A", "speed", "The time of an epoch falls as the batch grows (fewer iterations), "
                "until loading the data dominates; the pure compute time keeps falling.")
    for loader in loaders:
        pts = [r for r in arm_rows(rows, arm) if finite(r.get(f"{loader}_epoch_time_s"))
               and r[f"{loader}_epoch_time_s"] > 0]
        if len(pts) < 2:
            v.parts.append((f"epoch time vs batch ({loader} loader)", UNTESTED,
                            "fewer than two batch sizes were timed"))
            continue
        v.parts += [_epoch_time_part(pts, loader), _compute_part(pts, loader)]
    return v


def _oscillation_part(pts: list[dict]) -> tuple[str, str, str]:
    name = "the smaller the batch, the more the loss oscillates (first iterations)"
    pts = [r for r in pts if finite(r.get("loss_osc_1000"))]
    if len(pts) < 2:
        return name, UNTESTED, "fewer than two batch sizes have a loss curve"
    series = ", ".join(f"{r['loss_osc_1000']:.4g} (bs {r['batch_size']}, "
                       f"{r['loss_iters_used']} it.)" for r in pts)
    rise = next(((a, b) for a, b in zip(pts, pts[1:])
                 if not b["loss_osc_1000"] < a["loss_osc_1000"]), None)
    if rise is None:
        return name, HOLDS, f"mean |loss change| per iteration falls strictly: {series}"
    a, b = rise
    return name, FAILS, (f"it does not fall from bs {a['batch_size']} to bs {b['batch_size']}: "
                         f"{series}")


def _blow_up_part(pts: list[dict]) -> tuple[str, str, str]:
    name = "at batch 1 the loss blows up later in training"
    one = next((r for r in pts if r["batch_size"] == 1), None)
    if one is None:
        return name, UNTESTED, "batch 1 is not in this sweep"
    lr = f"lr {_fmt(one.get('lr'), 'g')}"
    if one.get("diverged"):
        return name, HOLDS, (f"{lr}: the loss became non-finite or exceeded train.max_loss at "
                             f"update {one.get('diverged_step')} (epoch "
                             f"{_fmt(one.get('epochs_run'), '.2f')}); reported, not crashed on")
    spike, best = one.get("max_train_loss"), one.get("best_val_acc")
    # A loss spike far above chance level (ln 10 ~ 2.3) after which the net never learns is a
    # blow-up too, even when no single loss crossed train.max_loss (the ReLUs died instead).
    if finite(spike) and spike >= BLOW_UP_LOSS and finite(best) and best <= CHANCE_ACC:
        step = one.get("max_loss_step") or 0
        when = step / one["steps_per_epoch"] if one.get("steps_per_epoch") else float("nan")
        return name, HOLDS, (f"{lr}: a training loss of {_fmt(spike, '.3g')} at update {step} "
                             f"(epoch {_fmt(when, '.2f')}), after which the net stayed at "
                             f"chance (best val acc {_fmt(best, '.4f')} in "
                             f"{_fmt(one.get('epochs_run'), '.2f')} epochs)")
    return name, FAILS, (f"{lr}: no blow-up in {one.get('steps')} updates "
                         f"({_fmt(one.get('epochs_run'), '.2f')} epochs; {one.get('outcome')}; "
                         f"largest loss {_fmt(spike, '.3g')})")


def claim_b(rows: list[dict], arm: str) -> Verdict:
    """Claim B (smoothness): oscillation falls with the batch; batch 1 blows up."""
    v = Verdict("B", "smoothness", "Over the first 1000 iterations, the smaller the batch, the "
                "more the loss oscillates; at batch 1 and lr 0.02 the loss blows up later in "
                "training (an outlier sample with too large an LR).")
    pts = arm_rows(rows, arm)
    v.parts += [_oscillation_part(pts), _blow_up_part(pts)]
    return v


def _fastest(pts: list[dict]) -> Optional[dict]:
    reached = [r for r in pts if r.get("reached_target") and finite(r.get("time_to_target_s"))]
    return min(reached, key=lambda r: r["time_to_target_s"]) if reached else None


def _describe_reach(r: dict) -> str:
    return (f"bs {r['batch_size']}: {r['time_to_target_s']:.3g} s, {r['steps_to_target']} "
            f"updates, {r['epochs_to_target']:.2f} epochs")


def _large_batch_part(pts: list[dict], best: Optional[dict]) -> tuple[str, str, str]:
    name = "very large batches need many more epochs (limited by the number of updates)"
    large = pts[-1] if pts else None
    if large is None or best is None:
        return name, UNTESTED, "no batch size reached the target to compare with"
    if large is best:
        return name, FAILS, f"the largest batch ({_describe_reach(large)}) is the fastest"
    osc = [r for r in pts if finite(r.get("loss_osc_1000"))]
    smooth = (f"; its loss is the smoothest of the sweep (osc {large['loss_osc_1000']:.3g})"
              if osc and min(osc, key=lambda r: r["loss_osc_1000"]) is large else "")
    need = MANY_MORE_EPOCHS * best["epochs_to_target"]
    if large.get("reached_target"):
        ratio = large["epochs_to_target"] / best["epochs_to_target"]
        why = (f"{_describe_reach(large)} = {ratio:.1f}x the epochs of {_describe_reach(best)}"
               f"{smooth}")
        return name, HOLDS if ratio >= MANY_MORE_EPOCHS else FAILS, why
    ran = (f"bs {large['batch_size']} did not reach it in {large['epochs_run']:.2f} epochs "
           f"({large['steps']} updates; {large['outcome']})")
    if large["epochs_run"] >= need:
        return name, HOLDS, (f"{ran}, >= {MANY_MORE_EPOCHS:g}x the {best['epochs_to_target']:.2f}"
                             f" epochs ({best['steps_to_target']} updates) of bs "
                             f"{best['batch_size']}{smooth}")
    return name, UNTESTED, f"{ran}: stopped before {MANY_MORE_EPOCHS:g}x the epochs of the fastest"


def claim_c(rows: list[dict], arm: str, target: float) -> Verdict:
    """Claim C (convergence): the fastest batch to the target, batch 1, the largest batch."""
    v = Verdict("C", "convergence", f"To reach ~{target:.0%} test accuracy, batch 6-60 take the "
                f"least total time; batch 1 never reaches {target:.0%}; very large batches need "
                f"many more epochs (the number of updates, not the gradient's stability, limits "
                f"them).")
    pts = arm_rows(rows, arm)
    best = _fastest(pts)
    lo, hi = CLAIM_C_FASTEST
    name = f"batch {lo}-{hi} reaches the target in the least time"
    if best is None:
        v.parts.append((name, FAILS, f"no batch size reached {target:.0%}"))
    else:
        others = [_describe_reach(r) for r in pts if r.get("reached_target") and r is not best]
        why = f"fastest {_describe_reach(best)}" + (f"; then {'; '.join(others)}" if others
                                                    else "; no other batch size reached it")
        v.parts.append((name, HOLDS if lo <= best["batch_size"] <= hi else FAILS, why))
    one = next((r for r in pts if r["batch_size"] == 1), None)
    name1 = f"batch 1 never reaches {target:.0%}"
    if one is None:
        v.parts.append((name1, UNTESTED, "batch 1 is not in this sweep"))
    elif one.get("reached_target"):
        v.parts.append((name1, FAILS, f"it did: {_describe_reach(one)}"))
    else:
        v.parts.append((name1, HOLDS, f"{one['outcome']} (best val acc "
                        f"{_fmt(one.get('best_val_acc'), '.4f')} in "
                        f"{one['epochs_run']:.2f} epochs)"))
    v.parts.append(_large_batch_part(pts, best))
    return v


def other_arm_lines(rows: list[dict], ref: str, target: float) -> list[str]:
    """One line per other arm: its fastest batch size to the target (shown, not judged)."""
    lines = []
    for arm in dict.fromkeys(r["arm"] for r in rows):
        if arm == ref:
            continue
        pts = arm_rows(rows, arm)
        best = _fastest(pts)
        reached = [str(r["batch_size"]) for r in pts if r.get("reached_target")]
        lines.append(f"arm `{arm}`: " + (f"fastest to {target:.0%}: {_describe_reach(best)}; "
                                        f"reached at bs {', '.join(reached)}" if best else
                                        f"no batch size reached {target:.0%}"))
    return lines


def verdicts(rows: list[dict], loaders: list[str], target: float) -> list[Verdict]:
    """Claims A-C judged on the reference arm's rows."""
    ref = reference_arm(rows)
    if ref is None:
        return []
    out = [claim_a(rows, ref, loaders), claim_b(rows, ref), claim_c(rows, ref, target)]
    out[2].extra = other_arm_lines(rows, ref, target)
    return out
