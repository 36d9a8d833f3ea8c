"""``largebatch eval`` against the training evaluation of the same weights and against a plain
reference written here.

One real tiny run (``configs/face/synthetic_tiny.yaml``, 3 steps) is trained with two ``.bin``
sets in ``face.val_targets``: ``agedb`` in the layout insightface's ``agedb2pack2.py`` writes
under Python 2 (``cv2.imencode``'s ``(n, 1)`` uint8 columns, numpy bools, protocol 2, built
opcode by opcode) and ``pairs`` written by ``largebatch make-bin``. Then:

* ``eval`` of the run folder (a real process) reports, for each set, exactly the figures the
  training evaluation logged (same distances, same code), and its ROC, TAR and val@FAR equal
  those of distances computed here without largebatch's embedding code (PIL decode,
  ``(x / 255 - 0.5) / 0.5``, model(x) + model(flip(x)), normalise);
* under ``torchrun`` on 2 ranks it reports the same figures; from the checkpoint set or from
  ``model.pt`` too;
* bad input is one line and exit code 2.
"""
from __future__ import annotations

import csv
import functools
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from largebatch.cli.main import main
from largebatch.face.val_far import val_at_far
from largebatch.face.verification import tar_at_far, ten_fold
from tests.conftest import REPO, run_cli, run_torchrun
from tests.unit.data.test_bin_pairs import py2_pickle

IDENTITIES = 8
FARS = ["1e-3", "1e-4", "0.1"]  # 0.1: resolvable on these small sets (>= 10 impostors)


def face_jpeg(identity: int, k: int) -> bytes:
    """A 112x112 JPEG: the identity's colour, a per-image shift and pixel noise (what the
    tiny net, 3 steps into training on 16x16 faces, tells apart best: its embeddings of
    finer patterns differ by a few 1e-3 only)."""
    base = np.random.default_rng(identity).integers(0, 256, 3)
    rng = np.random.default_rng(1000 * identity + k)
    img = base + rng.normal(0, 12, 3) + rng.normal(0, 20, (112, 112, 3))
    buf = io.BytesIO()
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def pair_images(n: int, seed: int) -> tuple[list[bytes], list[bool]]:
    """``n`` pairs, even ones genuine (two images of one identity), odd ones impostors."""
    rng = np.random.default_rng(seed)
    images, same = [], []
    for p in range(n):
        a = int(rng.integers(IDENTITIES))
        b = a if p % 2 == 0 else (a + 1 + int(rng.integers(IDENTITIES - 1))) % IDENTITIES
        images += [face_jpeg(a, 2 * p + 100 * seed), face_jpeg(b, 2 * p + 1 + 100 * seed)]
        same.append(p % 2 == 0)
    return images, same


def write_sets(root: Path) -> dict[str, tuple[list[bytes], list[bool]]]:
    """``agedb.bin`` (Python 2, (n, 1) arrays, numpy bools) and ``pairs.bin`` (make-bin)."""
    from largebatch.data.bin_write import make_bin
    root.mkdir(parents=True, exist_ok=True)
    agedb = pair_images(30, 1)
    (root / "agedb.bin").write_bytes(py2_pickle(*agedb, arrays=True, column=True,
                                                numpy_bool=True))
    pairs = pair_images(24, 2)
    lines = []
    for k, s in enumerate(pairs[1]):
        for side in (0, 1):
            (root / "img" / f"{k}_{side}.jpg").parent.mkdir(exist_ok=True)
            (root / "img" / f"{k}_{side}.jpg").write_bytes(pairs[0][2 * k + side])
        lines.append(f"img/{k}_0.jpg img/{k}_1.jpg {int(s)}")
    (root / "pairs.txt").write_text("\n".join(lines) + "\n")
    make_bin(root / "pairs.txt", root / "pairs.bin")
    return {"agedb": agedb, "pairs": pairs}


@functools.cache
def tiny_run(base: Path) -> tuple[Path, dict]:
    """Train the tiny run once per session (under ``base``); returns it and its sets."""
    sets = write_sets(base / "sets")
    run = base / "run"
    proc = run_cli("train", str(REPO / "configs/face/synthetic_tiny.yaml"), "train.max_steps=3",
                   "face.eval_pairs=100", "model.hidden=16", "face.val_targets=[agedb,pairs]",
                   f"face.val_root={base / 'sets'}", "log.progress=false",
                   f"log.out_dir={run}")
    assert proc.returncode == 0, proc
    return run, sets


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    return tiny_run(tmp_path_factory.getbasetemp() / "deploy_tiny_run")


def reference_embed(run: Path, images: list[bytes]) -> torch.Tensor:
    """Unit embeddings of ``images`` by plain code: the run's weights, PIL, flip, normalise."""
    from largebatch.config import load_config
    from largebatch.models import build_face_backbone
    cfg = load_config(base=json.loads((run / "config.json").read_text()))
    model = build_face_backbone(cfg.model, cfg.face.embedding_size).eval()
    model.load_state_dict(torch.load(run / "model.pt", weights_only=True)["model"])
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))
                                      .copy()).permute(2, 0, 1) for b in images]).float()
    x = (x / 255 - 0.5) / 0.5
    with torch.no_grad():
        return F.normalize(model(x) + model(torch.flip(x, dims=[-1])), dim=1)


def reference_distances(run: Path, images: list[bytes]) -> np.ndarray:
    e = reference_embed(run, images).double()
    return ((e[0::2] - e[1::2]) ** 2).sum(1).numpy()


def last_eval(run: Path) -> dict:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "eval"][-1]


def eval_args(run: Path | str, sets: Path, out: Path) -> list[str]:
    return ["eval", str(run), "--bin", str(sets / "agedb.bin"), str(sets / "pairs.bin"),
            "--out", str(out), "--far", *FARS]


@pytest.fixture(scope="module")
def one_process(trained, tmp_path_factory) -> tuple[dict, str]:
    run, _ = trained
    out = tmp_path_factory.mktemp("eval1")
    proc = run_cli(*eval_args(run, run.parent / "sets", out))
    assert proc.returncode == 0, proc
    return json.loads((out / "eval.json").read_text()), proc.stdout


def test_eval_equals_the_in_training_evaluation(trained, one_process):
    run, _ = trained
    doc, stdout = one_process
    record = last_eval(run)
    assert record["step"] == 3 and doc["model"]["weights"] == str(run / "model.pt")
    for name in ("agedb", "pairs"):
        logged = {k: v for k, v in record.items() if k.startswith(f"{name}_")}
        assert doc["sets"][name]["metrics"] == logged  # the training's own figures, exactly
        assert len(logged) == 6 and logged[f"{name}_tar_at_far_1e-3"] is None
        assert "needs >= 1000 impostor pairs" in logged[f"{name}_tar_at_far_1e-3_note"]
    lines = stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines[:2]] == ["agedb", "pairs"]
    tar = doc["sets"]["agedb"]["tar_at_far"]["0.1"]
    assert f"TAR@FAR 1e-3 -, 1e-4 -, 0.1 {tar:.4f} |" in lines[0]
    assert "30 pairs (15 genuine, 15 impostor)" in lines[0]


@pytest.mark.parametrize("name", ["agedb", "pairs"])
def test_eval_figures_equal_a_plain_reference(trained, one_process, name):
    run, sets = trained
    doc, _ = one_process
    r = doc["sets"][name]
    images, same = sets[name]
    same = np.array(same)
    d = reference_distances(run, images)
    # the ROC's thresholds are the set's distances, its counts those of `dist < t`
    with open(r["roc_csv"]) as fh:
        rows = list(csv.DictReader(fh))
    got = np.array([float(row["threshold"]) for row in rows])
    assert np.isinf(got[-1]) and np.abs(got[:-1] - np.unique(d)).max() <= 1e-6
    for row in rows:
        t = float(row["threshold"])
        assert int(row["false_accepts"]) == np.count_nonzero(d[~same] < t)
        assert int(row["true_accepts"]) == np.count_nonzero(d[same] < t)
        assert float(row["far"]) == int(row["false_accepts"]) / np.count_nonzero(~same)
    assert Path(r["roc_png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tf = ten_fold(d, same)
    assert (r["acc"], r["std"], r["fold_acc"]) == (tf.acc, tf.std, list(tf.fold_acc))
    assert r["fold_thresholds"] == list(tf.fold_thresholds)
    assert r["tar_at_far"] == {"1e-3": None, "1e-4": None, "0.1": tar_at_far(d, same, "0.1")}
    v = val_at_far(d, same, "0.1")
    assert r["val_at_far"]["0.1"] == {
        "val": v.val, "std": v.std, "far": v.far, "fold_val": list(v.fold_val),
        "fold_far": list(v.fold_far), "fold_thresholds": list(v.fold_thresholds)}
    assert r["val_at_far"]["1e-3"]["val"] is None and "val_at_far_1e-3" in r["notes"]
    assert 0.5 < r["acc"] <= 1.0 and v.val is not None


def _figures(doc: dict) -> dict:
    """Everything but where the files went."""
    return {name: {k: v for k, v in r.items() if k not in ("roc_csv", "roc_png")}
            for name, r in doc["sets"].items()}


def test_torchrun_two_ranks_report_the_same(trained, one_process, tmp_path):
    run, _ = trained
    doc, _ = one_process
    proc = run_torchrun(2, *eval_args(run, run.parent / "sets", tmp_path))
    assert proc.returncode == 0, proc
    two = json.loads((tmp_path / "eval.json").read_text())
    assert two["world_size"] == 2 and doc["world_size"] == 1
    assert _figures(two) == _figures(doc)
    assert proc.stdout.count("agedb: acc") == 1  # rank 0 prints


def test_checkpoint_set_and_model_pt_report_the_same(trained, one_process, tmp_path, capsys):
    """The final set (the weights after the last step) and model.pt are the same weights."""
    run, _ = trained
    doc, _ = one_process
    for source, weights, step in ((run / "checkpoints" / "step-000003", "trainer.pt", 3),
                                  (run / "checkpoints", "trainer.pt", 3),
                                  (run / "model.pt", "model.pt", 3)):
        out = tmp_path / source.name
        with pytest.raises(SystemExit) as exc:  # in-process: one set, to stay quick
            main(["eval", str(source), "--bin", str(run.parent / "sets" / "pairs.bin"),
                  "--out", str(out), "--far", *FARS])
        assert exc.value.code == 0
        got = json.loads((out / "eval.json").read_text())
        assert got["model"]["step"] == step and got["model"]["weights"].endswith(weights)
        assert _figures(got) == {"pairs": _figures(doc)["pairs"]}, source
    assert capsys.readouterr().out.count("pairs: acc") == 3


def test_bad_input_is_one_line_and_exit_2(trained, tmp_path, capsys):
    run, _ = trained
    sets = run.parent / "sets"
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "model.pt").write_bytes((run / "model.pt").read_bytes())
    cases = {
        (str(run), "--bin", str(sets / "nope.bin")): "--bin " + str(sets / "nope.bin"),
        (str(run), "--bin", str(sets / "agedb.bin"), "--far", "2"): "--far '2' is not a",
        (str(alone / "model.pt"), "--bin", str(sets / "agedb.bin")): "config.json not found",
        (str(tmp_path), "--bin", str(sets / "agedb.bin")): "is not a run folder",
        (str(tmp_path / "no"), "--bin", str(sets / "agedb.bin")): "no: no such file or folder",
        (str(run), "--bin", str(sets / "pairs.txt")): "not an insightface verification .bin",
    }
    for args, message in cases.items():
        with pytest.raises(SystemExit) as exc:
            main(["eval", *args, "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.count("\n") == 1, err
        assert err.startswith("largebatch: error: ") and message in err, err
