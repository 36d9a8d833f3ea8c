"""insightface RecordIO without mxnet: dmlc framing and IRHeader against hand-built bytes,
exact read-back through the rank-sharded loaders (2 ranks, 0 and 2 workers), corrupt files."""
from __future__ import annotations

import io
import pickle
import shutil
import struct

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DistributedSampler

from largebatch.config import ConfigError, load_config
from largebatch.data import recordio, recordio_write
from largebatch.data.recordio import (IndexedRecordReader, RecordFaceSource, RecordIOLoader,
                                      frame, image_keys, pack, read_record, unpack)
from largebatch.data.recordio_write import RecordWriter, write_face_rec
from largebatch.data.registry import dataset
from tests.conftest import REPO

MAGIC_LE = bytes.fromhex("0a23d7ce")  # 0xced7230a little-endian, as dmlc writes it
N, IDS = 24, 6  # images, identities (4 images each)


def jpeg(seed: int, size: int = 112, fmt: str = "JPEG") -> bytes:
    """An asymmetric test image (random 8x8 blocks), encoded at high quality."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    pixels = np.kron(blocks, np.ones((8, 8, 1), np.uint8))
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def reference(data: bytes) -> torch.Tensor:
    """insightface's transform done by PIL + torchvision: ToTensor, Normalize(0.5, 0.5)."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    return TF.normalize(TF.to_tensor(img), [0.5] * 3, [0.5] * 3)


def face_cfg(root, **data):
    return load_config(base={"task": {"name": "face"},
                             "data": {"name": "recordio", "root": str(root), **data},
                             "face": {"num_classes": IDS}})


@pytest.fixture(scope="module")
def rec(tmp_path_factory):
    """A .rec of N images: labels i // 4; every third record carries float labels (flag 3)."""
    root = tmp_path_factory.mktemp("rec")
    images = [jpeg(i) for i in range(N)]
    labels = [i // 4 for i in range(N)]
    samples = [(im, (lab, 0.25, 7.0) if i % 3 == 0 else lab)
               for i, (im, lab) in enumerate(zip(images, labels))]
    assert write_face_rec(root, samples) == N
    return root, images, labels


def one_line_error(exc_info, *parts) -> str:
    text = str(exc_info.value)
    assert "\n" not in text
    for part in parts:
        assert str(part) in text, (part, text)
    return text


# ---------------------------------------------------------------- framing and header, by hand

def lrec(cflag: int, length: int) -> bytes:
    return struct.pack("<I", cflag << 29 | length)


@pytest.mark.parametrize("payload, expected", [
    (b"abcde", MAGIC_LE + lrec(0, 5) + b"abcde" + b"\0\0\0"),
    (b"abcd", MAGIC_LE + lrec(0, 4) + b"abcd"),
    # the magic at an aligned offset splits the record and is dropped: parts 1 (start), 3 (end)
    (b"ABCD" + MAGIC_LE + b"xy", MAGIC_LE + lrec(1, 4) + b"ABCD" + MAGIC_LE + lrec(3, 2)
     + b"xy\0\0"),
    # two aligned magics: start, continue (empty), end
    (MAGIC_LE + MAGIC_LE + b"z", MAGIC_LE + lrec(1, 0) + MAGIC_LE + lrec(2, 0) + MAGIC_LE
     + lrec(3, 1) + b"z\0\0\0"),
    # not aligned: not split
    (b"A" + MAGIC_LE + b"xyz", MAGIC_LE + lrec(0, 8) + b"A" + MAGIC_LE + b"xyz"),
], ids=["pad3", "pad0", "split", "split3", "unaligned"])
def test_framing_is_dmlc_recordio_bytes(payload, expected):
    assert frame(payload) == expected
    stream = io.BytesIO(b"junk" + expected + MAGIC_LE + lrec(0, 0))
    assert read_record(stream, 4, "test") == payload
    assert stream.tell() == 4 + len(expected)


def test_irheader_is_struct_IfQQ_with_float_labels_after_it():
    assert pack(5.0, b"jpg", id=7, id2=9) == struct.pack("<IfQQ", 0, 5.0, 7, 9) + b"jpg"
    multi = pack([1.0, 2.5, -3.0], b"jpg")
    assert multi == (struct.pack("<IfQQ", 3, 0.0, 0, 0)
                     + struct.pack("<3f", 1.0, 2.5, -3.0) + b"jpg")
    head, body = unpack(multi, "test")
    assert (head.flag, head.label, body) == (3, (1.0, 2.5, -3.0), b"jpg")
    head, body = unpack(pack(5.0, b"jpg", id=7, id2=9), "test")
    assert (head.flag, head.label, head.id, head.id2, body) == (0, 5.0, 7, 9, b"jpg")


def test_written_file_has_insightface_header_and_identity_records(rec):
    root, images, labels = rec
    lines = (root / "train.idx").read_text().splitlines()
    keys = [int(line.split("\t")[0]) for line in lines]
    offsets = [int(line.split("\t")[1]) for line in lines]
    assert keys == list(range(N + 1 + IDS)) and offsets == sorted(offsets) and offsets[0] == 0
    reader = IndexedRecordReader(root / "train.rec", root / "train.idx")
    head, _ = unpack(reader.read(0), "r0")
    assert (head.flag, head.label) == (2, (N + 1.0, N + 1.0 + IDS))
    for j in range(IDS):  # identity j: its images are records [1 + 4j, 5 + 4j)
        head, body = unpack(reader.read(N + 1 + j), "id")
        assert (head.label, head.id, body) == ((1.0 + 4 * j, 5.0 + 4 * j), j, b"")
    head, body = unpack(reader.read(1), "r1")  # image 0: float labels (flag 3), then the JPEG
    assert (head.flag, head.label, body) == (3, (0.0, 0.25, 7.0), images[0])
    head, body = unpack(reader.read(2), "r2")
    assert (head.flag, head.label, body) == (0, 0.0, images[1])
    keys, identities = image_keys(reader)
    assert keys.tolist() == list(range(1, N + 1)) and identities == IDS
    spec = dataset("recordio")
    assert spec.size(face_cfg(root), True) == N
    assert spec.size(face_cfg(root, subset=10), True) == 10
    assert spec.size(face_cfg(root, num_samples=N), True) == N


def test_without_header_every_indexed_record_is_an_image(tmp_path):
    images = [jpeg(100 + i) for i in range(5)]
    with RecordWriter(tmp_path / "train.rec", tmp_path / "train.idx") as out:
        for key in (3, 0, 4, 1, 2):  # record 0 is an image (flag 0): MXFaceDataset's else-branch
            out.write(key, pack(float(key % 2), images[key]))
    source = RecordFaceSource(tmp_path, num_classes=2)
    assert source.keys.tolist() == [3, 0, 4, 1, 2]  # the .idx's order
    for i, key in enumerate([3, 0, 4, 1, 2]):
        img, label = source.read(i)
        assert label == key % 2
        assert torch.equal(img, torch.from_numpy(np.array(
            Image.open(io.BytesIO(images[key])).convert("RGB"))).permute(2, 0, 1))


# ---------------------------------------------------------------- sharded loaders read it back

def read_epoch(loader, epoch):
    """Rows of one epoch: (global index, label, flipped?) checked exactly against PIL."""
    loader.set_epoch(epoch)
    batches = list(loader)
    assert len(batches) == len(loader)
    rows = []
    for x, y in batches:
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[1:] == (3, 112, 112)
        rows += list(zip(x, y.tolist()))
    return rows, [len(y) for _, y in batches]


@pytest.mark.parametrize("workers", [0, 2])
def test_two_ranks_read_every_image_exactly_once(rec, workers):
    root, images, labels = rec
    cfg = face_cfg(root, num_workers=workers)
    refs = [reference(im) for im in images]
    flips = {}
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            loader = RecordIOLoader(cfg, 5, rank, 2, 3, torch.device("cpu"))
            rows, sizes = read_epoch(loader, epoch)
            sampler = DistributedSampler(range(N), num_replicas=2, rank=rank, shuffle=True,
                                         seed=3)
            sampler.set_epoch(epoch)
            order = list(sampler)
            assert sizes == [5, 5, 2] and len(rows) == len(order) == 12
            for (x, y), i in zip(rows, order):
                assert y == labels[i]
                plain, mirrored = torch.equal(x, refs[i]), torch.equal(x, TF.hflip(refs[i]))
                assert plain != mirrored  # exactly one of them (the images are asymmetric)
                flips[epoch, i] = mirrored
            seen.append(order)
        assert not set(seen[0]) & set(seen[1]) and set(seen[0]) | set(seen[1]) == set(range(N))
    for epoch in (0, 1):
        assert 6 <= sum(flips[epoch, i] for i in range(N)) <= 18  # p = 1/2 per sample
    assert any(flips[0, i] != flips[1, i] for i in range(N))  # redrawn each epoch
    # layout independence: one rank holding everything flips the same samples
    single = RecordIOLoader(cfg, 7, 0, 1, 3, torch.device("cpu"))
    rows, _ = read_epoch(single, 1)
    sampler = DistributedSampler(range(N), num_replicas=1, rank=0, seed=3)
    sampler.set_epoch(1)
    assert len(rows) == N
    for (x, _), i in zip(rows, list(sampler)):
        assert torch.equal(x, TF.hflip(refs[i]) if flips[1, i] else refs[i])


def test_drop_last_and_subset_follow_distributed_sampler(rec):
    root, images, labels = rec
    cfg = face_cfg(root, subset=15, drop_last=True)
    got = []
    for rank in (0, 1):
        loader = RecordIOLoader(cfg, 4, rank, 2, 0, torch.device("cpu"))
        sampler = DistributedSampler(range(15), num_replicas=2, rank=rank, seed=0,
                                     drop_last=True)
        ys = torch.cat([y for _, y in loader]).tolist()
        assert len(loader) == 1 and ys == [labels[i] for i in list(sampler)[:4]]
        got.append(len(list(sampler)))
    assert got == [7, 7]


def test_reader_handles_are_per_process_and_not_pickled(rec):
    root, _, _ = rec
    reader = IndexedRecordReader(root / "train.rec", root / "train.idx")
    first = reader.read(5)
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._fh is None and clone.read(5) == first


def test_imagefolder_tree_converts_to_rec(tmp_path):
    for name, fmt, seeds in (("bob", "JPEG", (1, 2)), ("amy", "PNG", (3,))):
        (tmp_path / "tree" / name).mkdir(parents=True)
        for s in seeds:
            ext = "jpg" if fmt == "JPEG" else "png"
            (tmp_path / "tree" / name / f"{s}.{ext}").write_bytes(jpeg(s, fmt=fmt))
    assert recordio_write.imagefolder_to_rec(tmp_path / "tree", tmp_path / "rec") == 3
    reader = IndexedRecordReader(tmp_path / "rec" / "train.rec", tmp_path / "rec" / "train.idx")
    (h1, png), (h2, j1), (h3, j2) = (unpack(reader.read(k), "") for k in (1, 2, 3))
    assert [h1.label, h2.label, h3.label] == [0.0, 1.0, 1.0]  # amy < bob
    assert j1 == jpeg(1) and j2 == jpeg(2)  # JPEG files are copied byte for byte
    png_pixels = np.asarray(Image.open(io.BytesIO(jpeg(3, fmt="PNG"))).convert("RGB"), float)
    reencoded = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), float)
    assert png[:2] == b"\xff\xd8" and np.abs(png_pixels - reencoded).mean() < 12  # ~85: unrelated


# ---------------------------------------------------------------- corrupt files: one line each

@pytest.fixture
def broken(rec, tmp_path):
    root, _, _ = rec
    for name in ("train.rec", "train.idx"):
        shutil.copy(root / name, tmp_path / name)
    offsets = dict(tuple(map(int, line.split("\t")))
                   for line in (tmp_path / "train.idx").read_text().splitlines())
    return tmp_path, offsets


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_magic_names_file_and_record(broken, workers):
    root, offsets = broken
    data = bytearray((root / "train.rec").read_bytes())
    data[offsets[3]:offsets[3] + 4] = b"\0\0\0\0"
    (root / "train.rec").write_bytes(bytes(data))
    loader = RecordIOLoader(face_cfg(root, num_workers=workers), 24, 0, 1, 0, torch.device("cpu"))
    with pytest.raises(ConfigError) as exc:
        list(loader)
    one_line_error(exc, root / "train.rec", "record 3 ", "bad magic 0x00000000")


def test_truncated_file_fails_at_open_naming_the_last_record(broken):
    root, offsets = broken
    data = (root / "train.rec").read_bytes()
    (root / "train.rec").write_bytes(data[:-10])
    last = max(offsets, key=offsets.get)
    with pytest.raises(ConfigError) as exc:
        RecordFaceSource(root, IDS)
    one_line_error(exc, root / "train.rec", f"record {last} ", "truncated")


def test_index_offset_past_end_of_file(broken):
    root, offsets = broken
    size = (root / "train.rec").stat().st_size
    lines = [f"{k}\t{size + 100 if k == 5 else o}" for k, o in offsets.items()]
    (root / "train.idx").write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as exc:
        RecordFaceSource(root, IDS)
    one_line_error(exc, root / "train.rec", "record 5:", f"offset {size + 100}", "past the end")
    with pytest.raises(ConfigError):  # and the plan, which only sizes the set, says the same
        dataset("recordio").size(face_cfg(root), True)


def test_plan_cli_exits_2_with_one_line(broken, capsys):
    from largebatch.cli import main
    root, offsets = broken
    (root / "train.idx").write_text("0\t0\n1\t99999999\n")
    with pytest.raises(SystemExit) as exit_:
        main(["plan", str(REPO / "configs/face/ms1mv3_r50.yaml"), f"data.root={root}",
              "data.num_samples=0", "--world-size", "8"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1
    assert "record 1:" in lines[0] and "past the end" in lines[0] and str(root) in lines[0]


def _rewrite_record(root, offsets, key, record: bytes) -> None:
    """Append ``record`` at the end of the .rec and point key's index line at it."""
    with open(root / "train.rec", "ab") as f:
        offsets[key] = f.tell()
        f.write(frame(record))
    (root / "train.idx").write_text("".join(f"{k}\t{o}\n" for k, o in offsets.items()))


@pytest.mark.parametrize("record, message", [
    (b"\x01\x02", "shorter than the 24-byte IRHeader"),
    (struct.pack("<IfQQ", 5, 0.0, 0, 0) + b"\0" * 8, "flag=5 announces 5 float32 labels"),
    (pack(1.0, b"\xff\xd8\xff\xe0 this is not a JPEG"), "not a readable image"),
    (pack(1.0, jpeg(1)[:600]), "not a readable image"),  # cut inside the entropy-coded data
    (pack(1.0, jpeg(1, size=96)), "image is 96x96, expected 112x112"),
    (pack(float(IDS), jpeg(1)), f"label {IDS} is outside face.num_classes={IDS}"),
    (pack(1.5, jpeg(1)), "label 1.5 is not an identity"),
], ids=["short", "labels-missing", "not-jpeg", "cut-jpeg", "96px", "label-range", "label-1.5"])
def test_bad_record_content_names_file_and_record(broken, record, message):
    root, offsets = broken
    _rewrite_record(root, offsets, 7, record)
    source = RecordFaceSource(root, IDS)
    with pytest.raises(ConfigError) as exc:
        source.read(6)  # image 6 is record 7
    one_line_error(exc, root / "train.rec", "record 7", message)


def test_bad_index_lines_and_continuations(broken):
    root, offsets = broken
    (root / "train.idx").write_text("0\t0\n1\t15384\nbogus line here\n")
    with pytest.raises(ConfigError) as exc:
        RecordFaceSource(root, IDS)
    one_line_error(exc, root / "train.idx", "line 3")
    stream = io.BytesIO(MAGIC_LE + lrec(2, 0))  # a record cannot start with a continuation
    with pytest.raises(ConfigError) as exc:
        read_record(stream, 0, "f.rec: record 9")
    one_line_error(exc, "f.rec: record 9", "continuation flag 2 out of sequence")


def test_size_reads_no_image(rec, monkeypatch):
    root, _, _ = rec

    def fail(*args):
        raise AssertionError("size() decoded an image")
    monkeypatch.setattr(recordio, "decode_image", fail)
    assert dataset("recordio").size(face_cfg(root), True) == N
    assert dataset("recordio").size(face_cfg(root / "absent", num_samples=5179510), True) \
        == 5179510
    with pytest.raises(ConfigError) as exc:
        dataset("recordio").size(face_cfg(root, num_samples=N + 1), True)
    one_line_error(exc, f"data.num_samples={N + 1}", f"holds {N} images")


def test_prepare_checks_the_files_from_the_data_section(rec, tmp_path):
    from types import SimpleNamespace
    denv = SimpleNamespace(rank=0, local_rank=0)  # no process group: this rank's own check
    root, _, _ = rec
    dataset("recordio").prepare(face_cfg(root).data, denv)  # run.py passes cfg.data
    with pytest.raises(ConfigError) as exc:
        dataset("recordio").prepare(face_cfg(tmp_path).data, denv)
    one_line_error(exc, tmp_path / "train.rec", "not found")
