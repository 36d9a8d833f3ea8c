"""insightface .bin verification sets: Python 2 / 3 pickles (protocols 2..5) of JPEG bytes or
uint8 arrays of shape (n,) or (n, 1), issame as bools or numpy bools, read back exactly in
PairLoader's batch format; hostile pickles refused without running; ``largebatch make-bin``
writes sets that read back byte for byte."""
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
from tests.conftest import run_cli

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


_PY2_STATE = b"(K\x03" + _py2_str(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"


def _py2_dtype(name: bytes) -> bytes:
    """numpy 1.x under Python 2: dtype(name, 0, 1) + BUILD of its state."""
    return b"cnumpy\ndtype\n" + _py2_str(name) + b"K\x00K\x01\x87R" + _PY2_STATE


def _py2_array(data: bytes, column: bool = False) -> bytes:
    """numpy 1.x under Python 2 at protocol 2: _reconstruct(ndarray, (0,), 'b') + BUILD; shape
    (n,), or (n, 1) as cv2.imencode returns it (agedb2pack2.py, cfp2pack.py)."""
    shape = b"J" + struct.pack("<i", len(data)) + (b"K\x01\x86" if column else b"\x85")
    return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + _py2_str(b"b")
            + b"\x87R" + b"(K\x01" + shape + _py2_dtype(b"u1") + b"\x89" + _py2_str(data)
            + b"tb")


def _py2_bool(value: bool, numpy_bool: bool) -> bytes:
    """A Python 2 bool (NEWTRUE/NEWFALSE), or a numpy bool: scalar(dtype('b1'), '\\x01')."""
    if not numpy_bool:
        return b"\x88" if value else b"\x89"
    return (b"cnumpy.core.multiarray\nscalar\n" + _py2_dtype(b"b1")
            + _py2_str(b"\x01" if value else b"\x00") + b"\x86R")


def py2_pickle(images: list[bytes], same: list[bool], arrays: bool, column: bool = False,
               numpy_bool: bool = False) -> bytes:
    """``pickle.dump((bins, issame_list), f, protocol=2)`` as Python 2 wrote it."""
    item = (lambda im: _py2_array(im, column)) if arrays else _py2_str
    return (b"\x80\x02]q\x00(" + b"".join(item(im) for im in images) + b"e]q\x01("
            + b"".join(_py2_bool(s, numpy_bool) for s in same) + b"e\x86q\x02.")


def py3_pickle(images: list[bytes], same: list[bool], arrays: str, protocol: int,
               issame: str = "bool", container: type = list) -> bytes:
    items = {"bytes": list(images),
             "readonly": [np.frombuffer(im, np.uint8) for im in images],
             "writable": [np.frombuffer(im, np.uint8).copy() for im in images],
             # cv2.imencode's output: a (n, 1) uint8 column
             "column": [np.frombuffer(im, np.uint8).reshape(-1, 1).copy() for im in images],
             }[arrays]
    labels = [np.bool_(s) for s in same] if issame == "numpy" else list(same)
    return pickle.dumps((container(items), container(labels)), protocol=protocol)


FORMATS = ([("py2-str", lambda: py2_pickle(IMAGES, SAME, False)),
            ("py2-numpy", lambda: py2_pickle(IMAGES, SAME, True)),
            ("py2-column", lambda: py2_pickle(IMAGES, SAME, True, column=True)),
            ("py2-column-npbool", lambda: py2_pickle(IMAGES, SAME, True, True, True)),
            ("py2-str-npbool", lambda: py2_pickle(IMAGES, SAME, False, numpy_bool=True))]
           + [(f"py3-{kind}-p{p}", lambda kind=kind, p=p: py3_pickle(IMAGES, SAME, kind, p))
              for kind in ("bytes", "readonly", "writable", "column") for p in (2, 3, 4, 5)]
           + [(f"py3-column-npbool-tuple-p{p}",
               lambda p=p: py3_pickle(IMAGES, SAME, "column", p, "numpy", tuple))
              for p in (2, 3, 4, 5)])


def test_py2_emulation_is_what_plain_pickle_and_numpy_read():
    """Positive control: the hand-written Python 2 pickles are real numpy/pickle streams."""
    bins, same = pickle.loads(py2_pickle(IMAGES, SAME, True), encoding="bytes")
    assert all(isinstance(b, np.ndarray) and b.dtype == np.uint8 for b in bins)
    assert [b.tobytes() for b in bins] == IMAGES and same == SAME
    bins, same = pickle.loads(py2_pickle(IMAGES, SAME, False), encoding="bytes")
    assert bins == IMAGES and same == SAME
    with pytest.raises(UnicodeDecodeError):  # why insightface falls back to encoding='bytes'
        pickle.loads(py2_pickle(IMAGES, SAME, False))
    # cv2.imencode's (n, 1) columns and numpy bools, as agedb2pack2.py wrote them
    bins, same = pickle.loads(py2_pickle(IMAGES, SAME, True, True, True), encoding="bytes")
    assert all(b.shape == (len(im), 1) and b.dtype == np.uint8 for b, im in zip(bins, IMAGES))
    assert [b.tobytes() for b in bins] == IMAGES
    assert all(type(s) is np.bool_ for s in same) and [bool(s) for s in same] == SAME


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
    ([np.frombuffer(IMAGES[0], np.uint8).reshape(1, -1), IMAGES[1]], "shape (1, "),
    ([np.zeros(4, bool), IMAGES[1]], "dtype 'b1' (images are uint8)"),
    ([np.bool_(True), IMAGES[1]], "image 0 of type bool"),
], ids=["int32", "object", "2d", "str", "count", "row", "bool-array", "bool-image"])
def test_wrong_contents_are_refused(tmp_path, bins, message):
    path = tmp_path / "agedb_30.bin"
    path.write_bytes(pickle.dumps((bins, [True]), protocol=4))
    with pytest.raises(ConfigError) as exc:
        load_bin(path)
    assert "\n" not in str(exc.value) and str(path) in str(exc.value)
    assert message in str(exc.value), str(exc.value)


@pytest.mark.parametrize("issame, message", [
    ([np.int64(1)], "dtype 'i8'"),
    ([np.float64(1.0)], "dtype 'f8'"),
    ([2], "issame_list[0] = 2"),
    (np.array([True]), "numpy array of dtype 'b1'"),  # an array is refused as it is built
], ids=["int64", "float64", "two", "array"])
def test_wrong_issame_is_refused(tmp_path, issame, message):
    path = tmp_path / "cfp_fp.bin"
    path.write_bytes(pickle.dumps(([IMAGES[0], IMAGES[1]], issame), protocol=4))
    with pytest.raises(ConfigError) as exc:
        load_bin(path)
    assert "\n" not in str(exc.value) and message in str(exc.value), str(exc.value)


def test_numpy_bool_stand_in_checks_its_byte(tmp_path):
    # scalar(dtype('b1'), b'\x02'): not a bool numpy ever writes
    data = pickle.dumps(([IMAGES[0], IMAGES[1]], [np.True_]), protocol=4)
    assert data.count(b"C\x01\x01") == 1
    path = tmp_path / "lfw.bin"
    path.write_bytes(data.replace(b"C\x01\x01", b"C\x01\x02"))
    with pytest.raises(ConfigError, match="numpy bool whose data is b'\\\\x02'"):
        load_bin(path)


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


# ------------------------------------------------ largebatch make-bin

def _image_file(path, seed: int, size: int = 112) -> bytes:
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    img = Image.fromarray(np.kron(blocks, np.ones((8, 8, 1), np.uint8)))
    fmt = {".jpg": "JPEG", ".png": "PNG", ".bmp": "BMP"}[path.suffix]
    img.save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return path.read_bytes()


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture()
def pairs_dir(tmp_path):
    (tmp_path / "a").mkdir()
    files = {name: _image_file(tmp_path / name, i)
             for i, name in enumerate(["a/1.jpg", "a/2.png", "b.bmp", "c.jpg"])}
    (tmp_path / "pairs.txt").write_text(
        "# a comment, then a blank line\n\n"
        "a/1.jpg a/2.png 1\nb.bmp c.jpg false\n  c.jpg a/1.jpg   yes\n")
    return tmp_path, files


def test_make_bin_cli_writes_what_insightface_ships(pairs_dir):
    root, files = pairs_dir
    out = root / "sets" / "mine.bin"
    proc = run_cli("make-bin", str(root / "pairs.txt"), str(out), "--protocol", "2")
    assert proc.returncode == 0, proc
    assert "wrote" in proc.stdout and "3 pairs (2 same, 1 different)" in proc.stdout
    images, same = load_bin(out)
    assert same == [True, False, True]
    # JPEG and PNG byte for byte; the BMP as a PNG of the very same pixels
    assert images[0] == files["a/1.jpg"] and images[1] == files["a/2.png"]
    assert images[2][:8] == b"\x89PNG\r\n\x1a\n"
    assert np.array_equal(_pixels(images[2]), _pixels(files["b.bmp"]))
    assert images[3:] == [files["c.jpg"], files["c.jpg"], files["a/1.jpg"]]
    # what insightface's own loader does with it (protocol 2: Python 2 readers too)
    assert out.read_bytes()[:2] == b"\x80\x02"
    assert pickle.loads(out.read_bytes(), encoding="bytes") == (images, same)


def test_make_bin_re_encodes_on_request(pairs_dir):
    from largebatch.data.bin_write import make_bin
    root, files = pairs_dir
    out = root / "jpeg.bin"
    assert make_bin(root / "pairs.txt", out, encode="jpeg")["pairs"] == 3
    images, _ = load_bin(out)
    assert all(im[:2] == b"\xff\xd8" for im in images)  # JPEG SOI
    # = PIL's own JPEG (quality 95, cv2.imencode's default) of the PNG's pixels
    ref = io.BytesIO()
    Image.fromarray(_pixels(files["a/2.png"])).save(ref, "JPEG", quality=95)
    assert images[1] == ref.getvalue() != files["a/2.png"]
    make_bin(root / "pairs.txt", out, encode="png")
    images, _ = load_bin(out)
    assert np.array_equal(_pixels(images[0]), _pixels(files["a/1.jpg"]))


def test_make_bin_bad_input_is_one_line_exit_2(pairs_dir):
    from largebatch.data.bin_write import make_bin
    root, _ = pairs_dir
    _image_file(root / "small.jpg", 9, size=96)
    (root / "bad.txt").write_text("a/1.jpg small.jpg 1\n")
    proc = run_cli("make-bin", str(root / "bad.txt"), str(root / "x.bin"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc
    assert "bad.txt: pair 1" in proc.stderr and "small.jpg" in proc.stderr
    assert "96x96, expected 112x112" in proc.stderr and "Traceback" not in proc.stderr
    assert not (root / "x.bin").exists()
    cases = {"a/1.jpg a/2.png maybe\n": "bad.txt:1: expected 'path1 path2 same'",
             "\n# nothing\n": "bad.txt: lists no pair",
             "a/1.jpg missing.jpg 0\n": "missing.jpg: cannot be read"}
    for text, message in cases.items():
        (root / "bad.txt").write_text(text)
        with pytest.raises(ConfigError) as exc:
            make_bin(root / "bad.txt", root / "x.bin")
        assert message in str(exc.value) and "\n" not in str(exc.value), str(exc.value)
