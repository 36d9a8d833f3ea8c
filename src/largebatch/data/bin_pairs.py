"""insightface's verification sets (``lfw.bin``, ``cfp_fp.bin``, ``agedb_30.bin``...).

A ``.bin`` is a pickle of ``(bins, issame_list)``: ``2 P`` encoded images (pair ``k`` is
``bins[2k], bins[2k + 1]``) and ``P`` booleans. insightface wrote them with Python 2 (so its
``str`` arrive as bytes with ``encoding='bytes'``) or 3, at protocols 2 to 5. Every layout its
scripts write is read:

* an image is ``bytes`` (``lfw2pack.py``: the JPEG file's bytes), or a uint8 numpy array of
  those bytes of shape ``(n,)`` or ``(n, 1)`` (``agedb2pack2.py``/``cfp2pack.py`` store
  ``cv2.imencode``'s output, which is ``(n, 1)``);
* ``issame_list`` is a list or tuple of ``bool``, ``0``/``1``, or numpy booleans
  (``np.bool_``, pickled as ``numpy.core.multiarray.scalar(dtype('b1'), b'\x01')``).

A pickle runs whatever callable its globals name, so these files are read by ``_BinUnpickler``,
whose ``find_class`` admits exactly the names numpy 1.x and 2.x (and Python 3 at protocol 2)
use to rebuild a plain uint8 array or a numpy boolean, and maps each to a checking stand-in
here: no numpy function ever sees the file's arguments, no other global (``os.system``,
``numpy.save``...) is ever resolved, so a planted payload never runs. Arrays of any dtype but
uint8 (object arrays included), of any other shape, and scalars of any dtype but bool are
refused.

``BinPairLoader`` yields exactly ``PairLoader``'s batches (``data/faces.py``): ``x (n, 2, 3,
112, 112)`` normalised, ``y (n, 2) = [global pair index, same]``, pairs strided over ranks.
"""
from __future__ import annotations

import contextvars
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from largebatch.config import ConfigError
from largebatch.data.face_images import IMAGE_SIZE, PairBatches, decode_image, normalize, \
    one_line


class _Refused(Exception):
    """Raised inside the unpickler; ``load_bin`` turns it into the file's ConfigError."""


#: Bytes the stand-ins may still copy while one file is unpickled (its size: every byte an
#: honest set decodes is in the file once; memo references repeat a call for free).
_BUDGET: contextvars.ContextVar[list[int]] = contextvars.ContextVar("bin_budget")


def _charge(n: int) -> None:
    budget = _BUDGET.get(None)
    if budget is None:  # a stand-in called outside load_bin
        return
    budget[0] -= n
    if budget[0] < 0:
        raise _Refused("builds more image bytes than the file holds (a memo reference repeated "
                       "to copy one image many times)")


class _NdarrayMarker:
    """Stands in for ``numpy.ndarray``: only ``_reconstruct``'s first argument may be it."""

    def __call__(self, *args: Any) -> None:
        raise _Refused("calls numpy.ndarray directly")


_NDARRAY = _NdarrayMarker()


#: numpy's names of the only two dtypes a ``.bin`` holds: uint8 (image bytes), bool (issame).
_DTYPES = {"u1": "u1", "|u1": "u1", "uint8": "u1", "b1": "b1", "|b1": "b1", "bool": "b1",
           "?": "b1"}


class _Dtype:
    """Stands in for ``numpy.dtype(obj, align, copy)``: only uint8 and bool are accepted."""

    def __init__(self, obj: Any = None, align: Any = False, copy: Any = False) -> None:
        name = obj.decode("latin1") if isinstance(obj, (bytes, bytearray)) else obj
        if not isinstance(name, str) or name not in _DTYPES:
            raise _Refused(f"holds a numpy value of dtype {name!r} (only uint8 image arrays "
                           f"and bool issame scalars are admitted)")
        self.kind = _DTYPES[name]

    def __setstate__(self, state: Any) -> None:
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags): a plain
        # uint8 / bool has no subarray, names or fields.
        if not (isinstance(state, tuple) and len(state) >= 5 and state[2:5] == (None,) * 3):
            raise _Refused("holds a structured or sub-array dtype (only plain uint8)")


def _as_uint8(data: Any, dtype: Any, shape: Any) -> np.ndarray:
    """The checked 1-D uint8 array of ``data`` (bytes) with ``shape`` ``(n,)`` or ``(n, 1)``
    (``cv2.imencode``'s column: the same bytes in the same order)."""
    if not isinstance(dtype, _Dtype):
        raise _Refused("holds an array whose dtype is not a numpy dtype")
    if dtype.kind != "u1":
        raise _Refused(f"holds a numpy array of dtype {dtype.kind!r} (images are uint8)")
    if isinstance(data, str):  # latin-1 text: how numpy pickles raw bytes as text
        _charge(len(data))
        data = data.encode("latin1")
    if not isinstance(data, (bytes, bytearray)):
        raise _Refused(f"holds array data of type {type(data).__name__} (expected bytes)")
    n = len(data)
    if not (isinstance(shape, tuple) and shape in ((n,), (n, 1))
            and all(type(d) is int for d in shape)):
        raise _Refused(f"holds an array of shape {shape!r} for {n} bytes (expected a uint8 "
                       f"array of the image's bytes, shape (n,) or (n, 1))")
    if type(data) is not bytes:  # bytes(bytearray) copies
        _charge(n)
    return np.frombuffer(bytes(data), dtype=np.uint8)


def _scalar(dtype: Any, data: Any = None) -> bool:
    """Stands in for ``numpy.core.multiarray.scalar(dtype, bytes)``: a numpy bool only."""
    if not (isinstance(dtype, _Dtype) and dtype.kind == "b1"):
        raise _Refused("holds a numpy scalar that is not a bool (issame is a list of bools)")
    if isinstance(data, str):  # Python 3 at protocol 2 / Python 2: latin-1 text
        data = data.encode("latin1")
    if not (isinstance(data, (bytes, bytearray)) and bytes(data) in (b"\x00", b"\x01")):
        raise _Refused(f"holds a numpy bool whose data is {data!r} (expected one byte 0/1)")
    return bytes(data) == b"\x01"


class _ArrayState:
    """What ``_reconstruct`` returns; the pickle's BUILD then fills it (``__setstate__``)."""

    array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise _Refused("holds an ndarray state that is not numpy's")
        shape, dtype, _fortran, data = state[-4:]
        self.array = _as_uint8(data, dtype, shape)


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> _ArrayState:
    if cls is not _NDARRAY:
        raise _Refused("calls numpy's _reconstruct with a class other than numpy.ndarray")
    return _ArrayState()


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any = "C") -> np.ndarray:
    # numpy >= 1.16 at pickle protocol 5: _frombuffer(buffer, dtype, shape, order). Both
    # orders of an (n,) or (n, 1) array are the same bytes.
    if order not in ("C", "F"):
        raise _Refused(f"holds an array of memory order {order!r}")
    return _as_uint8(buf, dtype, shape)


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    # Python 3 at protocol 2 writes bytes as _codecs.encode(latin-1 text, 'latin1').
    if not (isinstance(text, str) and encoding in ("latin1", "latin-1")):
        raise _Refused(f"calls _codecs.encode({type(text).__name__}, {encoding!r}) (only "
                       f"latin-1 text, which is how bytes are pickled at protocol 2)")
    _charge(len(text))
    return text.encode("latin1")


#: Every global a ``.bin`` may name: (module, name) -> the checking stand-in.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # numpy 1.x, Python 2
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # numpy 2.x
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,  # numpy 1.x, protocol 5
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,  # numpy 2.x, protocol 5
    ("numpy.core.multiarray", "scalar"): _scalar,  # np.bool_ in issame, numpy 1.x
    ("numpy._core.multiarray", "scalar"): _scalar,  # np.bool_ in issame, numpy 2.x
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _Dtype,
    ("_codecs", "encode"): _codecs_encode,  # Python 3, protocol 2
}


class _BinUnpickler(pickle.Unpickler):
    """Unpickler that resolves only ``_ALLOWED`` (to stand-ins), nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(f"names the global {module}.{name}, which a verification set "
                           f"never needs") from None

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("uses a persistent id")


def _to_bytes(item: Any, i: int) -> bytes:
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, _ArrayState) and item.array is not None:
        return item.array.tobytes()
    if isinstance(item, np.ndarray):  # only _frombuffer makes one, already checked
        return item.tobytes()
    raise _Refused(f"has image {i} of type {type(item).__name__} (expected bytes or a uint8 "
                   f"array)")


def _buffer_id(item: Any) -> int:
    """The identity of the bytes behind an image (an array's is its buffer's)."""
    array = item.array if isinstance(item, _ArrayState) else item
    base = getattr(array, "base", None)
    return id(array if base is None else base)


def _is_image(item: Any) -> bool:
    return isinstance(item, (bytes, bytearray, np.ndarray)) or (
        isinstance(item, _ArrayState) and item.array is not None)


def _check(obj: Any) -> tuple[list[bytes], list[bool]]:
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise _Refused("is not a (bins, issame_list) pair")
    bins, issame = obj
    if not isinstance(bins, (list, tuple)) or not isinstance(issame, (list, tuple)):
        raise _Refused("is not a (list of images, list of booleans) pair")
    if len(bins) != 2 * len(issame):
        raise _Refused(f"holds {len(bins)} images for {len(issame)} pairs (expected "
                       f"{2 * len(issame)})")
    first: dict[int, int] = {}  # counted before a byte is copied or an image decoded
    for i, item in enumerate(bins):
        if not _is_image(item):
            _to_bytes(item, i)  # raises: names the type
        j = first.setdefault(_buffer_id(item), i)
        if j != i:
            raise _Refused(f"lists {len(bins)} images, but image {i} is image {j} again (a "
                           f"memo reference, not stored bytes): a verification set stores "
                           f"each of its {2 * len(issame)} images once")
    images = [_to_bytes(item, i) for i, item in enumerate(bins)]
    for k, s in enumerate(issame):
        if not (isinstance(s, (bool, int)) and s in (0, 1)):
            raise _Refused(f"has issame_list[{k}] = {s!r} (expected a boolean)")
    return images, [bool(s) for s in issame]


def load_bin(path: str | Path) -> tuple[list[bytes], list[bool]]:
    """``(encoded images (2P), same (P))`` of a ``.bin``, through the restricted unpickler.

    Raises:
        ConfigError: one line naming the file: unreadable, not a verification set, or a
            global / dtype the format never needs (refused before anything runs).
    """
    token = None
    try:
        with open(path, "rb") as f:
            token = _BUDGET.set([os.fstat(f.fileno()).st_size])
            obj = _BinUnpickler(f, encoding="bytes").load()
        return _check(obj)
    except _Refused as exc:
        raise ConfigError(one_line(f"{path}: refused: the pickle {exc}; nothing in it was "
                                   f"run")) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror})") from None
    except Exception as exc:  # a malformed pickle raises anything from EOFError to TypeError
        raise ConfigError(one_line(f"{path}: not an insightface verification .bin "
                                   f"({type(exc).__name__}: {exc})")) from None
    finally:
        if token is not None:
            _BUDGET.reset(token)


class BinPairLoader(PairBatches):
    """This rank's unpadded share of a ``.bin``'s pairs (pair ``k`` on rank ``k % world``).

    The rank's images are decoded once, kept as uint8 (a quarter of float32's memory: 226 MB
    for half of LFW's 12,000 images) and normalised per batch on the device.
    """

    def __init__(self, path: str | Path, rank: int, world: int, device: torch.device,
                 batch_size: int = 256) -> None:
        images, same = load_bin(path)
        self.path, self.total = str(path), len(same)
        self.index = torch.arange(rank, self.total, world)
        self.images = torch.empty(len(self.index), 2, 3, IMAGE_SIZE, IMAGE_SIZE,
                                  dtype=torch.uint8)
        for j, k in enumerate(self.index.tolist()):
            for s in (0, 1):
                self.images[j, s] = decode_image(images[2 * k + s],
                                                 f"{path}: image {2 * k + s} (pair {k})")
        self.same = torch.tensor(same, dtype=torch.long)[self.index]
        self.batch_size, self.device = batch_size, device

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images -> insightface's normalisation, on the device."""
        return normalize(x)


def val_paths(cfg: Any) -> dict[str, Path]:
    """``{name: {face.val_root or data.root}/{name}.bin}`` for ``face.val_targets``."""
    root = Path(cfg.face.val_root or cfg.data.root)
    return {name: root / f"{name}.bin" for name in cfg.face.val_targets}


def missing_val_target(cfg: Any) -> str | None:
    """The error line for the first ``face.val_targets`` entry without a file (or None)."""
    for name, path in val_paths(cfg).items():
        if not path.is_file():
            return (f"face.val_targets: {name!r} has no file {path} (looked in face.val_root="
                    f"{cfg.face.val_root!r}, else data.root={cfg.data.root!r})")
    return None


def val_loaders(cfg: Any, rank: int, world: int,
                device: torch.device) -> dict[str, BinPairLoader]:
    """One ``BinPairLoader`` per ``face.val_targets`` entry, in the config's order."""
    error = missing_val_target(cfg)
    if error:
        raise ConfigError(error)
    return {name: BinPairLoader(path, rank, world, device)
            for name, path in val_paths(cfg).items()}


def target_loaders(cfg: Any, rank: int, world: int,
                   device: torch.device) -> dict[str, BinPairLoader]:
    """The registry's eval loader for real data: every ``face.val_targets`` set, by name (the
    first one is the primary ``verification_*`` metric); none at all is allowed (the run
    then follows its training loss)."""
    return val_loaders(cfg, rank, world, device)


def val_pair_count(cfg: Any) -> int:
    """Pairs of the first ``face.val_targets`` set (unpickled, not decoded); 0 without one."""
    error = missing_val_target(cfg)
    if error:
        raise ConfigError(error)
    paths = list(val_paths(cfg).values())
    return len(load_bin(paths[0])[1]) if paths else 0
