"""Small hostile inputs that used to cost gigabytes or minutes (issue 21), each written for
real and run through the real entry point (``largebatch plan`` / ``train``) as its own process:
one ``largebatch: error:`` line naming the file and the numbers, exit 2, within
``TIME_BOUND_S``, and a peak RSS under the interpreter's baseline + ``MEMORY_BOUND_MB``.

The peak is the kernel's high-water mark of that very process (``os.wait4``'s ``ru_maxrss``);
the baseline is the same interpreter planning a valid MNIST config (torch imported). A guard
kills a process that passes 4x the bound, so a regression fails here instead of swapping.
What each input cost before the fix is in docs/RELIABILITY.md ("Hostile inputs").
``run_measured`` and ``baseline_mb`` are shared with ``tests/unit/config/test_yaml_limits.py``
and ``tests/unit/test_impossible_plans.py``.
"""
from __future__ import annotations

import functools
import io
import os
import pickle
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from largebatch.config import ConfigError
from tests.conftest import REPO, cli_env

#: Peak RSS allowed above the baseline, and wall time, for any hostile input.
MEMORY_BOUND_MB = 512
TIME_BOUND_S = 60
_PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2 ** 20


@dataclass
class Measured:
    """How one ``python -m largebatch ...`` process ended."""

    args: tuple[str, ...]
    code: int
    seconds: float
    peak_mb: float
    stderr: str
    killed: str = ""

    def report(self) -> str:
        """The numbers every assertion message prints."""
        base = baseline_mb()
        return (f"`largebatch {' '.join(self.args)}`: exit {self.code}{self.killed}, "
                f"{self.seconds:.1f} s, peak RSS {self.peak_mb:.0f} MB (baseline {base:.0f} MB, "
                f"bound {base + MEMORY_BOUND_MB:.0f} MB); stderr: {self.stderr[-800:]!r}")


def run_measured(*args: str, guard_mb: float = 4 * MEMORY_BOUND_MB + 2048,
                 timeout: float = 2 * TIME_BOUND_S) -> Measured:
    """Run ``python -m largebatch ARGS`` from the repository root; its peak RSS from
    ``wait4``. Killed (process group) past ``guard_mb`` of RSS or ``timeout`` seconds."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-m", "largebatch", *args], cwd=REPO,
                                env=cli_env(), stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
        start, killed = time.monotonic(), ""
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            try:
                with open(f"/proc/{proc.pid}/statm") as f:
                    rss = int(f.read().split()[1]) * _PAGE_MB
            except (OSError, IndexError, ValueError):
                rss = 0.0
            if not killed and (rss > guard_mb or time.monotonic() - start > timeout):
                killed = f" (killed at {rss:.0f} MB RSS after {time.monotonic() - start:.0f} s)"
                os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(0.02)
        seconds = time.monotonic() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        text = err.read().decode(errors="replace")
    return Measured(args, proc.returncode, seconds, usage.ru_maxrss / 1024, text, killed)


@functools.cache
def baseline_mb() -> float:
    """Peak RSS of ``largebatch plan`` on a valid config: the interpreter with torch (~640 MB
    here), measured once per pytest process."""
    ok = run_measured("plan", "configs/mnist/mlp.yaml", "data.download=false")
    assert ok.code == 0, ok.report()
    return ok.peak_mb


def run_all(commands: dict[str, tuple[str, ...]]) -> dict[str, Measured]:
    """Every command measured, two at a time (each process's peak is its own)."""
    baseline_mb()
    with ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(run_measured, *args) for name, args in commands.items()}
        return {name: future.result() for name, future in futures.items()}


def assert_refused(run: Measured, *needles: str) -> None:
    """One error line holding every needle, exit 2, inside the time and memory bounds."""
    lines = run.stderr.strip().splitlines()
    assert run.code == 2 and len(lines) == 1, run.report()
    assert lines[0].startswith("largebatch: error: "), run.report()
    assert "Traceback" not in run.stderr, run.report()
    for needle in needles:
        assert needle in lines[0], f"{needle!r} missing: {run.report()}"
    assert run.seconds < TIME_BOUND_S, run.report()
    assert run.peak_mb < baseline_mb() + MEMORY_BOUND_MB, run.report()


# ---- the inputs ---------------------------------------------------------------------------

def jpeg(seed: int) -> bytes:
    """A valid 112 x 112 JPEG of noise (a few KiB)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def png_header(width: int, height: int, idat: bytes = b"") -> bytes:
    """A PNG whose header states ``width x height`` RGB, with ``idat`` as its pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2,
                                                                  0, 0, 0))
            + chunk(b"IDAT", idat or zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def write_recordio(root: Path, header_label: list[float], idx: str | None = None) -> Path:
    """``root/train.rec`` with header record 0 (``header_label``) and two images."""
    from largebatch.data.recordio import frame, pack
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    with open(root / "train.rec", "wb") as f:
        for key, payload in ((0, pack(header_label)), (1, pack(0, jpeg(1))),
                             (2, pack(0, jpeg(2)))):
            lines.append(f"{key}\t{f.tell()}\n")
            f.write(frame(payload))
    (root / "train.idx").write_text(idx if idx is not None else "".join(lines))
    return root


def encode_copies_bin(path: Path, pairs: int, text_bytes: int = 4096) -> None:
    """A protocol-2 ``.bin`` whose images are ``pairs * 2`` calls of ``_codecs.encode`` on ONE
    memoized latin-1 text: 5 bytes of pickle per image, each call a fresh copy of the text."""
    call = b"h\x00h\x01R"  # BINGET global, BINGET args, REDUCE
    text = b"x" * text_bytes
    out = [b"\x80\x02]q\x02(", b"c_codecs\nencode\nq\x00",
           b"X" + struct.pack("<I", len(text)) + text + b"X\x06\x00\x00\x00latin1\x86q\x01R",
           call * (2 * pairs - 1), b"e]q\x03(", b"\x88" * pairs, b"e\x86q\x04."]
    path.write_bytes(b"".join(out))


TRAIN = ("train.max_steps=1", "log.progress=false", "checkpoint.resume=never",
         "data.num_workers=0", "data.download=false")


@pytest.fixture(scope="module")
def attacks(tmp_path_factory) -> dict[str, Measured]:
    """Write every input, run each through its entry point (two processes at a time)."""
    d = tmp_path_factory.mktemp("hostile")
    rec_1e9 = write_recordio(d / "rec_1e9", [1e9, 1e9 + 5])
    rec_over = write_recordio(d / "rec_overflow", [3.0, 4.0],
                              idx="0\t0\n1\t99999999999999999999999\n")
    sparse = d / "sparse" / "id0"
    sparse.mkdir(parents=True)
    with open(sparse / "a.jpg", "wb") as f:  # a valid JPEG, then 4 GiB of holes
        f.write(jpeg(3))
        f.truncate(4 << 30)
    assert os.stat(sparse / "a.jpg").st_blocks * 512 < 1 << 20  # costs no disk
    bomb = d / "pixels" / "id0"
    bomb.mkdir(parents=True)
    (bomb / "a.png").write_bytes(png_header(9000, 9000))
    bins = d / "bins"
    bins.mkdir()
    one = jpeg(4)
    (bins / "memo.bin").write_bytes(pickle.dumps(([one] * 2_000_000, [True] * 1_000_000), 4))
    assert (bins / "memo.bin").stat().st_size < 6 << 20  # a million pairs in ~5 MB
    encode_copies_bin(bins / "copies.bin", pairs=1_000_000)
    face = ("train", "configs/face/synthetic_tiny.yaml", *TRAIN)
    folder = (*face, "data.name=imagefolder", "face.num_classes=1", "face.image_size=112",
              "face.val_targets=[]", "batch.global_size=1")
    plan_rec = ("plan", "configs/face/ms1mv3_r50.yaml", "data.num_samples=0",
                "--world-size", "8")
    return run_all({
        "recordio_header_1e9": (*plan_rec, f"data.root={rec_1e9}"),
        "recordio_offset_overflow": (*plan_rec, f"data.root={rec_over}"),
        "sparse_4gib_jpeg": (*folder, f"data.root={sparse.parent}", f"log.out_dir={d / 'r1'}"),
        "png_9000x9000": (*folder, f"data.root={bomb.parent}", f"log.out_dir={d / 'r2'}"),
        "bin_million_pairs_one_image": (*face, "face.val_targets=[memo]",
                                        f"face.val_root={bins}", f"log.out_dir={d / 'r3'}"),
        "bin_million_encode_copies": (*face, "face.val_targets=[copies]",
                                      f"face.val_root={bins}", f"log.out_dir={d / 'r4'}"),
    })


@pytest.mark.parametrize("name, needles", [
    ("recordio_header_1e9", ["record 0 (header)", "images 1..999999999", "lists only 3 records"]),
    ("recordio_offset_overflow", ["record 1", "index offset 99999999999999999999999",
                                  "past the end"]),
    ("sparse_4gib_jpeg", ["a.jpg", "4294967296 bytes", "limit on an image file"]),
    ("png_9000x9000", ["a.png", "81000000 pixels"]),
    ("bin_million_pairs_one_image", ["memo.bin", "2000000 images", "image 1 is image 0 again"]),
    ("bin_million_encode_copies", ["copies.bin", "more image bytes than the file holds"]),
])
def test_hostile_input_is_one_line_in_bounded_time_and_memory(attacks, name, needles):
    print(attacks[name].report())  # the measured numbers (pytest -rP shows them)
    assert_refused(attacks[name], *needles)


# ---- the same limits, in process (fast, exact) -----------------------------------------------

def test_image_size_is_checked_from_the_header_before_decoding(monkeypatch):
    from PIL import ImageFile

    from largebatch.data.face_images import DECODE_PIXEL_LIMIT, MAX_IMAGE_BYTES, decode_image
    def no_decode(self):
        raise AssertionError("decoded the pixels of a wrongly sized image")
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    # between the bomb limit and twice it PIL only warns: our header check refuses it
    side = int((1.5 * DECODE_PIXEL_LIMIT) ** 0.5)
    for w, h in ((side, side), (224, 224), (112, 111)):
        with pytest.raises(ConfigError, match=f"image is {w}x{h}, expected 112x112"):
            decode_image(png_header(w, h), "t.png")
    with pytest.raises(ConfigError, match="DecompressionBombError"):
        decode_image(png_header(9000, 9000), "t.png")
    with pytest.raises(ConfigError, match=f"over the {MAX_IMAGE_BYTES}-byte limit"):
        decode_image(b"\xff\xd8\xff" + bytes(MAX_IMAGE_BYTES), "t.jpg")


def test_record_lengths_are_checked_against_the_file_before_reading():
    from largebatch.data.recordio import MAX_RECORD_BYTES, MAGIC, read_record
    claim = struct.pack("<II", MAGIC, (1 << 29) - 1)  # a part of 512 MiB in a 16-byte file
    with pytest.raises(ConfigError, match="only 8 left in the file"):
        read_record(io.BytesIO(claim + bytes(8)), 0, "f.rec: record 3")
    # a split record whose parts add up past the limit, each part small enough
    part = (MAX_RECORD_BYTES // 2 + 4) & ~3
    data = (struct.pack("<II", MAGIC, 1 << 29 | part) + bytes(part)
            + struct.pack("<II", MAGIC, 2 << 29 | part) + bytes(part)
            + struct.pack("<II", MAGIC, 3 << 29 | 4) + bytes(4))
    with pytest.raises(ConfigError, match=f"over the {MAX_RECORD_BYTES}-byte limit"):
        read_record(io.BytesIO(data), 0, "f.rec: record 3")


def test_index_is_checked_against_the_rec_size(tmp_path):
    from largebatch.data.recordio import IndexedRecordReader
    root = write_recordio(tmp_path / "many", [3.0, 4.0])
    size = (root / "train.rec").stat().st_size
    lines = "".join(f"{k}\t{k % 3}\n" for k in range(size // 32 + 1))
    (root / "train.idx").write_text(lines)
    with pytest.raises(ConfigError, match=f"lists {size // 32 + 1} records, but .* holds at most"):
        IndexedRecordReader(root / "train.rec", root / "train.idx")
    (root / "train.idx").write_text("0\t0\n" * (size + 100))
    with pytest.raises(ConfigError, match="more than twice .*refused unread"):
        IndexedRecordReader(root / "train.rec", root / "train.idx")
    root = write_recordio(tmp_path / "ids", [3.0, 1e6])  # 2 images, a million identities
    from largebatch.data.recordio import image_keys
    with pytest.raises(ConfigError, match="1000000 - 3|999997 identities for 2 images"):
        image_keys(IndexedRecordReader(root / "train.rec", root / "train.idx"))


def test_a_repeated_image_array_is_refused_before_it_is_copied(tmp_path):
    from largebatch.data.bin_pairs import load_bin
    one = np.frombuffer(jpeg(5), np.uint8)
    path = tmp_path / "arrays.bin"
    path.write_bytes(pickle.dumps(([one] * 2000, [False] * 1000), 2))
    with pytest.raises(ConfigError, match="image 1 is image 0 again"):
        load_bin(path)
    distinct = [np.frombuffer(jpeg(i), np.uint8) for i in range(4)]  # an honest set still loads
    path.write_bytes(pickle.dumps((distinct, [True, False]), 2))
    images, same = load_bin(path)
    assert [bytes(a) for a in distinct] == images and same == [True, False]
