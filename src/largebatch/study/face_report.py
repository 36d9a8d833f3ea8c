"""The face study's report: CSV/JSON tables, PNG figures and ``study.md`` with its verdicts.

The rows and curves are the ones the MNIST study writes (``report``), with the face columns
(``face_measure.FACE_COLUMNS``) added; the verdicts are ``face_verdicts``'s, computed from the
rows; figures: verification accuracy against batch size per arm and along training, the loss
over the first updates, B_simple across training.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from largebatch.study._util import finite, results_table
from largebatch.study._util import fmt as _fmt
from largebatch.study.face_measure import FACE_COLUMNS, TAR_KEY
from largebatch.study.face_verdicts import GOAL_BATCH, SMALL, TOL, FaceVerdict, face_verdicts
from largebatch.study.figures import (_batch_axis, _pyplot, _save, plot_accuracy,
                                      plot_loss_first, plot_noise_scale)
from largebatch.study.report import columns, write_csv, write_json

FACE_FILES = [("csv", "study.csv"), ("json", "study.json"), ("md", "study.md"),
              ("loss_curves", "loss_curves.json"), ("eval_curves", "eval_curves.json"),
              ("acc_vs_batch", "accuracy_vs_batch.png"), ("loss_first", "loss_first.png"),
              ("accuracy", "accuracy.png")]


def face_table(rows: list[dict]) -> str:
    """The results table of study.md (the CSV has every column)."""
    head = ["arm", "batch", "lr", "micro x accum", "epochs", "updates", "final ver. acc",
            "best ver. acc", "TAR@FAR 1e-3", "loss osc", "epoch s (data + compute)",
            "updates to target", "s to target", "B_simple (early → late)", "head rows",
            "logits MB", "batch at end"]
    return results_table(head, rows, _face_cells)


def _face_cells(r: dict) -> list[str]:
    """The table's cells for a run that ran."""
    return [r["arm"], str(r["batch_size"]), _fmt(r["lr"], ".3g"),
            f"{r['micro_size']} x {r['accum_steps']}", _fmt(r["epochs_run"], ".2f"),
            _fmt(r["steps"], "d"), _fmt(r["final_verification_acc"], ".4f"),
            _fmt(r["best_verification_acc"], ".4f"), _fmt(r[f"final_{TAR_KEY}"], ".3f"),
            _fmt(r["loss_osc_1000"], ".3g"),
            f"{_fmt(r['epoch_time_s'], '.3g')} = {_fmt(r['data_time_s'], '.2g')} + "
            f"{_fmt(r['compute_time_s'], '.3g')}",
            _fmt(r["steps_to_target"], "d"), _fmt(r["time_to_target_s"], ".3g"),
            f"{_fmt(r.get('noise_scale_early'))} → {_fmt(r.get('noise_scale_late'))}",
            _fmt(r["head_rows"], "d"), _fmt(r["logits_mb"], ".3g"),
            _fmt(r["final_global_size"], "d")]


def _setup_lines(meta: dict, rows: list[dict]) -> list[str]:
    sw, env = meta["sweep"], meta["environment"]
    arms = ", ".join(f"`{a}`" for a in dict.fromkeys(r["arm"] for r in rows))
    lines = [
        f"- Command: `{meta['command']}`",
        f"- Total wall time: **{meta['wall_s'] / 60:.1f} min** ({meta['wall_s']:.0f} s), "
        f"finished {meta['finished']}; world size {meta['world_size']}.",
        f"- Machine: {env['processor']}, {env['cpu_count']} CPUs, torch {env['torch']}, "
        f"intra-op threads: {env['torch_threads']}"
        + (f", GPU {env['cuda']}" if env["cuda"] else ", CPU only") + ".",
        f"- Arms: {arms}. Batch sizes {sw['batch_sizes']}; every run trains "
        f"{sw['max_epochs']:g} epochs (the same budget for every arm"
        + (f", at most {sw['budget_s']:g} s" if sw["budget_s"] else "") + "); micro-batches of "
        f"at most {sw.get('max_micro') or 'the whole batch'}, accumulated.",
        f"- Verification on held-out identities every {sw['eval_every_samples']} training "
        f"samples; target {sw['target_acc']:.0%} verification accuracy (recorded, "
        + ("the run stops there)." if sw.get("stop_at_target") else "the run goes on)."),
        f"- Loss oscillation: mean |loss(t+1) - loss(t)| over the first {sw['loss_iters']} "
        "updates. Epoch time: a timing pass extrapolated to an epoch (data generation + "
        "compute). B_simple: the live gradient noise scale of the convergence run, the "
        "micro-batches of a window being the small batches.",
    ]
    if sw.get("quick"):
        lines.insert(0, "- **Quick mode** (study.quick_overrides): a smoke test of the pipeline, "
                        "not the study's answer.")
    return lines


def verdict_lines(judged: list[FaceVerdict]) -> list[str]:
    """The verdicts section of study.md: each answer, then the numbers behind it."""
    out = ["## Verdicts (computed from the table)", "",
           f"Accuracy: final verification accuracy on held-out identities after the same "
           f"epochs. \"Kept\": within {TOL * 100:g} point of the reference (the best run of a "
           f"fixed-batch arm at bs <= {SMALL}). Goal: a batch >= {GOAL_BATCH} kept.", ""]
    for v in judged:
        out += [f"### {v.title}: **{v.answer}**", ""] + [f"- {line}" for line in v.lines]
        out.append("")
    return out


def markdown(rows: list[dict], meta: dict, judged: list[FaceVerdict],
             figures: list[str]) -> str:
    """study.md: set-up, verdicts, table, figures."""
    out = ["# Face recognition batch-size study", ""] + _setup_lines(meta, rows) + [""]
    out += verdict_lines(judged)
    out += ["## Results", "", face_table(rows), "", "## Figures", ""]
    out += [f"![{name}]({name})\n" for name in figures]
    notes = list(meta.get("notes", []))
    if notes:
        out += ["## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


def plot_acc_vs_batch(path: Path, rows: list[dict]) -> None:
    """Final verification accuracy against batch size, one line per arm (PFC arms as dots)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sizes = sorted({r["batch_size"] for r in rows if r.get("status") == "ran"})
    for arm in dict.fromkeys(r["arm"] for r in rows):
        pts = sorted((r["batch_size"], r["final_verification_acc"]) for r in rows
                     if r["arm"] == arm and r.get("status") == "ran"
                     and finite(r.get("final_verification_acc")))
        if pts:
            ax.plot(*zip(*pts), marker="o", label=arm, linestyle="-" if len(pts) > 1 else "")
    _batch_axis(ax, sizes)
    ax.set_ylabel("verification accuracy (held-out ids)")
    ax.legend(fontsize=8)
    ax.set_title("Accuracy after the same epochs, by batch size", fontsize=10)
    _save(fig, path)


def write_face_report(out_dir: Path, rows: list[dict], curves: dict, evals: dict,
                      meta: dict, noise: Optional[dict] = None) -> dict[str, Path]:
    """Write study.csv/json (verdicts included), the curves, the PNGs and study.md."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cols = columns(meta["sweep"]["loaders"]) + FACE_COLUMNS
    judged = face_verdicts(rows)
    paths: dict[str, Path] = {name: out_dir / f for name, f in FACE_FILES}
    write_csv(paths["csv"], rows, cols)
    write_json(paths["json"], {"meta": meta, "columns": cols,
                               "rows": [{c: r.get(c) for c in cols} for r in rows],
                               "verdicts": [v.__dict__ for v in judged]})
    write_json(paths["loss_curves"], curves, indent=None)
    write_json(paths["eval_curves"], evals, indent=None)
    plot_acc_vs_batch(paths["acc_vs_batch"], rows)
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    ref = "goyal" if "goyal" in arms else arms[0]
    plot_loss_first(paths["loss_first"], rows, curves, ref)
    plot_accuracy(paths["accuracy"], rows, evals, meta["sweep"]["target_acc"])
    figures = ["accuracy_vs_batch.png", "loss_first.png", "accuracy.png"]
    noise = {a: c for a, c in (noise or {}).items() if any(c.values())}
    if noise:
        paths["noise_curves"] = out_dir / "noise_curves.json"
        paths["noise_scale"] = out_dir / "noise_scale.png"
        write_json(paths["noise_curves"], noise, indent=None)
        plot_noise_scale(paths["noise_scale"], rows, noise)
        figures.append("noise_scale.png")
    paths["md"].write_text(markdown(rows, meta, judged, figures))
    return paths

