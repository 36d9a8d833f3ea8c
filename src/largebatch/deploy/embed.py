"""``largebatch embed``: the embedding of every image of a folder, a ``.rec`` or a ``.bin``.

Each image is decoded and checked (112 x 112, ``decode_image``), normalised as in training and
embedded as the evaluation embeds it (``flip_embed``: the image plus its mirror, summed, then
L2-normalised; the run's autocast), in batches, decoded in DataLoader workers. Written: the
``(N, d)`` float32 matrix as ``OUT.npy`` and a sidecar ``OUT.csv`` whose row ``i`` says which
input row ``i`` of the matrix is:

* a folder (``ImageFolder``: ``<identity>/<image>``, and/or images directly in it):
  ``row,path,identity`` (path relative to the folder; identity the sub-folder, empty for a
  top-level image), in torchvision's ImageFolder order (folders, then files, sorted);
* a ``.rec`` (insightface RecordIO, its ``.idx`` beside it): ``row,record,label`` for every
  image record, as insightface's ``MXFaceDataset`` lists them (header record 0 respected);
* a ``.bin`` (insightface verification set): ``row,image,pair,side,same`` (``image = 2 pair +
  side``), so rows ``2k`` and ``2k + 1`` are pair ``k``.

Progress: a bar on a terminal, else a plain line every ``progress_every`` batches.
"""
from __future__ import annotations

import csv
import io
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, TextIO

import numpy as np
import torch

from largebatch.config import ConfigError
from largebatch.data.face_images import decode_image, normalize, read_image_file
from largebatch.deploy.evaluate import FaceModel, eval_engine
from largebatch.face.verification import flip_embed


class _Folder:
    """The images of a folder: top-level files and one level of identity sub-folders."""

    header = ("path", "identity")

    def __init__(self, root: Path) -> None:
        from PIL import Image
        exts = {e.lower() for e in Image.registered_extensions()}
        found: list[tuple[str, str]] = []  # (identity, file name): ImageFolder's sort key
        for entry in os.scandir(root):
            if entry.name.startswith("."):
                continue
            if entry.is_file() and Path(entry.name).suffix.lower() in exts:
                found.append(("", entry.name))
            elif entry.is_dir():
                found += [(entry.name, f.name) for f in os.scandir(entry.path)
                          if f.is_file() and not f.name.startswith(".")
                          and Path(f.name).suffix.lower() in exts]
        if not found:
            raise ConfigError(f"{root}: holds no images (a flat folder of images, or "
                              f"<identity>/<image> sub-folders)")
        self.root, self.items, self.name = root, sorted(found), str(root)

    def __len__(self) -> int:
        return len(self.items)

    def rel(self, i: int) -> str:
        identity, name = self.items[i]
        return f"{identity}/{name}" if identity else name

    def item(self, i: int) -> tuple[bytes, str, tuple[Any, ...]]:
        """(encoded image, where, sidecar row) of image ``i``."""
        path = self.root / self.rel(i)  # (refused from its size, unread, when too large)
        return read_image_file(str(path)), str(path), (self.rel(i), self.items[i][0])


class _Rec:
    """The image records of an insightface ``.rec`` (``.idx`` beside it)."""

    header = ("record", "label")

    def __init__(self, rec: Path) -> None:
        from largebatch.data.recordio import IndexedRecordReader, image_keys
        idx = rec.with_suffix(".idx")
        if not idx.is_file():
            raise ConfigError(f"{rec}: its index {idx} is missing (insightface writes "
                              f"train.rec with train.idx)")
        self.reader, self.name = IndexedRecordReader(rec, idx), str(rec)
        self.keys = image_keys(self.reader)[0]

    def __len__(self) -> int:
        return len(self.keys)

    def item(self, i: int) -> tuple[bytes, str, tuple[Any, ...]]:
        """(encoded image, where, sidecar row) of image ``i``."""
        from largebatch.data.recordio import label_of, unpack
        key = int(self.keys[i])
        where = f"{self.reader.rec_path}: record {key}"
        header, payload = unpack(self.reader.read(key), where)
        return payload, where, (key, label_of(header, where))


class _Bin:
    """The images of an insightface verification ``.bin`` (pair ``k``: images 2k, 2k+1)."""

    header = ("image", "pair", "side", "same")

    def __init__(self, path: Path) -> None:
        from largebatch.data.bin_pairs import load_bin
        self.path, self.name = path, str(path)
        self.images, self.same = load_bin(path)

    def __len__(self) -> int:
        return len(self.images)

    def item(self, i: int) -> tuple[bytes, str, tuple[Any, ...]]:
        """(encoded image, where, sidecar row) of image ``i``."""
        return (self.images[i], f"{self.path}: image {i} (pair {i // 2})",
                (i, i // 2, i % 2, int(self.same[i // 2])))


def open_input(path: str | Path) -> Any:
    """The input reader for a folder, a ``.rec`` or a ``.bin``.

    Raises:
        ConfigError: no such input, or not one of the three kinds.
    """
    p = Path(path)
    if p.is_dir():
        return _Folder(p)
    if p.is_file() and p.suffix == ".rec":
        return _Rec(p)
    if p.is_file() and p.suffix == ".bin":
        return _Bin(p)
    if not p.exists():
        raise ConfigError(f"{p}: no such file or folder")
    raise ConfigError(f"{p}: not an image folder, a .rec or a .bin")


class _Decoded(torch.utils.data.Dataset):
    """``(uint8 (3, 112, 112), sidecar row)`` of image ``i``, or its error line (a worker's
    ConfigError, carried as a value: torch would re-raise it with a traceback)."""

    def __init__(self, source: Any) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> Any:
        try:
            data, where, row = self.source.item(i)
            return decode_image(data, where), row
        except ConfigError as exc:
            return str(exc)


def _collate(items: list) -> Any:
    errors = [x for x in items if isinstance(x, str)]
    return errors[0] if errors else (torch.stack([x for x, _ in items]),
                                     [row for _, row in items])


def _reporter(total: int, batches: int, every: int, stream: TextIO) -> Callable[[int], None]:
    """A callback per finished batch: a tqdm bar on a terminal, else a line every ``every``
    batches (and after the last)."""
    if getattr(stream, "isatty", lambda: False)():
        from tqdm import tqdm
        bar = tqdm(total=total, unit="img", file=stream, leave=False)

        def advance(done: int) -> None:
            bar.update(done - bar.n)
            if done == total:
                bar.close()
        return advance
    start, seen = time.perf_counter(), [0]

    def line(done: int) -> None:
        seen[0] += 1
        if seen[0] % every and seen[0] != batches:
            return
        rate = done / max(time.perf_counter() - start, 1e-9)
        print(f"embedded {done}/{total} images ({100 * done / total:.0f}%) | "
              f"{rate:.0f} images/s", file=stream, flush=True)
    return line


def sidecar_path(out: Path) -> Path:
    """``emb.npy`` -> ``emb.csv``."""
    return out.with_suffix(".csv")


@torch.no_grad()
def embed(face: FaceModel, source: Any, out: str | Path, batch_size: int = 256,
          workers: int = 0, progress_every: int = 20,
          stream: Optional[TextIO] = None) -> tuple[Path, Path, tuple[int, int]]:
    """Embed every image of ``source`` into ``out`` (``.npy``) and its sidecar (``.csv``).

    Returns:
        The two paths and the matrix's shape.

    Raises:
        ConfigError: an unreadable image (named), a bad ``out``.
    """
    from largebatch.dist import DistEnv
    out = Path(out)
    if out.suffix != ".npy":
        raise ConfigError(f"--out {out}: the embeddings are written as a .npy file")
    if len(source) == 0:
        raise ConfigError(f"{source.name}: holds no images")
    out.parent.mkdir(parents=True, exist_ok=True)
    engine = eval_engine(face.cfg, DistEnv("none"), next(face.model.parameters()).device)
    loader = torch.utils.data.DataLoader(_Decoded(source), batch_size=batch_size,
                                         num_workers=workers, collate_fn=_collate)
    report = _reporter(len(source), len(loader), progress_every, stream or sys.stdout)
    tmp, matrix, done, rows = out.with_name(out.name + ".tmp"), None, 0, []
    try:
        for batch in loader:
            if isinstance(batch, str):
                raise ConfigError(batch)
            batch, batch_rows = batch
            rows += batch_rows
            with engine.autocast():
                emb = flip_embed(face.model, normalize(batch.to(engine.device)))
            if matrix is None:  # the width is known once the model has run
                matrix = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32,
                                                   shape=(len(source), emb.shape[1]))
            matrix[done:done + len(emb)] = emb.cpu().numpy()
            done += len(emb)
            report(done)
        shape = matrix.shape
        matrix.flush()
        del matrix
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out, _write_sidecar(source.header, rows, sidecar_path(out)), shape


def _write_sidecar(header: tuple[str, ...], rows: list[tuple[Any, ...]], path: Path) -> Path:
    """One CSV row per embedding row: which input it is (see the module docstring)."""
    from largebatch.io import write_bytes_atomic
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(("row", *header))
    writer.writerows((i, *row) for i, row in enumerate(rows))
    return write_bytes_atomic(path, text.getvalue().encode())
