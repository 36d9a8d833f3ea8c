"""insightface's RecordIO (``train.rec`` + ``train.idx``) read without mxnet (written by
``largebatch.data.recordio_write``).

Format (dmlc-core ``recordio``, as mxnet's ``MXIndexedRecordIO`` writes it, little-endian):

* each record is one or more parts ``magic 0xced7230a | lrecord | data | zero padding to 4``,
  ``lrecord = cflag << 29 | length``. A payload holding the magic at a 4-aligned offset is
  split there (the magic itself is dropped): cflag 1 starts, 2 continues, 3 ends a split
  record, 0 is a whole one; the reader puts the magic back between parts.
* ``train.idx``: one ``key<TAB>byte offset`` line per record; reading seeks there, so each
  rank reads only its own shard.
* a record's payload is an ``IRHeader`` (``struct 'IfQQ'``: flag, label, id, id2); ``flag > 0``
  means ``flag`` float32 labels follow it (the label is then the first), then the JPEG.
* header record 0 (``flag > 0``): images are records ``[1, label[0])`` and identity records
  (``label = (first, end)`` of an identity's images) are ``[label[0], label[1])``, exactly as
  insightface's ``MXFaceDataset`` reads them; without it every indexed record is an image.

Any framing or index fault is a one-line ConfigError naming the file and the record.
"""
from __future__ import annotations

import functools
import math
import numbers
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Sequence

import numpy as np
import torch

from largebatch.config import ConfigError
from largebatch.data.face_images import (MAX_IMAGE_BYTES, ShardedImageLoader, decode_image,
                                         raise_agreed, training_size, warn_unused_classes)

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LENGTH_BITS = 29
_LENGTH_MASK = (1 << _LENGTH_BITS) - 1
#: mxnet's ``'IfQQ'`` in native order and alignment is, on the little-endian machines it ran
#: on, exactly this: 4 + 4 + 8 + 8 = 24 bytes, no padding.
IR_FORMAT = struct.Struct("<IfQQ")
REC_NAME, IDX_NAME = "train.rec", "train.idx"
#: The largest record read: an image (``face_images.MAX_IMAGE_BYTES``) and its labels.
MAX_RECORD_BYTES = MAX_IMAGE_BYTES + (1 << 20)
#: The smallest record: 8 bytes of framing and the 24-byte IRHeader; an index listing more
#: records than the ``.rec`` could hold at this size is refused.
MIN_RECORD_BYTES = 8 + IR_FORMAT.size
_INT64_MAX = 2 ** 63 - 1


@dataclass(frozen=True)
class IRHeader:
    """mxnet's image record header; ``label`` is a float, or a tuple when ``flag > 0``."""

    flag: int
    label: float | tuple[float, ...]
    id: int
    id2: int


# ------------------------------------------------------------------------------------------
# Records: IRHeader and dmlc framing
# ------------------------------------------------------------------------------------------

def pack(label: float | Sequence[float], payload: bytes = b"", id: int = 0,
         id2: int = 0) -> bytes:
    """IRHeader + payload as ``mx.recordio.pack`` makes it (a sequence label sets flag)."""
    if isinstance(label, numbers.Number):
        return IR_FORMAT.pack(0, float(label), id, id2) + payload
    labels = np.asarray(label, dtype="<f4").ravel()
    return IR_FORMAT.pack(labels.size, 0.0, id, id2) + labels.tobytes() + payload


def unpack(record: bytes, where: str) -> tuple[IRHeader, bytes]:
    """Split a record into its IRHeader and payload (``mx.recordio.unpack``)."""
    if len(record) < IR_FORMAT.size:
        raise ConfigError(f"{where}: {len(record)} bytes, shorter than the "
                          f"{IR_FORMAT.size}-byte IRHeader")
    flag, label, id_, id2 = IR_FORMAT.unpack_from(record)
    body = record[IR_FORMAT.size:]
    if flag == 0:
        return IRHeader(0, label, id_, id2), body
    if len(body) < 4 * flag:
        raise ConfigError(f"{where}: IRHeader flag={flag} announces {flag} float32 labels "
                          f"({4 * flag} bytes) but only {len(body)} bytes follow")
    labels = tuple(np.frombuffer(body, "<f4", flag).tolist())
    return IRHeader(flag, labels, id_, id2), body[4 * flag:]


def frame(payload: bytes) -> bytes:
    """The bytes dmlc's ``RecordIOWriter::WriteRecord`` writes for one record."""
    if len(payload) > _LENGTH_MASK:
        raise ValueError(f"a RecordIO record holds < 2^29 bytes, got {len(payload)}")
    aligned = len(payload) // 4
    hits = np.flatnonzero(np.frombuffer(payload, "<u4", aligned) == MAGIC) * 4
    parts, start = [], 0
    for i in hits.tolist():  # the magic at an aligned offset ends a part (and is dropped)
        parts += [_MAGIC_BYTES, struct.pack("<I", (1 if start == 0 else 2) << _LENGTH_BITS
                                            | (i - start)), payload[start:i]]
        start = i + 4
    last = (3 if start else 0) << _LENGTH_BITS | (len(payload) - start)
    parts += [_MAGIC_BYTES, struct.pack("<I", last), payload[start:], b"\0" * (-len(payload) % 4)]
    return b"".join(parts)


def read_record(fh: IO[bytes], offset: int, where: str) -> bytes:
    """Read the (possibly split) record that starts at ``offset``; ConfigError if corrupt.

    Every part's length is checked against the bytes left in the file before it is read,
    and the record against ``MAX_RECORD_BYTES``.
    """
    size = fh.seek(0, os.SEEK_END)
    fh.seek(offset)
    parts, first, total = [], True, 0
    while True:
        head = fh.read(8)
        if len(head) < 8:
            raise ConfigError(f"{where}: truncated: the file ends inside a record header "
                              f"({len(head)} of 8 bytes)")
        magic, lrec = struct.unpack("<II", head)
        if magic != MAGIC:
            raise ConfigError(f"{where}: bad magic 0x{magic:08x} (expected 0x{MAGIC:08x}): "
                              f"corrupt file or wrong offset in the index")
        cflag, length = lrec >> _LENGTH_BITS, lrec & _LENGTH_MASK
        if cflag > 3 or (cflag in (0, 1)) != first:
            raise ConfigError(f"{where}: continuation flag {cflag} out of sequence "
                              f"({'first' if first else 'later'} part of the record)")
        padded = (length + 3) & ~3
        left = size - fh.tell()
        if padded > left:
            raise ConfigError(f"{where}: truncated: record part of {length} bytes, only "
                              f"{left} left in the file")
        total += length
        if total > MAX_RECORD_BYTES:
            raise ConfigError(f"{where}: a record of at least {total} bytes, over the "
                              f"{MAX_RECORD_BYTES}-byte limit (a 112 x 112 face crop and its "
                              f"labels take a few KiB)")
        body = fh.read(padded)
        if len(body) < padded:
            raise ConfigError(f"{where}: truncated: record part of {length} bytes, only "
                              f"{len(body)} left in the file")
        parts.append(body[:length])
        if cflag in (0, 3):
            return b"".join(parts)
        parts.append(_MAGIC_BYTES)
        first = False


# ------------------------------------------------------------------------------------------
# Index and random access
# ------------------------------------------------------------------------------------------

def _parse_lines(raw: bytes, idx_path: str, rec_path: str, rec_size: int) -> np.ndarray:
    """The slow, line-by-line parse: any whitespace between key and offset, exact errors
    (a value past int64, which numpy would clamp, is named as written)."""
    rows = []
    for lineno, line in enumerate(raw.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ConfigError(f"{idx_path}: line {lineno} is {line[:60]!r}, not "
                              f"'key<TAB>offset' with non-negative integers")
        key, offset = int(parts[0]), int(parts[1])
        if key > _INT64_MAX:
            raise ConfigError(f"{idx_path}: line {lineno}: key {key} is past 2^63 - 1")
        if offset >= rec_size:
            raise ConfigError(f"{rec_path}: record {key}: index offset {offset} (from "
                              f"{idx_path}) is past the end of the file ({rec_size} bytes)")
        rows.append((key, offset))
    return np.array(rows, dtype=np.int64).reshape(-1, 2)


def _parse_table(raw: bytes, idx_path: str, rec_path: str, rec_size: int) -> np.ndarray:
    """``(lines, 2)`` int64 of an index: numpy's parser when every line is mxnet's exact
    ``key\toffset\n`` (MS1MV3's 5.3M lines: 1.8 s on one busy core; the line loop: 32 s)
    and no value reaches int64's end (numpy clamps there: the line loop names it)."""
    lines = raw.count(b"\n") + (1 if raw and not raw.endswith(b"\n") else 0)
    if raw.count(b"\t") == lines and b" " not in raw and b"\r" not in raw:
        try:
            values = np.fromstring(raw.decode("ascii"), dtype=np.int64, sep=" ")
        except (ValueError, UnicodeDecodeError):
            values = None
        if (values is not None and len(values) == 2 * lines
                and not ((values < 0) | (values == _INT64_MAX)).any()):
            return values.reshape(-1, 2)
    return _parse_lines(raw, idx_path, rec_path, rec_size)


@functools.lru_cache(maxsize=8)
def _parse_index(idx_path: str, rec_path: str, stamp: tuple) -> tuple[np.ndarray, np.ndarray]:
    size, most = stamp[1], stamp[1] // MIN_RECORD_BYTES
    if stamp[3] > 2 * size + 64:  # mxnet's lines take ~20 bytes, its records KiB
        raise ConfigError(f"{idx_path}: {stamp[3]} bytes, more than twice {rec_path} ({size} "
                          f"bytes): not its index (refused unread)")
    table = _parse_table(Path(idx_path).read_bytes(), idx_path, rec_path, size)
    keys, offsets = table[:, 0].copy(), table[:, 1].copy()
    if len(keys) == 0:
        raise ConfigError(f"{idx_path}: the index lists no records")
    if len(keys) > most:
        raise ConfigError(f"{idx_path}: lists {len(keys)} records, but {rec_path} ({size} "
                          f"bytes) holds at most {most} ({MIN_RECORD_BYTES} bytes or more each)")
    uniq, counts = np.unique(keys, return_counts=True)
    if (counts > 1).any():
        raise ConfigError(f"{idx_path}: record {int(uniq[counts > 1][0])} is listed "
                          f"{int(counts.max())} times")
    past = np.flatnonzero(offsets >= size)
    if len(past):
        j = int(past[0])
        raise ConfigError(f"{rec_path}: record {int(keys[j])}: index offset {int(offsets[j])} "
                          f"(from {idx_path}) is past the end of the file ({size} bytes)")
    return keys, offsets


def read_index(idx_path: str | Path, rec_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(keys, offsets)`` of a ``.idx`` in file order, checked against the ``.rec``'s size.

    Cached per process by the files' size and mtime (the plan and the loaders both ask).
    """
    idx_path, rec_path = str(idx_path), str(rec_path)
    for path in (rec_path, idx_path):
        if not os.path.isfile(path):
            raise ConfigError(f"RecordIO file not found: {path} (data.root holds insightface's "
                              f"{REC_NAME} and {IDX_NAME})")
    st_rec, st_idx = os.stat(rec_path), os.stat(idx_path)
    stamp = (st_rec.st_mtime_ns, st_rec.st_size, st_idx.st_mtime_ns, st_idx.st_size)
    return _parse_index(idx_path, rec_path, stamp)


class IndexedRecordReader:
    """Random access to a ``.rec`` by ``.idx`` key; each process opens its own handle.

    DataLoader workers are forked or spawned with a copy of this object: a handle inherited
    across ``fork`` shares its file offset with the parent, so a seek in one process would
    move the other's read. The handle is therefore (re)opened whenever the pid changes, and
    never pickled.
    """

    def __init__(self, rec_path: str | Path, idx_path: str | Path) -> None:
        self.rec_path, self.idx_path = str(rec_path), str(idx_path)
        self.keys, self.offsets = read_index(self.idx_path, self.rec_path)
        self._order = np.argsort(self.keys, kind="stable")
        self._sorted = self.keys[self._order]
        self._fh: IO[bytes] | None = None
        self._pid = -1
        # A file cut short (an interrupted copy) fails here, not hours into training.
        last = int(np.argmax(self.offsets))
        self.read(int(self.keys[last]))

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fh"], state["_pid"] = None, -1
        return state

    def __contains__(self, key: int) -> bool:
        j = int(np.searchsorted(self._sorted, key))
        return j < len(self._sorted) and int(self._sorted[j]) == key

    def offset(self, key: int) -> int:
        """Byte offset of record ``key`` in the ``.rec``."""
        if key not in self:
            raise ConfigError(f"{self.idx_path}: no record {key} in the index")
        return int(self.offsets[self._order[np.searchsorted(self._sorted, key)]])

    def read(self, key: int) -> bytes:
        """The payload of record ``key`` (IRHeader + image), checked framing."""
        offset = self.offset(key)
        if self._fh is None or self._pid != os.getpid():
            self._fh, self._pid = open(self.rec_path, "rb", buffering=0), os.getpid()
        return read_record(self._fh, offset,
                           f"{self.rec_path}: record {key} (byte offset {offset})")


def image_keys(reader: IndexedRecordReader) -> tuple[np.ndarray, int]:
    """``(image record keys, identities)`` as insightface's ``MXFaceDataset`` finds them.

    Identities is ``label[1] - label[0]`` of header record 0 (0 when it names none).
    """
    if 0 not in reader:
        return reader.keys, 0
    where = f"{reader.rec_path}: record 0 (header)"
    header, _ = unpack(reader.read(0), where)
    if header.flag == 0:
        return reader.keys, 0
    labels = header.label
    end = labels[0]
    if not math.isfinite(end) or end != int(end) or end < 1:
        raise ConfigError(f"{where}: label[0]={end} is not an image range end >= 1")
    images = int(end) - 1
    if images > len(reader.keys) - 1:  # checked before anything of that size exists
        raise ConfigError(f"{where}: the header names images 1..{images} ({images} records) "
                          f"but {reader.idx_path} lists only {len(reader.keys)} records")
    keys = np.arange(1, int(end), dtype=np.int64)
    found = np.isin(keys, reader.keys)
    if not found.all():
        raise ConfigError(f"{reader.idx_path}: no record {int(keys[~found][0])}, which the "
                          f"header (record 0: images 1..{int(end) - 1}) names")
    identities = int(labels[1]) - int(end) if len(labels) > 1 and math.isfinite(labels[1]) else 0
    if identities > images:
        raise ConfigError(f"{where}: the header names {identities} identities for {images} "
                          f"images (each identity has at least one)")
    return keys, max(identities, 0)


def label_of(header: IRHeader, where: str) -> int:
    """The identity of an image record: its label, or the first of its float labels."""
    value = header.label[0] if header.flag > 0 else header.label
    if not math.isfinite(value) or value != int(value) or value < 0:
        raise ConfigError(f"{where}: label {value} is not an identity (integer >= 0)")
    return int(value)


# ------------------------------------------------------------------------------------------
# Training loader and registry entry
# ------------------------------------------------------------------------------------------

class RecordFaceSource:
    """The images of ``root/train.rec`` by global index (what DataLoader workers read)."""

    def __init__(self, root: str | Path, num_classes: int) -> None:
        root = Path(root)
        self.reader = IndexedRecordReader(root / REC_NAME, root / IDX_NAME)
        self.keys, self.identities = image_keys(self.reader)
        self.num_classes = num_classes
        if num_classes and self.identities > num_classes:
            raise ConfigError(f"face.num_classes={num_classes} but {self.reader.rec_path} "
                              f"holds {self.identities} identities (header record 0)")

    def __len__(self) -> int:
        return len(self.keys)

    def read(self, index: int) -> tuple[torch.Tensor, int]:
        """(uint8 image (3, 112, 112), identity) of image ``index``."""
        key = int(self.keys[index])
        where = f"{self.reader.rec_path}: record {key}"
        header, payload = unpack(self.reader.read(key), where)
        label = label_of(header, where)
        if self.num_classes and label >= self.num_classes:
            raise ConfigError(f"{where}: label {label} is outside face.num_classes="
                              f"{self.num_classes} (identities 0..{self.num_classes - 1})")
        return decode_image(payload, where), label


def recordio_size(cfg: Any, train: bool = True) -> int:
    """Images in ``data.root/train.rec`` (or data.num_samples without the files; capped by
    data.subset), or the first .bin's pairs; reads the index and record 0, never an image."""
    if not train:
        from largebatch.data.bin_pairs import val_pair_count
        return val_pair_count(cfg)
    root = Path(cfg.data.root)
    present = (root / REC_NAME).is_file() and (root / IDX_NAME).is_file()
    return training_size(
        cfg, present, lambda: len(image_keys(IndexedRecordReader(root / REC_NAME,
                                                                 root / IDX_NAME))[0]),
        str(root / REC_NAME))


class RecordIOLoader(ShardedImageLoader):
    """``data.name=recordio``: one rank's training batches of ``data.root/train.rec``."""

    def __init__(self, cfg: Any, batch_size: int, rank: int, world: int, seed: int,
                 device: torch.device) -> None:
        source = RecordFaceSource(cfg.data.root, cfg.face.num_classes)
        n = training_size(cfg, True, lambda: len(source), source.reader.rec_path)
        if rank == 0:
            warn_unused_classes(cfg.face.num_classes, source.identities, source.reader.rec_path)
        super().__init__(source, batch_size, rank, world, seed, device,
                         num_workers=cfg.data.num_workers, drop_last=cfg.data.drop_last, n=n)


def _prepare(cfg: Any, denv: Any) -> None:
    """Check the files on every rank (run.py passes the data section; the whole Config also
    checks face.val_targets)."""
    from largebatch.data.bin_pairs import missing_val_target
    data = getattr(cfg, "data", cfg)
    root = Path(data.root)
    error = next((f"RecordIO file not found: {root / name} (data.root={data.root!r} holds "
                  f"insightface's {REC_NAME} and {IDX_NAME})"
                  for name in (REC_NAME, IDX_NAME) if not (root / name).is_file()), None)
    raise_agreed(error or (missing_val_target(cfg) if hasattr(cfg, "face") else None), denv)


def recordio_spec():  # -> DatasetSpec (imported lazily by the registry)
    """The registry entry of ``data.name=recordio``."""
    from largebatch.data.bin_pairs import target_loaders
    from largebatch.data.registry import DatasetSpec
    return DatasetSpec(size=recordio_size, prepare=_prepare, train_loader=RecordIOLoader,
                       eval_loader=target_loaders, full_config=True)
