"""Synthetic identities written as real files: an ImageFolder tree and a pairs list.

The same generator as ``data.name=synthetic_faces`` (``largebatch.data.faces``), rendered at
insightface's 112 x 112 and saved as PNG (lossless): ``OUT/train/<identity>/<k>.png`` for the
training identities and ``OUT/heldout/pair<p>_<a|b>.png`` with ``OUT/pairs.txt`` for the
verification pairs of identities no training image shows. So the whole real-data path can be
walked without a download: ``largebatch convert`` (ImageFolder -> RecordIO), ``make-bin``
(pairs -> ``.bin``), ``train`` on the RecordIO, ``export``, ``embed``, ``eval``.

The generator's floats (about [-1, 1]) become ``round((x + 1) / 2 * 255)``, the inverse of the
``(x / 255 - 0.5) / 0.5`` every real-image loader applies.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from largebatch.config import load_config
from largebatch.data.faces import SyntheticFaceLoader, verification_pairs

IMAGE_SIZE = 112


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` generator floats -> ``(H, W, 3)`` uint8 RGB."""
    pixels = ((x.clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8)
    return pixels.permute(1, 2, 0).contiguous().numpy()


def _save(pixels: np.ndarray, path: Path) -> None:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, "PNG")


def write_synthetic_faces(out: str | Path, identities: int = 40, per_identity: int = 8,
                          eval_identities: int = 20, pairs: int = 200, seed: int = 1,
                          progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """Write the tree and the pairs list; returns what was written (counts and paths)."""
    out = Path(out)
    cfg = load_config(None, [
        "task.name=face", "data.name=synthetic_faces", "model.name=tiny_face",
        f"face.num_classes={identities}", f"face.samples_per_class={per_identity}",
        "face.long_tail=0", f"face.image_size={IMAGE_SIZE}", "face.noise=0.3",
        "face.shift=4", "face.jitter=0.1",  # synthetic_tiny.yaml's nuisances, at 112 pixels
        f"face.eval_identities={eval_identities}", f"face.eval_pairs={pairs}",
        f"train.seed={seed}"])
    loader = SyntheticFaceLoader(cfg, 64, 0, 1, seed, torch.device("cpu"))
    total = identities * per_identity + 2 * pairs
    done = 0
    for start in range(0, loader.n, 64):
        x, y = loader.sample(torch.arange(start, min(start + 64, loader.n)))
        for k, (image, label) in enumerate(zip(x, y.tolist())):
            _save(_to_uint8(image), out / "train" / f"id{label:05d}" / f"{start + k:06d}.png")
        done += len(y)
        if progress is not None:
            progress(done, total)
    images, same = verification_pairs(cfg)
    lines = []
    for p, (both, s) in enumerate(zip(images, same.tolist())):
        names = [f"heldout/pair{p:05d}_{side}.png" for side in "ab"]
        for image, name in zip(both, names):
            _save(_to_uint8(image), out / name)
        lines.append(f"{names[0]} {names[1]} {int(s)}")
        done += 2
        if progress is not None:
            progress(done, total)
    (out / "pairs.txt").write_text("\n".join(lines) + "\n")
    return {"train_images": loader.n, "identities": identities, "pairs": pairs,
            "train": str(out / "train"), "pairs_txt": str(out / "pairs.txt")}
