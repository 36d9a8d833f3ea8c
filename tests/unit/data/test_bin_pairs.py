"""insightface .bin verification sets: Python 2 / 3 pickles of JPEG bytes or uint8 arrays read
back exactly in PairLoader's batch format; hostile pickles refused without running."""
from __future__ import annotations

import builtins
import io
import os
import pickle
import struct

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from largebatch.config import ConfigError, load_config
from largebatch.data.bin_pairs import BinPairLoader, load_bin, val_loaders
from largebatch.data.faces import PairLoader
from largebatch.data.registry import dataset

P = 7  # pairs (14 images): odd, so the two ranks hold 4 and 3
SAME = [k % 3 != 1 for k in range(P)]


def jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (14, 14, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.kron(blocks, np.ones((8, 8, 1), np.uint8))).save(buf, "JPEG", quality=95)
    return buf.getvalue()


IMAGES = [jpeg(1000 + i) for i in range(2 * P)]


def reference(data: bytes) -> torch.Tensor:
    """insightface's test transform by PIL + torchvision: ((x / 255) - 0.5) / 0.5."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    return TF.normalize(TF.to_tensor(img), [0.5] * 3, [0.5] * 3)


# ------------------------------------------------ a Python 2 pickle, written opcode by opcode

def _py2_str(data: bytes) -> bytes:  # Python 2's str: SHORT_BINSTRING / BINSTRING
    if len(data) < 256:
        return b"U" + bytes([len(data)]) + data
    return b"T" + struct.pack("<i", len(data)) + data


def _py2_array(data: bytes) -> bytes:
    """numpy 1.x under Python 2 at protocol 2: _reconstruct(ndarray, (0,), 'b') + BUILD."""
    dtype = (b"cnumpy\ndtype\n" + _py2_str(b"u1") + b"K\x00K\x01\x87R"  # dtype('u1', 0, 1)
             + b"(K\x03" + _py2_str(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
    return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + _py2_str(b"b")
            + b"\x87R" + b"(K\x01J" + struct.pack("<i", len(data)) + b"\x85" + dtype
            + b"\x89" + _py2_str(data) + b"tb")


def py2_pickle(images: list[bytes], same: list[bool], arrays: bool) -> bytes:
    """``pickle.dump((bins, issame_list), f, protocol=2)`` as Python 2 wrote it."""
    item = _py2_array if arrays else _py2_str
    return (b"\x80\x02]q\x00(" + b"".join(item(im) for im in images) + b"e]q\x01("
            + b"".join(b"\x88" if s else b"\x89" for s in same) + b"e\x86q\x02.")


def py3_pickle(images: list[bytes], same: list[bool], arrays: str, protocol: int) -> bytes:
    items = {"bytes": list(images),
             "readonly": [np.frombuffer(im, np.uint8) for im in images],
             "writable": [np.frombuffer(im, np.uint8).copy() for im in images]}[arrays]
    return pickle.dumps((items, same), protocol=protocol)


FORMATS = ([("py2-str", lambda: py2_pickle(IMAGES, SAME, False)),
            ("py2-numpy", lambda: py2_pickle(IMAGES, SAME, True))]
           + [(f"py3-{kind}-p{p}", lambda kind=kind, p=p: py3_pickle(IMAGES, SAME, kind, p))
              for kind in ("bytes", "readonly", "writable") for p in (2, 3, 4, 5)])


def test_py2_emulation_is_what_plain_pickle_and_numpy_read():
    """Positive control: the hand-written Python 2 pickles are real numpy/pickle streams."""
    bins, same = pickle.loads(py2_pickle(IMAGES, SAME, True), encoding="bytes")
    assert all(isinstance(b, np.ndarray) and b.dtype == np.uint8 for b in bins)
    assert [b.tobytes() for b in bins] == IMAGES and same == SAME
    bins, same = pickle.loads(py2_pickle(IMAGES, SAME, False), encoding="bytes")
    assert bins == IMAGES and same == SAME
    with pytest.raises(UnicodeDecodeError):  # why insightface falls back to encoding='bytes'
        pickle.loads(py2_pickle(IMAGES, SAME, False))


@pytest.mark.parametrize("name, make", FORMATS, ids=[f[0] for f in FORMATS])
def test_every_writer_reads_back_exactly(tmp_path, name, make):
    path = tmp_path / "lfw.bin"
    path.write_bytes(make())
    images, same = load_bin(path)
    assert images == IMAGES and same == SAME


@pytest.fixture(scope="module")
def lfw(tmp_path_factory):
    path = tmp_path_factory.mktemp("bins") / "lfw.bin"
    path.write_bytes(py2_pickle(IMAGES, SAME, True))
    return path


def test_two_ranks_hold_every_pair_once_in_pairloader_format(lfw):
    cfg = load_config(base={"task": {"name": "face"}, "data": {"name": "synthetic_faces"}})
    ref_x, ref_y = next(iter(PairLoader(cfg, 0, 2, torch.device("cpu"), batch_size=3)))
    refs = [reference(im) for im in IMAGES]
    seen = []
    for rank, expect, n_batches in ((0, 4, 2), (1, 3, 1)):
        loader = BinPairLoader(lfw, rank, 2, torch.device("cpu"), batch_size=3)
        batches = list(loader)
        assert len(loader) == len(batches) == n_batches and loader.total == P
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        assert (x.dtype, y.dtype, x.dim(), y.shape[1]) == (ref_x.dtype, ref_y.dtype, 5, 2)
        assert x.shape == (expect, 2, 3, 112, 112)
        assert y[:, 0].tolist() == list(range(rank, P, 2))
        assert y[:, 1].tolist() == [int(SAME[k]) for k in range(rank, P, 2)]
        for row, k in zip(x, y[:, 0].tolist()):
            assert torch.equal(row[0], refs[2 * k]) and torch.equal(row[1], refs[2 * k + 1])
        seen += y[:, 0].tolist()
    assert sorted(seen) == list(range(P))


def test_val_loaders_and_registry_eval_loader(lfw, tmp_path):
    root = lfw.parent
    (root / "cfp_fp.bin").write_bytes(py3_pickle(IMAGES[:4], SAME[:2], "bytes", 4))
    base = {"task": {"name": "face"}, "data": {"name": "imagefolder", "root": str(tmp_path)},
            "face": {"val_targets": ["lfw", "cfp_fp"], "val_root": str(root)}}
    cfg = load_config(base=base)
    loaders = val_loaders(cfg, 0, 1, torch.device("cpu"))
    assert list(loaders) == ["lfw", "cfp_fp"]
    assert [ld.total for ld in loaders.values()] == [P, 2]
    spec = dataset("imagefolder")
    sets = spec.eval_loader(cfg, 1, 2, torch.device("cpu"))  # every target, by name
    assert list(sets) == ["lfw", "cfp_fp"]
    assert sets["lfw"].index.tolist() == [1, 3, 5] and sets["cfp_fp"].index.tolist() == [1]
    assert spec.size(cfg, False) == P
    base["face"]["val_targets"] = ["lfw", "agedb_30"]
    with pytest.raises(ConfigError) as exc:
        val_loaders(load_config(base=base), 0, 1, torch.device("cpu"))
    text = str(exc.value)
    assert "\n" not in text and "face.val_targets" in text and str(root / "agedb_30.bin") in text
    base["face"]["val_root"] = ""  # falls back to data.root
    with pytest.raises(ConfigError) as exc:
        val_loaders(load_config(base=base), 0, 1, torch.device("cpu"))
    assert str(tmp_path / "lfw.bin") in str(exc.value)


# ------------------------------------------------ hostile pickles: refused, never run

class _Reduce:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payloads(marker):
    return {
        "os.system": _Reduce(os.system, f"touch {marker}"),
        "builtins.exec": _Reduce(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
        # reached through a numpy name: numpy.save(path, array) writes the file
        "numpy.save": _Reduce(np.save, str(marker), np.zeros(2, np.uint8)),
        # a payload inside an object array (the object dtype is refused before it)
        "object-array": np.array([_Reduce(os.system, f"touch {marker}")], dtype=object),
    }


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "numpy.save", "object-array"])
@pytest.mark.parametrize("protocol", [2, 4])
def test_hostile_pickle_is_refused_and_never_runs(tmp_path, kind, protocol):
    marker = tmp_path / "pwned.npy"  # numpy.save keeps a name ending in .npy
    data = pickle.dumps(([IMAGES[0], _payloads(marker)[kind]], [True]), protocol=protocol)
    pickle.loads(data)  # positive control: the plain unpickler runs it
    assert marker.exists()
    marker.unlink()
    path = tmp_path / "lfw.bin"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as exc:
        load_bin(path)
    text = str(exc.value)
    assert "\n" not in text and str(path) in text and "refused" in text
    assert not marker.exists()


@pytest.mark.parametrize("bins, message", [
    ([np.array([1, 2], np.int32), IMAGES[1]], "dtype 'i4'"),
    ([np.array([b"ab"], dtype=object), IMAGES[1]], "dtype 'O8'"),
    ([np.zeros((2, 3), np.uint8), IMAGES[1]], "shape (2, 3)"),
    ([IMAGES[0], "text"], "image 1 of type str"),
    ([IMAGES[0]], "1 images for 1 pairs"),
], ids=["int32", "object", "2d", "str", "count"])
def test_wrong_contents_are_refused(tmp_path, bins, message):
    path = tmp_path / "agedb_30.bin"
    path.write_bytes(pickle.dumps((bins, [True]), protocol=4))
    with pytest.raises(ConfigError) as exc:
        load_bin(path)
    assert "\n" not in str(exc.value) and str(path) in str(exc.value)
    assert message in str(exc.value), str(exc.value)


def _unicode(text: bytes) -> bytes:  # SHORT_BINUNICODE
    return b"\x8c" + bytes([len(text)]) + text


def test_hand_crafted_globals_are_refused(tmp_path):
    path = tmp_path / "cfp_fp.bin"
    cases = {
        # a dotted name resolved inside an admitted module (protocol 4 STACK_GLOBAL)
        b"\x80\x04" + _unicode(b"numpy._core.multiarray") + _unicode(b"_reconstruct.__globals__")
        + b"\x93.":
            "numpy._core.multiarray._reconstruct.__globals__",
        b"cnumpy\nload\n.": "numpy.load",  # another numpy.* name
        b"cnumpy.testing\nassert_equal\n.": "numpy.testing.assert_equal",
        b"cnumpy\nndarray\n(K\x01tR.": "calls numpy.ndarray directly",  # ndarray(1)
        b"\x80\x02cnumpy\ndtype\nU\x02u1\x85\x81.": "not a (bins, issame_list) pair",
    }
    for data, message in cases.items():
        path.write_bytes(data)
        with pytest.raises(ConfigError) as exc:
            load_bin(path)
        assert "\n" not in str(exc.value) and message in str(exc.value), str(exc.value)
    path.write_bytes(b"not a pickle at all")
    with pytest.raises(ConfigError) as exc:
        load_bin(path)
    assert "not an insightface verification .bin" in str(exc.value)
