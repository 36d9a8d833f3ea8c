"""Writing insightface's RecordIO (``train.rec`` + ``train.idx``) without mxnet: the records
framed as ``largebatch.data.recordio`` reads them (its docstring has the format), with the
header record 0 and one identity record per identity, and an ImageFolder converter.
"""
from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from largebatch.data.face_images import decode_image, read_image_file
from largebatch.data.recordio import IDX_NAME, REC_NAME, frame, pack

class RecordWriter:
    """Writes framed records and their ``.idx`` lines (``MXIndexedRecordIO(..., 'w')``)."""

    def __init__(self, rec_path: str | Path, idx_path: str | Path) -> None:
        self._rec = open(rec_path, "w+b")
        self._idx = open(idx_path, "w")
        self._first_size = -1

    def write(self, key: int, record: bytes) -> None:
        """Append ``record`` (already ``pack``-ed) as ``key``."""
        data, offset = frame(record), self._rec.tell()
        self._idx.write(f"{key}\t{offset}\n")
        self._rec.write(data)
        if offset == 0:
            self._first_size = len(data)

    def rewrite_first(self, record: bytes) -> None:
        """Overwrite the record at offset 0 with one of the same framed size."""
        data, end = frame(record), self._rec.tell()
        if len(data) != self._first_size:
            raise ValueError(f"the first record has {self._first_size} framed bytes, its "
                             f"replacement {len(data)}")
        self._rec.seek(0)
        self._rec.write(data)
        self._rec.seek(end)

    def close(self) -> None:
        self._rec.close()
        self._idx.close()

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def write_face_rec(root: str | Path, samples: Iterable[tuple[bytes, Any]]) -> int:
    """Write ``root/train.rec`` + ``train.idx`` in insightface's layout; returns the images.

    Records: 0 = header (``flag 2, label (n + 1, n + 1 + identities)``), ``1..n`` = the
    images in ``samples`` order (label: a number, or a float sequence -> ``flag > 0``), then
    one identity record per identity with ``label (first, end)`` of its images when each
    identity's images are contiguous (as in a folder walk); otherwise none. Samples stream
    through: a million-image tree needs memory only for its identity runs.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    runs: list[list[int]] = []  # [identity, first key, end key]
    with RecordWriter(root / REC_NAME, root / IDX_NAME) as out:
        # Record 0 comes first in both files, as mxnet writes it; its size does not depend on
        # the counts (two float32), so it is rewritten in place once they are known.
        out.write(0, pack((0, 0)))
        n = 0
        for n, (image, label) in enumerate(samples, 1):
            out.write(n, pack(label, image))
            ident = int(label if isinstance(label, numbers.Number) else list(label)[0])
            if runs and runs[-1][0] == ident and runs[-1][2] == n:
                runs[-1][2] = n + 1
            else:
                runs.append([ident, n, n + 1])
        grouped = len({r[0] for r in runs}) == len(runs)
        if grouped:
            for j, (ident, first, end) in enumerate(runs):
                out.write(n + 1 + j, pack((first, end), b"", id=ident))
        end = n + 1 + (len(runs) if grouped else 0)
        if end > 2 ** 24:  # the header's float32 labels are exact integers only up to 2^24
            raise ValueError(f"{end} records: the RecordIO header cannot address them exactly")
        out.rewrite_first(pack((n + 1, end)))
    return n


def imagefolder_to_rec(src_root: str | Path, dst_root: str | Path, quality: int = 95,
                       progress: Optional[Callable[[int, int], None]] = None) -> int:
    """Convert an ImageFolder tree (one folder per identity) to ``train.rec`` + ``train.idx``.

    JPEG files are copied byte for byte; other formats are encoded as JPEG at ``quality``.
    Every image is decoded once to check it (a bad file fails here, naming it, in one
    ``ConfigError`` line). ``progress(done, total)`` is called after every image.
    """
    from largebatch.data.imagefolder import scan

    paths, labels, _ = scan(src_root)

    def samples() -> Iterable[tuple[bytes, int]]:
        import io

        from PIL import Image
        for done, (path, label) in enumerate(zip(paths, labels), 1):
            if progress is not None:
                progress(done - 1, len(paths))
            data = read_image_file(str(path))
            pixels = decode_image(data, path)
            if data[:3] != b"\xff\xd8\xff":
                buf = io.BytesIO()
                Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(buf, "JPEG",
                                                                      quality=quality)
                data = buf.getvalue()
            yield data, label

    return write_face_rec(dst_root, samples())
