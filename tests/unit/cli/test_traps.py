"""The traps an arcface_torch user fell into, each now one line that says what to write:
divisibility with the nearest valid batch, face keys checked by ``plan``, arcface_torch's key
names and misspellings with a hint, the launcher's ``--local_rank``, and ``largebatch convert``
(ImageFolder -> RecordIO) with progress and one-line errors."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from largebatch.config import ConfigError, load_config
from largebatch.data.recordio import IndexedRecordReader, unpack
from largebatch.plan import resolve_batch
from tests.conftest import CONFIGS, run_cli, run_many, cli


@pytest.mark.parametrize("world", [6, 7, 12])
def test_a_world_that_does_not_divide_names_the_nearest_valid_batches(world: int) -> None:
    # 8192 at micro 128 on 6, 7, 12 GPUs (the cases): the two multiples of
    # micro x world around 8192, each of which then resolves.
    with pytest.raises(ConfigError) as err:
        resolve_batch(8192, 128, None, world)
    unit = 128 * world
    lo, hi = 8192 // unit * unit, (8192 // unit + 1) * unit
    assert f"nearest valid: batch.global_size={lo} or {hi}" in str(err.value)
    for g in (lo, hi):
        assert resolve_batch(g, 128, None, world) == (g, 128, g // unit)


def test_a_micro_size_that_does_not_divide_names_micro_sizes_that_do() -> None:
    with pytest.raises(ConfigError, match=r"or batch.micro_size=64 or 128$"):
        resolve_batch(8192, 100, None, 8)  # 1024 per rank: its divisors nearest 100
    assert resolve_batch(8192, 64, None, 8)[2] == 16


@pytest.mark.parametrize("override, message", [
    ("face.sample_rate=1.5", "face.sample_rate=1.5 must be in (0, 1]"),
    ("face.margin=magface", "face.margin='magface' is not one of arcface|cosface|combined"),
    ("face.m2=3.5", "face.m2=3.5 must be in [0, pi)"),
    ("face.num_classes=0", "face.num_classes=0 must be >= 1"),
])
def test_plan_checks_the_face_keys_train_needs(override: str, message: str) -> None:
    proc = run_cli("plan", str(CONFIGS / "face" / "synthetic_tiny.yaml"), override,
                   "--world-size", "2")
    assert proc.returncode == 2 and proc.stdout == "", proc
    assert proc.stderr.strip() == f"largebatch: error: {message}" or message in proc.stderr, proc
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("override, hint", [
    ("fp16=true", "(arcface_torch's fp16: here train.precision=fp16)"),
    ("margin_list=[1.0,0.5,0.0]", "face.margin=combined with face.m1, face.m2, face.m3"),
    ("num_epoch=20", "here train.epochs"),
    ("optim.nme=sgd", "did you mean 'optim.name'?"),
    ("schedule.warmup_step=5", "did you mean 'schedule.warmup_steps'?"),
])
def test_unknown_keys_say_what_to_write(override: str, hint: str) -> None:
    with pytest.raises(ConfigError, match="unknown config key") as err:
        load_config(CONFIGS / "face" / "synthetic_tiny.yaml", [override])
    assert hint in str(err.value)


def test_the_launchers_local_rank_argument_is_accepted() -> None:
    # torch.distributed.launch and the deepspeed launcher append it; both spellings.
    procs = run_many([cli("plan", str(CONFIGS / "mnist" / "seed.yaml"), "--local_rank=0"),
                      cli("plan", str(CONFIGS / "mnist" / "seed.yaml"), "--local-rank", "0",
                          "--json")])
    assert all(p.returncode == 0 for p in procs), procs
    assert procs[0].stdout.startswith("batch plan: global 60")


def _image(path, size=(112, 112), fmt=None) -> np.ndarray:
    pixels = np.random.default_rng(abs(hash(str(path))) % 2 ** 32).integers(
        0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, fmt)
    return pixels


def test_convert_writes_a_record_file_the_reader_reads_back(tmp_path) -> None:
    src = tmp_path / "faces"
    for who, n in (("alice", 3), ("bob", 2)):
        for i in range(n):
            _image(src / who / f"{i}.png")
    proc = run_cli("convert", str(src), str(tmp_path / "rec"))
    assert proc.returncode == 0, proc
    assert "convert: 5/5 images (100%)" in proc.stderr
    reader = IndexedRecordReader(tmp_path / "rec" / "train.rec", tmp_path / "rec" / "train.idx")
    header, _ = unpack(reader.read(0), "record 0")
    assert (header.label[0], header.label[1]) == (6, 8)  # 5 images, then 2 identities
    labels = [int(unpack(reader.read(k), f"record {k}")[0].label) for k in range(1, 6)]
    assert labels == [0, 0, 0, 1, 1]


def test_convert_names_a_bad_image_in_one_line_and_leaves_nothing(tmp_path) -> None:
    src = tmp_path / "faces"
    _image(src / "alice" / "0.png")
    _image(src / "alice" / "1.png", size=(112, 100))
    proc = run_cli("convert", str(src), str(tmp_path / "rec"))
    assert proc.returncode == 2, proc
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (f"largebatch: error: {src / 'alice' / '1.png'}: image is 112x100, expected "
                    f"112x112 (aligned face crops, as insightface ships them)")
    assert not (tmp_path / "rec" / "train.rec").exists()
