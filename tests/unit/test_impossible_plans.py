"""Impossible plans are refused in one line (issue 21): a global batch above the training set
(no step would ever hold it, yet the LR is scaled for it), MNIST files whose headers disagree
with their sizes or with each other (they used to train until a StopIteration), a label
outside the classes the model outputs (an IndexError, or a device-side assert on CUDA)."""
from __future__ import annotations

import os
import re
import struct
from pathlib import Path

import pytest
import torch

from largebatch.config import ConfigError, DataConfig, load_config
from largebatch.plan import make_plan
from tests.conftest import CONFIGS
from tests.unit.data.test_hostile_inputs import assert_refused, run_all

MLP = CONFIGS / "mnist" / "mlp.yaml"  # global 240 = micro 60 x accum 4 on one process
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
         "t10k-labels-idx1-ubyte")


def _plan(world: int, n: int, *overrides: str):
    return make_plan(load_config(MLP, list(overrides)), world, n)


@pytest.mark.parametrize("world, n, overrides, message", [
    (1, 100, ["data.subset=100"], "batch.global_size=240 is larger than the training set: 100 "
     "samples (data.subset=100); no step would ever hold 240 samples, yet the LR is scaled for "
     "240; nearest fix: batch.global_size=60 or data.subset >= 240"),
    (2, 1000, ["batch.global_size=2400"], "nearest fix: batch.global_size=960"),
    (2, 100, ["data.drop_last=true"], "100 samples; no step would ever hold 240 samples, yet "
     "the LR is scaled for 240 (and data.drop_last leaves no step at all); nearest fix: "
     "batch.global_size=100 with batch.micro_size=50"),
    (4, 3, ["batch.global_size=null", "batch.micro_size=1", "batch.accum_steps=1"],
     "nearest fix: at most 3 ranks"),
    (1, 59999, ["batch.global_size=60000", "batch.micro_size=auto"],
     "nearest fix: batch.global_size=59999"),
])
def test_a_global_batch_above_the_data_is_refused_with_the_fix(world, n, overrides, message):
    with pytest.raises(ConfigError) as exc:
        _plan(world, n, *overrides)
    assert message in str(exc.value), str(exc.value)
    # the first fix it names is a plan that is accepted
    fix = str(exc.value).split("nearest fix: ")[1].split(" or ")[0]
    if fix.startswith("batch."):
        fixes = [f"batch.{f}" for f in fix.replace(" with ", " ").split("batch.") if f]
        fixes += ["batch.accum_steps=null"] * ("micro_size" in fix)
        assert _plan(world, n, *overrides, *(f.strip() for f in fixes)).global_size <= n


def test_a_global_batch_that_fits_is_kept():
    assert _plan(1, 240).steps_per_epoch == 1  # exactly the data: one full step
    assert _plan(1, 240, "data.drop_last=true").steps_per_epoch == 1
    assert _plan(2, 241).steps_per_epoch == 2  # the epoch's short last window stays legal


def _idx(dims: tuple[int, ...], data: bytes, magic: int | None = None) -> bytes:
    magic = 0x0800 | len(dims) if magic is None else magic
    return struct.pack(f">I{len(dims)}I", magic, *dims) + data


def _fake_mnist(root: Path, images: bytes, labels: bytes) -> DataConfig:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / FILES[0]).write_bytes(images)
    (raw / FILES[1]).write_bytes(labels)
    return DataConfig(root=str(root), download=False)


def test_mnist_headers_are_checked_against_the_files(tmp_path):
    from largebatch.data.mnist import mnist_size
    ok = _fake_mnist(tmp_path / "ok", _idx((3, 28, 28), bytes(3 * 784)), _idx((3,), b"\0\1\2"))
    assert mnist_size(ok) == 3 and mnist_size(ok, train=False) == 10000  # t10k: not there
    for name, images, labels, message in [
        ("short", _idx((3, 28, 28), bytes(3 * 784)), _idx((2,), b"\0\1"),
         "2 labels for the 3 images of train-images-idx3-ubyte"),
        ("claims", _idx((10 ** 9, 28, 28), bytes(3 * 784)), _idx((3,), b"\0\1\2"),
         "the header says 1000000000 x 28 x 28 bytes of data (784000000016 bytes with the "
         f"header) but the file has {16 + 3 * 784} bytes"),
        ("cut", _idx((3, 28, 28), bytes(3 * 784)), _idx((3,), b"\0\1"), "the file has 10 bytes"),
        ("shape", _idx((3, 32, 32), bytes(3 * 1024)), _idx((3,), b"\0\1\2"),
         "images are 32x32, MNIST's are 28x28"),
        ("magic", _idx((3, 28, 28), bytes(3 * 784), magic=0x0D03), _idx((3,), b"\0\1\2"),
         "magic 0x00000d03, expected 0x00000803"),
        ("empty", b"", _idx((3,), b"\0\1\2"), "0 bytes, shorter than the 16-byte idx header"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            mnist_size(_fake_mnist(tmp_path / name, images, labels))


@pytest.fixture(scope="module")
def mnist_runs(mnist_root, tmp_path_factory):
    """Real MNIST with one file changed (the others linked), each trained by a real process."""
    d = tmp_path_factory.mktemp("mnist")
    raw = Path(mnist_root) / "MNIST" / "raw"

    def variant(name: str, file: str, content: bytes) -> Path:
        folder = d / name / "MNIST" / "raw"
        folder.mkdir(parents=True)
        for f in FILES:
            if f != file:
                os.symlink(raw / f, folder / f)
        (folder / file).write_bytes(content)
        return d / name

    labels = (raw / FILES[1]).read_bytes()
    images = bytearray((raw / FILES[0]).read_bytes())
    bad = bytearray(labels)
    bad[8 + 12345] = 200
    images[4:8] = struct.pack(">I", 10 ** 9)
    roots = {"short_labels": variant("short", FILES[1], _idx((59000,), labels[8:59008])),
             "label_200": variant("bad", FILES[1], bytes(bad)),
             "images_claim_1e9": variant("claim", FILES[0], bytes(images))}
    train = ("train", str(MLP), "data.download=false", "train.max_steps=1",
             "log.progress=false", "checkpoint.resume=never")
    return run_all({
        **{name: (*train, f"data.root={root}", f"log.out_dir={d / name / 'run'}")
           for name, root in roots.items()},
        "global_above_subset": ("plan", str(MLP), f"data.root={mnist_root}",
                                "data.download=false", "data.subset=100"),
    })


@pytest.mark.parametrize("name, needles", [
    ("short_labels", [FILES[1], "59000 labels for the 60000 images"]),
    ("label_200", [FILES[1], "label 200 of sample 12345", "MNIST's 10 classes"]),
    ("images_claim_1e9", [FILES[0], "1000000000 x 28 x 28", "the file has 47040016 bytes"]),
    ("global_above_subset", ["batch.global_size=240", "100 samples (data.subset=100)",
                             "nearest fix: batch.global_size=60"]),
])
def test_impossible_run_is_one_line_before_training(mnist_runs, name, needles):
    print(mnist_runs[name].report())
    assert_refused(mnist_runs[name], *needles)


def test_classification_labels_are_checked_against_the_model_outputs():
    from largebatch.tasks.classification import ClassificationTask
    task = ClassificationTask(load_config(MLP))
    model = task.build().model
    x = torch.zeros(4, 1, 28, 28)
    with pytest.raises(ConfigError, match="training label 10 is outside the 10 classes "
                                          "model.name='mlp' outputs"):
        task.loss(model, x, torch.tensor([0, 3, 10, 2]))
    fresh = ClassificationTask(load_config(MLP))
    assert torch.isfinite(fresh.loss(model, x, torch.tensor([0, 3, 9, 2])))
    with pytest.raises(ConfigError, match="training label -1 is outside"):
        ClassificationTask(load_config(MLP)).loss(model, x, torch.tensor([0, -1, 1, 2]))
