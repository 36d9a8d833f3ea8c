"""``largebatch export`` on real runs: a tiny face run on 1 process and on 2 torchrun ranks, and
an MNIST classifier, each trained by real processes, then exported through the CLI.

What is checked: the plain state_dict equals the run's ``model.pt`` (and the checkpoint set's
model) bit for bit; the ONNX file run by onnxruntime agrees with the torch model rebuilt here
from that state_dict on the run's own verification images at two batch sizes, within the
tolerance the command states; the torch.export and TorchScript files do too; the sidecar
documents the model; bad input is one line and exit 2, a parity miss one line and exit 1.

The exports run in this process (``largebatch.cli.main.main``, the command's own entry point),
so torch.export's and the ONNX exporter's one-time start-up is paid once for the file.
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.conftest import CONFIGS, _data_root, cli_env, model_weights, run_cli, run_torchrun

onnxruntime = pytest.importorskip("onnxruntime", reason="pip install -e '.[dev]' (or [export])")

FACE = str(CONFIGS / "face" / "synthetic_tiny.yaml")
FACE_ARGS = ("train.max_steps=3", "face.eval_pairs=16")
MNIST_ARGS = ("data.subset=480", "train.max_steps=2")


def export_cli(*args: str) -> tuple[int, str, str]:
    """``largebatch export ARGS`` in this process: (exit code, stdout, stderr)."""
    from largebatch.cli.main import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            pytest.raises(SystemExit) as exc:
        main(["export", *args])
    return exc.value.code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The trained runs (real processes, side by side) and a real `largebatch export` of a
    folder that is no run."""
    root = tmp_path_factory.mktemp("export")
    (root / "empty").mkdir()
    data = _data_root()
    with ThreadPoolExecutor(4) as pool:
        jobs = {
            "one": pool.submit(run_cli, "train", FACE, *FACE_ARGS, f"log.out_dir={root / 'one'}"),
            "two": pool.submit(run_torchrun, 2, "train", FACE, *FACE_ARGS,
                               f"log.out_dir={root / 'two'}"),
            "not_a_run": pool.submit(run_cli, "export", str(root / "empty")),
        }
        if data is not None:  # the MNIST test itself skips (or fails in CI) without the data
            jobs["mnist"] = pool.submit(
                run_cli, "train", str(CONFIGS / "mnist" / "mlp.yaml"), *MNIST_ARGS,
                f"log.out_dir={root / 'mnist'}", env=cli_env(LARGEBATCH_DATA_ROOT=str(data)))
        done = {name: job.result() for name, job in jobs.items()}
    for name in ("one", "two", "mnist"):
        if name in done:
            assert done[name].returncode == 0, done[name]
    return {"root": root, "one": root / "one", "two": root / "two", "mnist": root / "mnist",
            "not_a_run": done["not_a_run"]}


@pytest.fixture(scope="module")
def from_run(runs: dict) -> tuple[int, str, str, Path]:
    """Every format, from the 1-process run folder (default --out: <run>/export)."""
    return (*export_cli(str(runs["one"])), runs["one"] / "export")


@pytest.fixture(scope="module")
def from_set(runs: dict) -> tuple[int, str, str, Path]:
    """ONNX from the 2-rank run's checkpoint set."""
    out = runs["root"] / "set-export"
    step = runs["two"] / "checkpoints" / "step-000003"
    return (*export_cli(str(step), "--out", str(out), "--formats", "onnx"), out)


def _config(run: Path):
    from largebatch.config import load_config
    return load_config(base=json.loads((run / "config.json").read_text()))


def _face_model(run: Path, weights: Path) -> torch.nn.Module:
    """The backbone built here from the run's config, holding the exported state_dict."""
    from largebatch.models import build_face_backbone
    cfg = _config(run)
    model = build_face_backbone(cfg.model, cfg.face.embedding_size)
    model.load_state_dict(torch.load(weights, weights_only=True))
    return model.eval()


def _pair_images(run: Path) -> torch.Tensor:
    """The run's held-out verification images (both of every pair), as its evaluation saw."""
    from largebatch.data.faces import verification_pairs
    return verification_pairs(_config(run))[0].flatten(0, 1)


def _assert_onnx_agrees(onnx_file: Path, model: torch.nn.Module, images: torch.Tensor,
                        sizes: tuple[int, ...]) -> None:
    """onnxruntime (CPU) vs torch within the command's stated tolerance at each batch size."""
    from largebatch.deploy.parity import ATOL, RTOL
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    for n in sizes:
        x = images[:n].contiguous()
        with torch.no_grad():
            ref = model(x)
        got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
        assert got.shape == ref.shape
        diff = (got - ref).abs().max().item()
        assert diff <= ATOL + RTOL * ref.abs().max().item(), (n, diff)


def test_face_run_exports_every_format(runs: dict, from_run: tuple) -> None:
    code, out, err, folder = from_run
    assert code == 0, out + err
    assert err == ""
    for name in ("backbone.pt", "backbone.json", "backbone.onnx", "backbone.pt2",
                 "backbone.torchscript.pt"):
        assert (folder / name).is_file(), name
    for fmt in ("onnx", "pt2", "torchscript"):  # one parity line per format, each within
        line = next(x for x in out.splitlines()
                    if x.strip().startswith(fmt) and "max|diff|" in x)
        assert "at 8" in line and "at 1" in line and line.endswith(": ok"), line
    assert "the run's evaluation data (synthetic_faces: 8 images)" in out
    # The plain state_dict is model.pt's weights, bit for bit, and loads with weights_only.
    exported = torch.load(folder / "backbone.pt", weights_only=True)
    final = model_weights(runs["one"])
    assert exported.keys() == final.keys()
    assert all(torch.equal(exported[k], final[k]) for k in final)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_face_onnx_pt2_torchscript_agree_with_torch(runs: dict, from_run: tuple) -> None:
    folder = from_run[3]
    model = _face_model(runs["one"], folder / "backbone.pt")
    images = _pair_images(runs["one"])
    _assert_onnx_agrees(folder / "backbone.onnx", model, images, (8, 3))
    import onnx
    graph = onnx.load(str(folder / "backbone.onnx")).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    programs = {"pt2": torch.export.load(str(folder / "backbone.pt2")).module(),
                "torchscript": torch.jit.load(str(folder / "backbone.torchscript.pt"))}
    with torch.no_grad():
        for n in (5, 1):
            ref = model(images[:n])
            for name, program in programs.items():
                assert torch.allclose(program(images[:n]), ref, rtol=0, atol=1e-6), name


def test_sidecar_documents_the_backbone(runs: dict, from_run: tuple) -> None:
    import largebatch
    side = json.loads((from_run[3] / "backbone.json").read_text())
    state = torch.load(from_run[3] / "backbone.pt", weights_only=True)
    assert side["largebatch_version"] == largebatch.__version__
    assert side["source"]["kind"] == "run" and side["source"]["step"] == 3
    assert side["source"]["world_size"] == 1
    assert side["model"]["name"] == "tiny_face" and side["model"]["embedding_size"] == 32
    assert side["input"]["shape"] == ["batch", 3, 16, 16]
    assert side["input"]["channel_order"] == "RGB"
    assert side["input"]["normalisation"].startswith("none: synthetic_faces")
    assert side["output"] == {**side["output"], "name": "embeddings", "shape": ["batch", 32]}
    assert {k: v["shape"] for k, v in side["state_dict"]["tensors"].items()} == \
        {k: list(v.shape) for k, v in state.items()}
    assert side["state_dict"]["file"] == "backbone.pt"
    assert set(side["files"]) == {"onnx", "pt2", "torchscript"}
    results = side["parity"]["results"]
    assert side["parity"]["sizes"] == [8, 1] and side["parity"]["rtol"] == 1e-4
    assert all(r["ok"] and set(r["max_abs_diff"]) == {"8", "1"} for r in results.values())


def test_checkpoint_set_of_two_ranks_exports(runs: dict, from_set: tuple) -> None:
    code, out, err, folder = from_set
    assert code == 0, out + err
    exported = torch.load(folder / "backbone.pt", weights_only=True)
    from largebatch.checkpoint import load_checkpoint
    in_set = load_checkpoint(runs["two"] / "checkpoints" / "step-000003" / "trainer.pt")
    for reference in (in_set["engine"]["model"], model_weights(runs["two"])):
        assert all(torch.equal(exported[k], reference[k]) for k in reference)
    side = json.loads((folder / "backbone.json").read_text())
    assert side["source"]["kind"] == "set" and side["source"]["world_size"] == 2
    assert side["source"]["step"] == 3 and set(side["files"]) == {"onnx"}
    model = _face_model(runs["two"], folder / "backbone.pt")
    _assert_onnx_agrees(folder / "backbone.onnx", model, _pair_images(runs["two"]), (16, 1))


def test_bad_input_is_one_line_and_exit_2(runs: dict, tmp_path: Path) -> None:
    ran = runs["not_a_run"]  # a real process
    assert ran.returncode == 2, ran
    assert ran.stderr.count("\n") == 1 and "is not a run folder" in ran.stderr, ran
    corrupt = tmp_path / "step-000003"
    shutil.copytree(runs["two"] / "checkpoints" / "step-000003", corrupt)
    data = bytearray((corrupt / "trainer.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (corrupt / "trainer.pt").write_bytes(bytes(data))
    for source, expected in ((corrupt, "is not a usable checkpoint set"),
                             (tmp_path, "holds no complete checkpoint set")):
        code, out, err = export_cli(str(source))
        assert code == 2 and out == "", err
        assert err.count("\n") == 1 and expected in err and "sha256" in err, err
    other = tmp_path / "other"
    other.mkdir()
    config = json.loads((runs["one"] / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "neck": {"size": 1}}))
    code, _, err = export_cli(str(other))
    assert code == 2 and err.count("\n") == 1 and "cannot be built" in err, err


def test_missing_onnx_packages_say_how_to_install(runs: dict,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from largebatch.deploy import pipeline
    monkeypatch.setattr(pipeline, "missing_packages", lambda: ["onnxscript"])
    code, out, err = export_cli(str(runs["one"]))
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert 'needs onnxscript for ONNX: pip install "largebatch[export]"' in err, err


def test_a_parity_miss_is_one_line_and_exit_1(runs: dict, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from largebatch.deploy import parity
    monkeypatch.setattr(parity, "_max_diff", lambda out, ref: 1.0)
    code, out, err = export_cli(str(runs["one"]), "--out", str(tmp_path), "--formats", "pt2")
    assert code == 1 and "FAILED" in out
    assert err.count("\n") == 1 and "parity: pt2 max|diff| 1.00e+00 > tolerance" in err, err


def test_mnist_classifier_exports(mnist_root: Path, runs: dict) -> None:
    from largebatch.data.mnist import load_mnist_tensors, normalize_uint8
    from largebatch.models import build_model
    run = runs["mnist"]
    code, out, err = export_cli(str(run), "--formats", "onnx")
    assert code == 0, out + err
    folder = run / "export"
    state = torch.load(folder / "model.pt", weights_only=True)
    final = model_weights(run)
    assert all(torch.equal(state[k], final[k]) for k in final)
    side = json.loads((folder / "model.json").read_text())
    assert side["input"]["shape"] == ["batch", 1, 28, 28]
    assert side["input"]["normalisation"] == "(x / 255 - 0.1307) / 0.3081"
    assert side["output"]["shape"] == ["batch", 10] and side["model"]["name"] == "mlp"
    cfg = _config(run)
    model = build_model(cfg.model)
    model.load_state_dict(state)
    images = normalize_uint8(load_mnist_tensors(cfg.data, train=False)[0][:8])
    _assert_onnx_agrees(folder / "model.onnx", model.eval(), images, (8, 3))
