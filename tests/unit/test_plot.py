"""``largebatch plot`` on real MNIST runs: the PNGs exist and are real images, what is drawn is
exactly what metrics.jsonl holds (parsed here independently), the moving average matches
numpy's, plan changes are marked at their steps, several runs get one legend entry each, and
bad input is one line with exit code 2."""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from largebatch import plot
from largebatch.cli import main
from tests.conftest import cli, run_cli, run_many

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GROWN_GLOBAL, OTHER_GLOBAL = 240, 120
STEMS = {"loss_vs_steps", "loss_vs_samples", "loss_vs_time", "lr_vs_steps",
         "batch_size_vs_steps", "grad_norm_vs_steps",
         *(f"{m}_vs_{x}" for m in ("val_acc", "val_loss") for x in ("steps", "samples", "time"))}


def _train(out: Path, mnist_root: Path, *extra: str) -> list[str]:
    """The argv of a real run writing to ``out``."""
    return cli("train", "configs/mnist/mlp.yaml", f"data.root={mnist_root}",
               "data.download=false", "data.test_subset=500", "train.device=cpu",
               f"log.out_dir={out}", "log.progress=false", "log.every_steps=1", *extra)


@pytest.fixture(scope="module")
def runs(mnist_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two real runs, both in folders named ``run`` (so their legend names must differ by
    their parents): ``grown/run`` doubles its batch twice on plateau (240 -> 480 -> 960)
    and then lowers the LR (as in test_batch_growth); ``plain/run`` keeps batch 120. The two
    processes run side by side (independent; nothing here reads their timings' scale)."""
    base = tmp_path_factory.mktemp("plot")
    grown, plain = base / "grown" / "run", base / "plain" / "run"
    procs = run_many([
        _train(grown, mnist_root, "data.subset=2400", "train.epochs=2",
               "train.eval_every_samples=480", "schedule.name=plateau",
               "schedule.plateau.action=grow_batch", "schedule.plateau.patience=0",
               "schedule.plateau.threshold_mode=abs", "schedule.plateau.threshold=100",
               "schedule.plateau.factor=0.5", f"batch.max_global_size={4 * GROWN_GLOBAL}"),
        _train(plain, mnist_root, "data.subset=1200", "train.epochs=1",
               f"batch.global_size={OTHER_GLOBAL}", "train.eval_every_samples=300")],
        timeout=240)
    for proc in procs:
        assert proc.returncode == 0, proc
    return grown, plain


def _records(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height from the IHDR chunk, after checking the PNG signature."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR", path
    return struct.unpack(">II", head[16:24])


def _assert_real_pngs(paths: list[Path]) -> None:
    import matplotlib.image
    for path in paths:
        width, height = _png_size(path)
        assert width >= 400 and height >= 300 and path.stat().st_size > 10_000, path
        pixels = matplotlib.image.imread(path)
        # Not a blank canvas: a fair share of pixels are drawn (axes, text, curves).
        assert (pixels[..., :3] < 0.9).any(axis=-1).mean() > 0.01, path


def _figures(*dirs: Path, smooth: int = plot.DEFAULT_SMOOTH) -> dict[str, plot.Figure]:
    names = plot.run_names(list(dirs))
    return plot.build_figures([plot.load_run(d, n) for d, n in zip(dirs, names)], smooth)


def test_plotted_series_are_the_records(runs: tuple[Path, Path]) -> None:
    grown, _ = runs
    k = 3
    figs = _figures(grown, smooth=k)
    assert set(figs) == STEMS
    train, evals = _records(grown, "train"), _records(grown, "eval")
    assert len(train) == 9 and len(evals) == 7  # 2 epochs of 2400 with the batch grown twice
    loss = [r["loss"] for r in train]
    for x_name, key in (("steps", "step"), ("samples", "samples"), ("time", "time_s")):
        series = figs[f"loss_vs_{x_name}"].series
        assert series["run raw"] == ([r[key] for r in train], loss)
        assert series[f"run moving avg ({k})"][0] == [r[key] for r in train]
        for metric in ("val_acc", "val_loss"):
            assert figs[f"{metric}_vs_{x_name}"].series == {
                "run": ([r[key] for r in evals], [r[metric] for r in evals])}
    # The moving average against numpy: full windows by convolution, the first k-1 points
    # the mean of what there is so far.
    smoothed = figs["loss_vs_steps"].series[f"run moving avg ({k})"][1]
    full = np.convolve(loss, np.ones(k) / k, mode="valid")
    start = np.cumsum(loss[:k - 1]) / np.arange(1, k)
    np.testing.assert_allclose(smoothed, np.concatenate([start, full]), rtol=1e-12)
    assert figs["lr_vs_steps"].series["run"] == ([r["step"] for r in train],
                                                 [r["lr"] for r in train])
    assert figs["grad_norm_vs_steps"].series["run"][1] == [r["grad_norm"] for r in train]


def test_batch_size_and_plan_change_markers(runs: tuple[Path, Path]) -> None:
    grown, _ = runs
    figs = _figures(grown)
    changes = _records(grown, "plan_change")
    grow_at = [c["step"] for c in changes if c["action"] == "grow_batch"]
    cut_at = [c["step"] for c in changes if c["action"] == "reduce_lr"]
    assert [c["global_size"] for c in changes if c["action"] == "grow_batch"] == [480, 960]
    assert len(cut_at) >= 2
    steps, sizes = figs["batch_size_vs_steps"].series["run"]
    # A change logged after step s holds from step s + 1.
    assert sizes == [240 if s <= grow_at[0] else 480 if s <= grow_at[1] else 960 for s in steps]
    # Against the samples each step really added (every step logged): equal, except the
    # epoch's last window, which is cut short by the end of the data.
    train = _records(grown, "train")
    added = [b["samples"] - a["samples"] for a, b in zip([{"samples": 0}] + train, train)]
    assert all(a <= s for a, s in zip(added, sizes))
    assert sum(a == s for a, s in zip(added, sizes)) >= len(sizes) - 2
    for stem in ("lr_vs_steps", "batch_size_vs_steps", "loss_vs_steps", "val_acc_vs_steps"):
        assert figs[stem].vlines == {"run grow_batch": grow_at, "run reduce_lr": cut_at}, stem
    assert figs["loss_vs_samples"].vlines == {}  # markers are at steps, only on step axes
    # What is drawn: the vertical lines sit at those steps, and the legend names them.
    fig = plot.render(figs["batch_size_vs_steps"], {"run": "tab:blue"})
    ax = fig.axes[0]
    vertical = sorted(line.get_xdata()[0] for line in ax.get_lines()
                      if line.get_xdata()[0] == line.get_xdata()[-1] and len(line.get_xdata()) == 2
                      and line.get_label() != "run")
    assert vertical == sorted(grow_at + cut_at)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == \
        ["run", "run grow_batch", "run reduce_lr"]
    plot.pyplot().close(fig)


def test_several_runs_overlaid_with_one_legend_entry_each(runs: tuple[Path, Path],
                                                           tmp_path: Path) -> None:
    grown, plain = runs
    out = tmp_path / "ab"
    proc = run_cli("plot", str(grown), str(plain), "--out", str(out), "--smooth", "4")
    assert proc.returncode == 0, proc
    paths = [Path(line) for line in proc.stdout.splitlines()]
    assert {p.parent for p in paths} == {out} and {p.stem for p in paths} == STEMS
    _assert_real_pngs(paths)
    figs = _figures(grown, plain, smooth=4)
    a, b = "grown/run", "plain/run"  # the same folder name, told apart by the parent
    colours = {a: "tab:blue", b: "tab:orange"}
    plain_train = _records(plain, "train")
    assert [r["samples"] - q["samples"] for q, r in zip(plain_train, plain_train[1:])] == \
        [OTHER_GLOBAL] * (len(plain_train) - 1)
    expected = {
        "loss_vs_steps": [f"{a} raw", f"{a} moving avg (4)", f"{b} raw", f"{b} moving avg (4)",
                          f"{a} grow_batch", f"{a} reduce_lr"],
        "val_acc_vs_time": [a, b],
        "batch_size_vs_steps": [a, b, f"{a} grow_batch", f"{a} reduce_lr"],
    }
    for stem, labels in expected.items():
        fig = plot.render(figs[stem], colours)
        assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == labels, stem
        plot.pyplot().close(fig)
    # Each run's drawn curve is its own records.
    fig = plot.render(figs["val_acc_vs_time"], colours)
    drawn = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
             for line in fig.axes[0].get_lines()}
    plot.pyplot().close(fig)
    for name, run in ((a, grown), (b, plain)):
        evals = _records(run, "eval")
        assert drawn[name] == ([r["time_s"] for r in evals], [r["val_acc"] for r in evals])
    assert figs["batch_size_vs_steps"].series[b][1] == [float(OTHER_GLOBAL)] * len(plain_train)


def test_several_runs_default_to_plots_folder(runs: tuple[Path, Path], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture) -> None:
    """Without --out: a single run's PNGs go into its directory, several runs' into ./plots
    (the drawing itself is the overlay test's, in a real process)."""
    asked = []

    def fake_write(figs: dict, runs: list, out: Path) -> list[Path]:
        asked.append((out, [r.name for r in runs], set(figs)))
        return [out / f"{stem}.png" for stem in figs]

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(plot, "write_pngs", fake_write)
    # The command's module binds write_pngs by name when it is first imported: patch its name
    # too, or an earlier test that ran `plot` in this process leaves the real one in place.
    import largebatch.cli.plot as plot_command
    monkeypatch.setattr(plot_command, "write_pngs", fake_write)
    for args, where in (([str(runs[1])], runs[1]), ([*map(str, runs)], Path("plots"))):
        with pytest.raises(SystemExit) as stop:
            main(["plot", *args])
        assert stop.value.code == 0
        out, names, stems = asked.pop()
        assert out == where and stems == STEMS
        assert names == (["run"] if len(args) == 1 else ["grown/run", "plain/run"])
        assert sorted(capsys.readouterr().out.splitlines()) == \
            sorted(str(where / f"{s}.png") for s in stems)


def test_torn_last_line_is_skipped(runs: tuple[Path, Path], tmp_path: Path) -> None:
    grown, _ = runs
    killed = tmp_path / "killed" / "run"  # the same legend name as the intact run
    shutil.copytree(grown, killed, ignore=shutil.ignore_patterns("checkpoints", "*.png"))
    with open(killed / "metrics.jsonl", "a") as fh:
        fh.write('{"kind": "train", "step": 10, "epoch": 2.1, "sam')  # killed mid-write
    intact, torn = _figures(grown), _figures(killed)
    assert set(torn) == STEMS
    assert {s: f.series for s, f in torn.items()} == {s: f.series for s, f in intact.items()}
    assert {s: f.vlines for s, f in torn.items()} == {s: f.vlines for s, f in intact.items()}


def _bad_inputs(base: Path, grown: Path) -> list[tuple[list[str], str]]:
    empty, nofile, corrupt, onlytorn = (base / n for n in ("empty", "nofile", "corrupt",
                                                           "onlytorn"))
    for d in (empty, nofile, corrupt, onlytorn):
        d.mkdir()
    (empty / "metrics.jsonl").write_text("")
    lines = (grown / "metrics.jsonl").read_text().splitlines()
    (corrupt / "metrics.jsonl").write_text("\n".join(lines[:3] + ["{not json"] + lines[3:]))
    (onlytorn / "metrics.jsonl").write_text('{"kind": "tr')
    return [([str(base / "missing")], f"run directory {base / 'missing'} does not exist"),
            ([str(nofile)], f"{nofile / 'metrics.jsonl'} not found"),
            ([str(empty)], f"{empty / 'metrics.jsonl'} holds no metrics records"),
            ([str(onlytorn)], f"{onlytorn / 'metrics.jsonl'} holds no metrics records"),
            ([str(corrupt)], f"{corrupt / 'metrics.jsonl'}: line 4 is not a metrics record"),
            ([str(grown), str(empty)], f"{empty / 'metrics.jsonl'} holds no metrics records"),
            ([str(grown), "--smooth", "0"], "--smooth must be >= 1 (got 0)")]


def test_bad_input_is_one_line_exit_2(runs: tuple[Path, Path], tmp_path: Path) -> None:
    cases = _bad_inputs(tmp_path, runs[0])
    procs = run_many([cli("plot", *args, "--out", str(tmp_path / "out")) for args, _ in cases])
    for (args, fragment), proc in zip(cases, procs):
        assert proc.returncode == 2, proc
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("largebatch: error: "), proc
        assert fragment in lines[0] and not proc.stdout, proc
    assert not (tmp_path / "out").exists()  # nothing written on bad input
