"""The study's noise-scale verdict: where batch sizes stop paying, from the measured B_simple.

McCandlish et al. 2018: batches well below the gradient noise scale scale almost perfectly
(updates to the target fall ~1/B), batches above it waste samples. Judged on one arm's rows
(``largebatch.study.measure.noise_columns``: ``noise_scale_early/late``) against what the sweep
itself measured (updates and epochs to the target).
"""
from __future__ import annotations

from typing import Optional

from largebatch.study._util import finite
from largebatch.study._util import fmt as _fmt
from largebatch.study.verdicts import FAILS, HOLDS, TIME_TOL, UNTESTED, Verdict, arm_rows

PAYING = 0.5  # a batch step "pays" when it realises >= 50% of the ideal 1/B fall in updates


def noise_reference(pts: list[dict]) -> Optional[dict]:
    """The run whose late B_simple stands for the arm: the largest batch that reached the
    target, else the run with the best val accuracy.

    B_simple grows as the loss falls, so a run still near chance (a large batch after a few
    updates) says little about the noise near the target; among the runs that got there, the
    largest batch measured on the least noisy trajectory (a small batch's SGD noise keeps the
    weights where |G|² is larger, and its estimate is the noisiest).
    """
    have = [r for r in pts if finite(r.get("noise_scale_late")) and r["noise_scale_late"] > 0]
    reached = [r for r in have if _reached(r)]
    if reached:
        return max(reached, key=lambda r: r["batch_size"])
    if not have:
        return None
    return max(have, key=lambda r: (r.get("best_val_acc") if finite(r.get("best_val_acc"))
                                    else -1.0, -r["batch_size"]))


def _reached(r: dict) -> bool:
    return bool(r.get("reached_target")) and finite(r.get("steps_to_target"))


def _step_pairs(pts: list[dict]) -> list[tuple[dict, dict]]:
    return list(zip(pts, pts[1:]))


def _pair_gain(a: dict, b: dict, bn: float) -> tuple[float, float]:
    """(measured, predicted) share of the ideal fall in updates from bs a to bs b."""
    ideal = b["batch_size"] / a["batch_size"]
    measured = a["steps_to_target"] / b["steps_to_target"] / ideal
    predicted = (1 + bn / a["batch_size"]) / (1 + bn / b["batch_size"]) / ideal
    return measured, predicted


def _pays(a: dict, b: dict, bn: float) -> tuple[Optional[bool], str]:
    """Whether going from bs a (which reached the target) to bs b paid, and why; None when
    b stopped before it could tell (not reached with fewer updates than a paying step)."""
    if _reached(b):
        m, p = _pair_gain(a, b, bn)
        return m >= PAYING, (f"bs {a['batch_size']} -> {b['batch_size']}: "
                             f"{a['steps_to_target']} -> {b['steps_to_target']} updates = "
                             f"{m:.0%} of the ideal fall (model {p:.0%})")
    need = a["steps_to_target"] * a["batch_size"] / b["batch_size"] / PAYING
    if b["steps"] < need:
        return None, ""
    return False, (f"bs {a['batch_size']} -> {b['batch_size']}: {a['steps_to_target']} updates "
                   f"-> not reached in {b['steps']} (a step paying {PAYING:.0%} needs <= "
                   f"{need:.0f})")


def _below_part(pts: list[dict], bn: float) -> tuple[str, str, str]:
    name = "below B_simple the updates to the target fall ~1/B"
    verdict, why = UNTESTED, []
    for a, b in _step_pairs(pts):
        if b["batch_size"] > bn or not _reached(a):
            continue
        ok, text = _pays(a, b, bn)
        if ok is not None:
            why.append(text)
            verdict = FAILS if not ok else (HOLDS if verdict == UNTESTED else verdict)
    if not why:
        return name, UNTESTED, (f"no batch size <= B_simple {bn:.3g} can be compared with a "
                                "smaller one that reached the target")
    return name, verdict, "; ".join(why)


def _above_part(pts: list[dict], bn: float) -> tuple[str, str, str]:
    name = "above B_simple larger batches waste samples (more epochs to the target)"
    pairs = [(a, b) for a, b in _step_pairs(pts) if b["batch_size"] > bn and _reached(a)]
    if not pairs:
        return name, UNTESTED, (f"no batch size above B_simple {bn:.3g} follows one that "
                                "reached the target")
    verdict, why = HOLDS, []
    for a, b in pairs:
        model = (1 + b["batch_size"] / bn) / (1 + a["batch_size"] / bn)
        ea = a["epochs_to_target"]
        if _reached(b):
            eb = b["epochs_to_target"]
            wasted = eb > ea * (1 + TIME_TOL)
            why.append(f"bs {a['batch_size']} -> {b['batch_size']}: {ea:.2f} -> {eb:.2f} epochs "
                       f"to the target ({eb / ea:.1f}x; model {model:.1f}x)")
        else:
            wasted = b["epochs_run"] > ea * (1 + TIME_TOL)
            why.append(f"bs {a['batch_size']} -> {b['batch_size']}: {ea:.2f} epochs -> not "
                       f"reached in {b['epochs_run']:.2f} (model {model:.1f}x)")
            if not wasted:  # stopped (budget) before it could have shown it
                verdict = UNTESTED if verdict == HOLDS else verdict
                continue
        if not wasted:
            verdict = FAILS
    return name, verdict, "; ".join(why)


def _stop_paying_lines(pts: list[dict], bn: float) -> list[str]:
    below = [str(r["batch_size"]) for r in pts if r["batch_size"] < bn]
    above = [str(r["batch_size"]) for r in pts if r["batch_size"] >= bn]
    ref = noise_reference(pts)
    which = ("the largest batch that reached the target" if _reached(ref) else
             "no run reached the target: the one with the best val acc")
    lines = [f"B_simple of the arm: **{bn:.3g}**, the late B_simple of bs {ref['batch_size']} "
             f"({which}; best val acc {_fmt(ref.get('best_val_acc'), '.4f')}); below it: bs "
             f"{', '.join(below) or 'none'}; at or above it: bs {', '.join(above) or 'none'}"]
    for r in pts:
        b, late = r["batch_size"], r.get("noise_scale_late")
        meas = (f"{r['steps_to_target']} updates, {r['epochs_to_target']:.2f} epochs to the "
                f"target" if _reached(r) else f"not reached ({r['epochs_run']:.2f} epochs run)")
        lines.append(f"bs {b}: run's B_simple {_fmt(r.get('noise_scale_early'))} -> "
                     f"{_fmt(late)} (early -> late" + ("" if finite(late) else "; n/a: nothing "
                                                       "smaller to compare with") +
                     f"); B / B_simple = {b / bn:.3g}; model: updates x{1 + bn / b:.3g} of "
                     f"the minimum, samples x{1 + b / bn:.3g}; measured: {meas}")
    told = [(b, ok) for a, b in _step_pairs(pts) if _reached(a)
            for ok in [_pays(a, b, bn)[0]] if ok is not None]
    walls = [b for b, ok in told if not ok]
    if not told:
        said = "no batch size can be compared with a smaller one that reached the target"
    elif walls:
        b = walls[0]["batch_size"]
        said = (f"updates stop falling ~1/B at bs {b} (< {PAYING:.0%} of the ideal fall), "
                f"B / B_simple = {b / bn:.3g} there")
    else:
        said = f"every step that can be judged paid (>= {PAYING:.0%} of the ideal fall)"
    lines.append(f"the sweep itself: {said}")
    if len({r.get("lr") for r in pts}) == 1:
        lines.append(f"the LR is the same at every batch size ({_fmt(pts[0].get('lr'), 'g')}); "
                     "the model assumes a tuned LR per batch, so the measured gains of the "
                     "larger batches are a lower bound")
    return lines


def stop_paying(rows: list[dict], arm: str) -> Verdict:
    """Where batch sizes stop paying, from the measured B_simple (McCandlish et al. 2018)."""
    v = Verdict("N", "noise", "Batches well below the gradient noise scale B_simple scale almost "
                "perfectly (updates to the target fall ~1/B); batches above it waste samples "
                "(McCandlish et al. 2018: S = S_min(1 + B_noise/B), E = E_min(1 + B/B_noise)).")
    pts = arm_rows(rows, arm)
    ref = noise_reference(pts)
    bn = ref["noise_scale_late"] if ref is not None else float("nan")
    if not finite(bn):
        v.parts.append(("B_simple measured", UNTESTED, "no run of this arm measured B_simple "
                        "(study.noise_scale=false, or only batch 1)"))
        return v
    v.parts += [_below_part(pts, bn), _above_part(pts, bn)]
    v.extra = _stop_paying_lines(pts, bn)
    return v
