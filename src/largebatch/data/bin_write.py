"""Write insightface verification sets (``.bin``) from a pairs list (``largebatch make-bin``).

The pairs file has one pair per line, ``path1 path2 same`` (``same``: ``1``/``0``,
``true``/``false``, ``yes``/``no``), paths relative to the pairs file; blank lines and lines
starting with ``#`` are skipped. Every image is read, decoded once and checked to be a 112 x 112
aligned crop (``decode_image``), then stored as encoded bytes, as insightface ships its sets:

* ``encode='keep'`` (default): JPEG and PNG files byte for byte (``lfw2pack.py`` stores the
  files' bytes), any other format re-encoded as PNG (lossless: the same pixels);
* ``encode='jpeg'``: every image re-encoded as JPEG quality 95 (``cv2.imencode``'s default, as
  ``agedb2pack2.py``/``cfp2pack.py`` do);
* ``encode='png'``: every image re-encoded as PNG.

The pickle is ``(list of bytes, list of bool)`` at ``protocol`` (4 by default: what Python 3's
insightface reads; 2 for Python 2 readers), written atomically, and read back through the
restricted unpickler (``load_bin``) before this returns.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path

from largebatch.config import ConfigError
from largebatch.data.bin_pairs import load_bin
from largebatch.data.face_images import decode_image, read_image_file
from largebatch.io import write_bytes_atomic

#: What a ``same`` field may say.
SAME_WORDS = {"1": True, "0": False, "true": True, "false": False, "yes": True, "no": False}
#: The ``encode`` choices.
ENCODINGS = ("keep", "jpeg", "png")


def read_pairs(pairs_txt: str | Path) -> list[tuple[Path, Path, bool]]:
    """``(image 1, image 2, same)`` per pair of a pairs file, paths resolved against its folder.

    Raises:
        ConfigError: the file is unreadable, a line is not ``path1 path2 same``, or it lists
            no pair; the message names the file and the line.
    """
    path = Path(pairs_txt)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise ConfigError(f"{path}: cannot be read as a pairs file ({reason})") from None
    pairs = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) != 3 or fields[2].lower() not in SAME_WORDS:
            raise ConfigError(f"{path}:{number}: expected 'path1 path2 same' (same: 1/0, "
                              f"true/false, yes/no), got {line.strip()!r}")
        pairs.append((path.parent / fields[0], path.parent / fields[1],
                      SAME_WORDS[fields[2].lower()]))
    if not pairs:
        raise ConfigError(f"{path}: lists no pair (one 'path1 path2 same' per line)")
    return pairs


def encoded_image(path: Path, encode: str, where: str) -> bytes:
    """The bytes a ``.bin`` stores for the image file ``path`` (checked: readable, 112 x 112).

    Raises:
        ConfigError: unreadable, not an image, or not 112 x 112 (naming ``where``).
    """
    from PIL import Image
    data = read_image_file(str(path))  # (refused from its size, unread, when too large)
    pixels = decode_image(data, f"{where}: {path}")  # (3, 112, 112) uint8, or a ConfigError
    with Image.open(io.BytesIO(data)) as img:
        kind = img.format
    if encode == "keep" and kind in ("JPEG", "PNG"):
        return data
    out = io.BytesIO()
    rgb = Image.fromarray(pixels.permute(1, 2, 0).numpy())
    if encode == "jpeg":
        rgb.save(out, format="JPEG", quality=95)
    else:  # png, or keep for a format insightface never ships (lossless re-encode)
        rgb.save(out, format="PNG")
    return out.getvalue()


def write_bin(images: list[bytes], same: list[bool], out: str | Path,
              protocol: int = 4) -> Path:
    """Pickle ``(images, same)`` as insightface's ``.bin`` at ``out`` (atomically).

    Raises:
        ConfigError: ``len(images) != 2 * len(same)`` or a protocol outside 2..5.
    """
    if len(images) != 2 * len(same):
        raise ConfigError(f"{out}: {len(images)} images for {len(same)} pairs (expected "
                          f"{2 * len(same)})")
    if protocol not in (2, 3, 4, 5):
        raise ConfigError(f"--protocol {protocol}: a .bin is pickled at protocol 2..5")
    data = pickle.dumps(([bytes(i) for i in images], [bool(s) for s in same]),
                        protocol=protocol)
    return write_bytes_atomic(out, data)


def make_bin(pairs_txt: str | Path, out: str | Path, encode: str = "keep",
             protocol: int = 4) -> dict[str, int]:
    """Read a pairs file, encode its images, write ``out`` and read it back.

    Returns:
        ``{"pairs", "same", "different", "bytes"}`` of the written set.

    Raises:
        ConfigError: see ``read_pairs``, ``encoded_image`` and ``write_bin``; an unknown
            ``encode``.
    """
    if encode not in ENCODINGS:
        raise ConfigError(f"--encode {encode!r} is not one of {'|'.join(ENCODINGS)}")
    pairs = read_pairs(pairs_txt)
    images, same = [], []
    for k, (a, b, s) in enumerate(pairs):
        where = f"{pairs_txt}: pair {k + 1}"
        images += [encoded_image(a, encode, where), encoded_image(b, encode, where)]
        same.append(s)
    path = write_bin(images, same, out, protocol)
    back_images, back_same = load_bin(path)  # what every reader will see
    if back_images != images or back_same != same:  # pragma: no cover (a pickle bug)
        raise ConfigError(f"{path}: does not read back as written")
    return {"pairs": len(same), "same": sum(same), "different": len(same) - sum(same),
            "bytes": path.stat().st_size}
