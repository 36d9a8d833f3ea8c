"""``largebatch embed`` on the three inputs, against embeddings computed here by plain code
(PIL decode, ``(x / 255 - 0.5) / 0.5``, model(x) + model(flip(x)), normalise) from the run's
``model.pt`` and ``config.json``, and the sidecar against the inputs it names.

The run is the tiny trained run of ``test_evaluate`` (built once per session)."""
from __future__ import annotations

import csv
import io

import numpy as np
import pytest
from PIL import Image

from largebatch.cli.main import main
from largebatch.data.bin_pairs import load_bin
from largebatch.data.recordio_write import write_face_rec
from tests.unit.deploy.test_evaluate import face_jpeg, reference_embed, tiny_run

TOL = 1e-5  # fp32 embeddings of the same weights, batched differently


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    return tiny_run(tmp_path_factory.getbasetemp() / "deploy_tiny_run")


def rows(path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_embed_a_bin(trained, tmp_path, capsys):
    run, sets = trained
    images, same = sets["agedb"]
    out = tmp_path / "out" / "agedb.npy"
    with pytest.raises(SystemExit) as exc:  # in-process (eval's tests run the real ones)
        main(["embed", str(run), str(run.parent / "sets" / "agedb.bin"), "--out", str(out),
              "--batch-size", "8", "--progress-every", "3"])
    stdout = capsys.readouterr().out
    assert exc.value.code == 0
    emb = np.load(out)
    assert emb.shape == (60, 32) and emb.dtype == np.float32
    assert np.abs(emb - reference_embed(run, images).numpy()).max() <= TOL
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)
    side = rows(out.with_suffix(".csv"))
    assert [r["row"] for r in side] == [str(i) for i in range(60)]
    assert [(r["image"], r["pair"], r["side"], r["same"]) for r in side] == \
        [(str(i), str(i // 2), str(i % 2), str(int(same[i // 2]))) for i in range(60)]
    # not a terminal: a plain line every 3 batches of 8 (batches 3, 6) and after the last (8)
    progress = [line for line in stdout.splitlines() if line.startswith("embedded")]
    assert [p.split(" images")[0] for p in progress] == \
        ["embedded 24/60", "embedded 48/60", "embedded 60/60"]
    assert f"wrote {out} (60 x 32 float32) and {out.with_suffix('.csv')}" in stdout


def test_embed_a_folder_in_imagefolder_order(trained, tmp_path, capsys):
    run, _ = trained
    root = tmp_path / "faces"
    files = {"id_b/2.jpg": face_jpeg(2, 0), "id_a/1.png": face_jpeg(1, 1),
             "id_a/0.jpg": face_jpeg(1, 0), "top.jpg": face_jpeg(3, 0)}
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".png"):  # the decoded JPEG's pixels, stored as PNG
            Image.open(io.BytesIO(data)).save(root / name, "PNG")
        else:
            (root / name).write_bytes(data)
    (root / ".hidden.jpg").write_bytes(files["top.jpg"])
    (root / "notes.txt").write_text("not an image")
    out = tmp_path / "faces.npy"
    with pytest.raises(SystemExit) as exc:  # 1 DataLoader worker decodes
        main(["embed", str(run / "model.pt"), str(root), "--out", str(out), "--workers", "1"])
    assert exc.value.code == 0, capsys.readouterr().err
    order = ["top.jpg", "id_a/0.jpg", "id_a/1.png", "id_b/2.jpg"]
    side = rows(out.with_suffix(".csv"))
    assert [(r["path"], r["identity"]) for r in side] == \
        [(p, p.split("/")[0] if "/" in p else "") for p in order]
    want = reference_embed(run, [(root / p).read_bytes() for p in order]).numpy()
    assert np.abs(np.load(out) - want).max() <= TOL


def test_embed_a_rec_with_its_labels(trained, tmp_path, capsys):
    run, _ = trained
    samples = [(face_jpeg(c, k), c) for c in range(3) for k in range(2)]
    assert write_face_rec(tmp_path / "rec", samples) == 6
    out = tmp_path / "rec.npy"
    with pytest.raises(SystemExit) as exc:
        main(["embed", str(run / "checkpoints"), str(tmp_path / "rec" / "train.rec"),
              "--out", str(out)])
    assert exc.value.code == 0, capsys.readouterr().err
    side = rows(out.with_suffix(".csv"))
    assert [(r["record"], r["label"]) for r in side] == \
        [(str(k + 1), str(c)) for k, (_, c) in enumerate(samples)]
    want = reference_embed(run, [image for image, _ in samples]).numpy()
    assert np.abs(np.load(out) - want).max() <= TOL


def test_embed_bad_input_is_one_line_and_exit_2(trained, tmp_path, capsys):
    run, _ = trained
    small = tmp_path / "small"
    small.mkdir()
    (small / "a.jpg").write_bytes(face_jpeg(0, 0))
    Image.new("RGB", (100, 100)).save(small / "b.jpg")
    images, _ = load_bin(run.parent / "sets" / "pairs.bin")
    cases = {
        (str(small), "x.npy", "1"): f"{small / 'b.jpg'}: image is 100x100, expected 112x112",
        (str(small), "x.npy", "0"): f"{small / 'b.jpg'}: image is 100x100",
        (str(tmp_path / "none"), "x.npy", "0"): "none: no such file or folder",
        (str(run.parent / "sets" / "pairs.bin"), "x.txt", "0"): "written as a .npy file",
        (str(run.parent / "sets" / "pairs.txt"), "x.npy", "0"): "not an image folder, a .rec",
    }
    for (source, name, workers), message in cases.items():
        with pytest.raises(SystemExit) as exc:
            main(["embed", str(run), source, "--out", str(tmp_path / name),
                  "--workers", workers])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.count("\n") == 1, err
        assert err.startswith("largebatch: error: ") and message in err, err
        assert not (tmp_path / name).exists() and not (tmp_path / "x.npy.tmp").exists()
    assert len(images) == 48
