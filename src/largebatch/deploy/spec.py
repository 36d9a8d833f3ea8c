"""What an exported model takes and gives, read from the data pipeline that trained it, and
the batch its export is checked on.

The input facts are those of the loaders that fed the model during training, not a guess:

* ``recordio`` / ``imagefolder`` / the ``.bin`` verification sets decode to uint8 RGB
  (``face_images.decode_image``: PIL ``convert("RGB")``) 112 x 112 crops and normalise them
  with ``face_images.normalize``: ``(x / 255 - 0.5) / 0.5``, insightface's ``ToTensor`` +
  ``Normalize(0.5, 0.5)`` (so a model trained here takes exactly what arcface_torch's takes);
* ``synthetic_faces`` renders float images directly in that normalised range (about [-1, 1]:
  ``tanh`` prototypes, colour jitter, noise; ``data.faces``): no pixel normalisation at all;
* ``mnist``: 1 x 28 x 28 grey, ``(x / 255 - 0.1307) / 0.3081`` (``data.mnist.normalize_uint8``).

The check batch is the run's own evaluation data when it can be read (the verification pairs'
images, the test split), else a deterministic random batch of the right shape; ``Sample.what``
says which.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from largebatch.config import Config, ConfigError

#: Data names whose images are insightface's uint8 RGB crops, normalised by face_images.
_FACE_FILES = ("recordio", "imagefolder")


@dataclass
class InputSpec:
    """The model's input and output as the sidecar documents them.

    Attributes:
        shape: ``(channels, height, width)`` of one image (NCHW float32 batches).
        channel_order: ``"RGB"`` or ``"grey"``.
        normalisation: the formula applied to uint8 pixels, or a sentence saying there is none.
        mean: per-channel mean in [0, 1] units (None: no normalisation).
        std: per-channel std in [0, 1] units (None: no normalisation).
        output: the output's name (``embeddings`` or ``log_probs``).
        notes: what else a user must know (alignment, how to compare embeddings).
    """

    shape: tuple[int, int, int]
    channel_order: str
    normalisation: str
    mean: Optional[list[float]]
    std: Optional[list[float]]
    output: str
    notes: list[str] = field(default_factory=list)


def _face_spec(cfg: Config) -> InputSpec:
    """A face backbone's input: insightface's crops, or synthetic_faces' rendered images."""
    from largebatch.data.face_images import IMAGE_SIZE
    use = ("embeddings are not normalised: L2-normalise them and compare by cosine "
           "similarity; largebatch's verification adds the embedding of the horizontally "
           "flipped image before normalising (face.verification.flip_embed)")
    notes = [use]
    if cfg.data.name == "synthetic_faces":
        size = cfg.face.image_size
        none = ("none: synthetic_faces renders float images already in the normalised range "
                "(about [-1, 1]); real 112x112 RGB crops would take (x / 255 - 0.5) / 0.5")
        return InputSpec((3, size, size), "RGB", none, None, None, "embeddings", notes)
    notes.insert(0, "insightface's 112x112 aligned face crops (5-point similarity transform)")
    return InputSpec((3, IMAGE_SIZE, IMAGE_SIZE), "RGB", "(x / 255 - 0.5) / 0.5", [0.5] * 3,
                     [0.5] * 3, "embeddings", notes)


def input_spec(cfg: Config, sample: Optional[torch.Tensor] = None) -> InputSpec:
    """The input facts of ``cfg``'s model (``sample``, a real batch, gives an unknown
    dataset's shape).

    Raises:
        ConfigError: an unknown dataset and no batch to read its shape from.
    """
    if cfg.task.name == "face" and cfg.data.name in ("synthetic_faces", *_FACE_FILES):
        return _face_spec(cfg)
    if cfg.data.name == "mnist":
        from largebatch.data.mnist import MEAN, STD
        return InputSpec((1, 28, 28), "grey", f"(x / 255 - {MEAN}) / {STD}", [MEAN], [STD],
                         "log_probs", ["log-probabilities over the 10 digits"])
    if sample is None or sample.dim() != 4:
        raise ConfigError(f"data.name={cfg.data.name!r}: cannot tell the model's input shape "
                          f"(not a largebatch dataset, and its evaluation data is unreadable)")
    out = "embeddings" if cfg.task.name == "face" else "outputs"
    return InputSpec(tuple(sample.shape[1:]), "unknown", f"unknown: data.name="
                     f"{cfg.data.name!r} is not a largebatch dataset", None, None, out)


@dataclass
class Sample:
    """The batch an export is checked on, and what it is."""

    images: torch.Tensor
    what: str


def _first_images(loader: Any) -> tuple[Optional[str], torch.Tensor]:
    """The images of a loader's first batch; pairs ``(n, 2, C, H, W)`` become ``(2n, C, H,
    W)``, a Mapping of loaders (verification sets by name) gives its first set's, named."""
    name = None
    if isinstance(loader, Mapping):
        name, loader = next(iter(loader.items()))
    x = next(iter(loader))[0]
    return name, (x.flatten(0, 1) if x.dim() == 5 else x)


def _eval_images(cfg: Config) -> tuple[Optional[str], torch.Tensor]:
    """The first evaluation batch's images (and its set's name), read as rank 0 of 1, never
    downloading."""
    from largebatch.data.registry import dataset
    cfg = copy.deepcopy(cfg)
    cfg.data.download = False  # an export reads what is there; it never fetches a data set
    # A check batch needs a few images: decode the first verification set only, not all three
    # of lfw, cfp_fp, agedb_30 (~40,000 JPEGs).
    cfg.face.val_targets = list(cfg.face.val_targets[:1])
    spec = dataset(cfg.data.name)
    loader = spec.eval_loader(cfg if spec.full_config else cfg.data, 0, 1,
                              torch.device("cpu"))
    name, images = _first_images(loader)
    return name, images.float().cpu()


def _random_images(spec: InputSpec, n: int) -> torch.Tensor:
    """``n`` deterministic random images: uniform pixels through the model's normalisation, or
    uniform in [-1, 1] where there is none."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, *spec.shape, generator=gen)
    if spec.mean is None:
        return x * 2 - 1
    mean = torch.tensor(spec.mean).view(-1, 1, 1)
    std = torch.tensor(spec.std).view(-1, 1, 1)
    return (x - mean) / std


def sample_batch(cfg: Config, n: int, minimum: int = 2) -> tuple[Sample, InputSpec]:
    """Up to ``n`` images of the run's evaluation data (at least ``minimum``), else ``n``
    random ones, and the spec.

    Returns:
        The sample (``what`` names its origin, and why random when it is) and the input spec.
    """
    try:
        name, images = _eval_images(cfg)
        images = images[:n]
        where = cfg.data.name + (f" {name}" if name else "")
        what = f"the run's evaluation data ({where}: {len(images)} images)"
    except (ConfigError, OSError, RuntimeError, ValueError, StopIteration) as exc:
        images, why = None, " ".join(str(exc).split())[:160] or type(exc).__name__
    spec = input_spec(cfg, images)
    if images is None or tuple(images.shape[1:]) != spec.shape or len(images) < minimum:
        if images is not None:
            why = (f"its images are {tuple(images.shape[1:])}, the model takes {spec.shape}"
                   if tuple(images.shape[1:]) != spec.shape else f"{len(images)} image(s)")
        images = _random_images(spec, n)
        what = f"a deterministic random batch ({n} images; evaluation data unavailable: {why})"
    return Sample(images.contiguous(), what), spec
