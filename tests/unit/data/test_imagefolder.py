"""ImageFolder trees: labels from sorted folder names, exact read-back through the rank-sharded
loaders (2 ranks, 0 and 2 workers) against PIL + torchvision, one-line errors."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DistributedSampler

from largebatch.config import ConfigError, load_config
from largebatch.data import imagefolder
from largebatch.data.imagefolder import ImageFolderLoader, ImageFolderSource, scan
from largebatch.data.registry import dataset

# created in this (unsorted) order; labels follow the sorted names: amy 0, bob10 1, bob2 2, zed 3
IDENTITIES = {"zed": ["a.jpg", "b.PNG", "c.bmp"], "amy": ["x.jpeg", "y.png", "z.JPG", "w.webp"],
              "bob2": ["1.png", "2.jpg"], "bob10": ["p.jpg", "q.tiff", "r.png", "s.jpg", "t.jpg"]}
N = 14
FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP",
           ".tiff": "TIFF"}


def encode(seed: int, fmt: str, size: tuple[int, int] = (112, 112)) -> bytes:
    """An asymmetric test image (random 8x8 blocks) in ``fmt``."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    extra = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    Image.fromarray(np.kron(blocks, np.ones((8, 8, 1), np.uint8))).save(buf, fmt, **extra)
    return buf.getvalue()


def reference(path) -> torch.Tensor:
    """insightface's transform by PIL + torchvision: ToTensor, Normalize(0.5, 0.5)."""
    return TF.normalize(TF.to_tensor(Image.open(path).convert("RGB")), [0.5] * 3, [0.5] * 3)


def face_cfg(root, num_classes=4, **data):
    return load_config(base={"task": {"name": "face"},
                             "data": {"name": "imagefolder", "root": str(root), **data},
                             "face": {"num_classes": num_classes}})


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree")
    seed = 0
    for name, files in IDENTITIES.items():
        (root / name).mkdir()
        for f in files:
            fmt = FORMATS[f[f.rindex("."):].lower()]
            (root / name / f).write_bytes(encode(seed, fmt))
            seed += 1
        (root / name / ".DS_Store").write_bytes(b"junk")  # hidden: not an image
        (root / name / "notes.txt").write_text("not an image either")
    (root / ".cache").mkdir()  # hidden folder: not an identity
    (root / "README.md").write_text("a file at the top is not an identity")
    return root


def test_labels_are_sorted_folder_positions_and_only_images_count(tree):
    paths, labels, classes = scan(tree)
    assert classes == ("amy", "bob10", "bob2", "zed")
    expect = [(str(tree / c / f), k) for k, c in enumerate(classes)
              for f in sorted(IDENTITIES[c])]
    assert list(zip(paths, labels)) == expect and len(paths) == N
    assert dataset("imagefolder").size(face_cfg(tree), True) == N
    assert dataset("imagefolder").size(face_cfg(tree, subset=5), True) == 5


@pytest.mark.parametrize("workers", [0, 2])
def test_two_ranks_read_every_image_exactly_once(tree, workers):
    paths, labels, _ = scan(tree)
    refs = [reference(p) for p in paths]
    cfg = face_cfg(tree, num_workers=workers)
    for epoch in (0, 2):
        seen, flipped = [], 0
        for rank in (0, 1):
            loader = ImageFolderLoader(cfg, 3, rank, 2, 11, torch.device("cpu"))
            loader.set_epoch(epoch)
            batches = list(loader)
            sampler = DistributedSampler(range(N), num_replicas=2, rank=rank, seed=11)
            sampler.set_epoch(epoch)
            order = list(sampler)
            assert [len(y) for _, y in batches] == [3, 3, 1] and len(loader) == 3
            x = torch.cat([b[0] for b in batches])
            y = torch.cat([b[1] for b in batches])
            assert x.dtype == torch.float32 and y.dtype == torch.int64
            assert y.tolist() == [labels[i] for i in order]
            for row, i in zip(x, order):
                plain, mirrored = torch.equal(row, refs[i]), torch.equal(row, TF.hflip(refs[i]))
                assert plain != mirrored
                flipped += mirrored
            seen.append(order)
        assert not set(seen[0]) & set(seen[1]) and set(seen[0]) | set(seen[1]) == set(range(N))
        assert 2 <= flipped <= 12


def test_registry_loader_is_the_imagefolder_loader(tree):
    spec = dataset("imagefolder")
    loader = spec.train_loader(face_cfg(tree), 14, 0, 1, 0, torch.device("cpu"))
    (x, y), = list(loader)
    assert x.shape == (N, 3, 112, 112) and sorted(y.tolist()) == sorted(scan(tree)[1])


def one_line(exc_info, *parts):
    text = str(exc_info.value)
    assert "\n" not in text and all(str(p) in text for p in parts), text


def test_tree_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError) as exc:
        scan(tmp_path / "missing")
    one_line(exc, "data.root=", "missing", "is not a folder")
    with pytest.raises(ConfigError) as exc:
        scan(tmp_path)
    one_line(exc, "no identity folders")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "1.png").write_bytes(encode(1, "PNG"))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.txt").write_text("no image")
    with pytest.raises(ConfigError) as exc:
        scan(tmp_path)
    one_line(exc, "identity folder 'b' holds no images")
    (tmp_path / "b" / "2.jpg").write_bytes(encode(2, "PNG", size=(96, 112)))  # PNG bytes, .jpg
    (tmp_path / "b" / "3.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (tmp_path / "b" / "4.jpg").write_bytes(encode(4, "JPEG"))
    (tmp_path / "c").mkdir()  # touching the root: a fresh listing
    (tmp_path / "c" / "5.png").write_bytes(encode(5, "PNG"))
    with pytest.raises(ConfigError) as exc:
        ImageFolderSource(tmp_path, num_classes=2)
    one_line(exc, "face.num_classes=2", "holds 3 identity folders")
    source = ImageFolderSource(tmp_path, num_classes=3)
    with pytest.raises(ConfigError) as exc:
        source.read(1)
    one_line(exc, tmp_path / "b" / "2.jpg", "image is 96x112, expected 112x112")
    with pytest.raises(ConfigError) as exc:
        source.read(2)
    one_line(exc, tmp_path / "b" / "3.jpg", "not a readable image")
    loader = ImageFolderLoader(face_cfg(tmp_path, num_classes=3, num_workers=2), 5, 0, 1, 0,
                               torch.device("cpu"))
    with pytest.raises(ConfigError) as exc:  # from a worker: still one line
        list(loader)
    one_line(exc, tmp_path / "b", ".jpg")


def test_size_lists_without_decoding(tree, tmp_path, monkeypatch):
    def fail(*args):
        raise AssertionError("size() decoded an image")
    monkeypatch.setattr(imagefolder, "decode_image", fail)
    assert dataset("imagefolder").size(face_cfg(tree), True) == N
    assert dataset("imagefolder").size(face_cfg(tmp_path / "absent", num_samples=77), True) == 77
    with pytest.raises(ConfigError) as exc:
        dataset("imagefolder").size(face_cfg(tree, num_samples=15), True)
    one_line(exc, "data.num_samples=15", f"holds {N} images")
