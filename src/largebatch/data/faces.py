"""``synthetic_faces``: a deterministic, learnable identities dataset for the face task on CPU.

Identities share structure, so that what is learned on the training identities transfers to
held-out ones (as a face model trained on some people verifies others):

* **Latent.** Identity ``c`` has a code ``z_c ~ N(0, I_k)`` (``k = face.latent_dim``) drawn
  from a generator seeded by ``c`` alone: every rank, world size and run agrees on it
  without communication, and held-out ids are simply ids past the training ones.
* **Shared generator.** One FIXED decoder (seeded by a constant and the image size, never by
  an id) renders every code: a smooth template ``T`` (the "face layout" all identities
  share) plus ``k`` smooth basis images ``B_j`` (random low-resolution fields, half at a
  quarter and half at half the resolution, bilinearly upsampled, unit RMS), squashed by
  ``tanh``: ``prototype(c) = tanh(T + GAIN * sum_j z_cj B_j / sqrt(k))``. Identities differ
  only along the ``k`` shared directions, so an embedding that reads those directions and
  ignores nuisances is learnable from the training ids and valid for new ones.
* **Samples.** A sample is its identity's prototype under a random shift of up to
  ``face.shift`` pixels (edges replicated), a horizontal flip (``face.flip``), a per-channel
  colour gain ``1 +- jitter`` and bias ``+- jitter`` and Gaussian pixel noise
  (``face.noise``); all drawn from a generator seeded by ``(seed, epoch, global index)``, so a
  sample is identical on every layout (world size, micro size) and fresh each epoch. The
  random draws are per sample (one seeded generator each: a few microseconds); rendering and
  augmenting are batched tensor ops, far cheaper than the model step.
* **Long tail.** Identity ``c`` has ``n_c = max(face.min_samples_per_class,
  floor(samples_per_class * (c + 1)^-long_tail + 1/2))`` samples (``long_tail = 0``: uniform,
  ``samples_per_class`` each, the floor unused);
  global index ``i`` belongs to the identity whose cumulative count first exceeds ``i``.
  ``data.subset`` keeps the first N samples.
* **Verification.** ``face.eval_identities`` held-out identities (ids ``C ... C + E - 1``);
  ``face.eval_pairs`` fixed pairs, even-numbered ones of the same identity (two different
  augmented samples), odd ones of two different identities; their augmentation is seeded by
  the pair slot alone (the same set for every training seed).

Loaders are rank-sharded with DistributedSampler semantics (``shard_indices``). Evaluation
batches are ``(x, y)`` with ``x: (n, 2, 3, H, W)`` (both images of each pair) and
``y: (n, 2)`` = ``[global pair index, same identity 0/1]``, so the task can place every
rank's scores into one global vector.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F

from largebatch.config import Config, ConfigError
from largebatch.data.loaders import Batch, shard_indices
from largebatch.data.face_images import PairBatches

_PROTO_SEED = 0x5EED_FACE
_DECODER_SEED = 0xDEC0DE
_EVAL_SEED = 0xE7A1
#: Contrast of the identity part before tanh: large enough that identities differ clearly,
#: small enough that tanh does not saturate most pixels (which would erase the differences).
_GAIN = 1.5
#: Weight of the mirror-antisymmetric part of every generated field (0: exactly symmetric).
_ASYMMETRY = 0.3
#: Draws of uniforms per sample: dy, dx, flip, 3 gains, 3 biases.
_NUM_UNIFORM = 9


def _check(cfg: Config) -> None:
    """One-line ConfigError naming the key and value of any bad ``synthetic_faces`` field."""
    f = cfg.face
    for key in ("num_classes", "samples_per_class", "min_samples_per_class", "latent_dim",
                "image_size"):
        if getattr(f, key) < 1:
            raise ConfigError(f"face.{key}={getattr(f, key)} must be >= 1")
    if f.eval_identities < 2:
        raise ConfigError(f"face.eval_identities={f.eval_identities} must be >= 2 (pairs of "
                          f"different identities)")
    if f.eval_pairs < 2:
        raise ConfigError(f"face.eval_pairs={f.eval_pairs} must be >= 2 (same and different "
                          f"pairs)")
    if f.long_tail > 0 and f.min_samples_per_class > f.samples_per_class:
        raise ConfigError(f"face.min_samples_per_class={f.min_samples_per_class} must be <= "
                          f"face.samples_per_class={f.samples_per_class}")
    if not 0 <= f.long_tail <= 10:
        raise ConfigError(f"face.long_tail={f.long_tail} must be in [0, 10]")
    if not 0 <= f.shift < f.image_size:
        raise ConfigError(f"face.shift={f.shift} must be in [0, face.image_size="
                          f"{f.image_size})")
    if not 0 <= f.jitter < 1:
        raise ConfigError(f"face.jitter={f.jitter} must be in [0, 1) (a gain 1 - jitter > 0)")
    if not f.noise >= 0:  # also refuses NaN
        raise ConfigError(f"face.noise={f.noise} must be >= 0")


def class_counts(cfg: Config) -> torch.Tensor:
    """``(C,)`` int64 training samples per identity (the configured long tail, closed form)."""
    f = cfg.face
    c = torch.arange(f.num_classes, dtype=torch.float64)
    if f.long_tail == 0:  # uniform: the floor of the tail does not apply
        return torch.full((f.num_classes,), f.samples_per_class, dtype=torch.long)
    n = torch.floor(f.samples_per_class * (c + 1) ** -float(f.long_tail) + 0.5)
    return n.clamp(min=f.min_samples_per_class).long()


def latents(ids: torch.Tensor, dim: int) -> torch.Tensor:
    """``(len(ids), dim)`` latent codes, each drawn from a generator seeded by its id alone."""
    gen = torch.Generator()
    out = torch.empty(len(ids), dim)
    for i, c in enumerate(ids.tolist()):
        gen.manual_seed(_PROTO_SEED + int(c))
        out[i] = torch.randn(dim, generator=gen)
    return out


def _smooth_fields(count: int, res: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """``(count, 3, size, size)`` random ``res x res`` fields, upsampled, nearly mirror
    symmetric (as faces are: a flip is then a mild nuisance, not another identity), unit RMS."""
    low = torch.randn(count, 3, res, res, generator=gen)
    up = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    up = (up + up.flip(-1)) / 2 + _ASYMMETRY * (up - up.flip(-1)) / 2
    return up / up.pow(2).mean((1, 2, 3), keepdim=True).sqrt().clamp_min(1e-6)


def decoder(latent_dim: int, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed shared generator: ``(template (3, H, W), basis (k, 3 * H * W))``."""
    gen = torch.Generator().manual_seed(_DECODER_SEED + image_size)
    coarse, fine = max(2, math.ceil(image_size / 4)), max(2, math.ceil(image_size / 2))
    template = _smooth_fields(1, coarse, image_size, gen)[0]
    half = latent_dim // 2
    basis = torch.cat([_smooth_fields(latent_dim - half, coarse, image_size, gen),
                       _smooth_fields(half, fine, image_size, gen)])
    return template, basis.flatten(1)


def render(z: torch.Tensor, template: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Prototype images ``(n, 3, H, W)`` of latent codes ``z (n, k)``."""
    mix = (z @ basis) * (_GAIN / math.sqrt(z.shape[1]))
    return torch.tanh(template + mix.view(-1, *template.shape))


def _draws(keys: list[int], shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``(uniforms (n, 9), normals (n, *shape))``, one generator per key."""
    gen = torch.Generator()
    u, eps = torch.empty(len(keys), _NUM_UNIFORM), torch.empty(len(keys), *shape)
    for i, key in enumerate(keys):
        gen.manual_seed(key % 2 ** 63)
        u[i] = torch.rand(_NUM_UNIFORM, generator=gen)
        eps[i] = torch.randn(*shape, generator=gen)
    return u, eps


def _shift(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, s: int) -> torch.Tensor:
    """Shift each image by ``(dy_i, dx_i)`` pixels in ``[-s, s]``, edges replicated."""
    n, ch, h, w = x.shape
    xp = F.pad(x, (s, s, s, s), mode="replicate")
    rows = (torch.arange(h) + s - dy[:, None]).view(n, 1, h, 1).expand(n, ch, h, w + 2 * s)
    xp = xp.gather(2, rows)
    cols = (torch.arange(w) + s - dx[:, None]).view(n, 1, 1, w).expand(n, ch, h, w)
    return xp.gather(3, cols)


def augment(protos: torch.Tensor, keys: list[int], cfg: Config) -> torch.Tensor:
    """Shift, flip, colour-jitter and noise ``protos (n, 3, H, W)``; sample i's draws come
    from the generator seeded by ``keys[i]`` alone."""
    f = cfg.face
    u, eps = _draws(keys, tuple(protos.shape[1:]))
    s = f.shift
    dy = (u[:, 0] * (2 * s + 1)).long().clamp(max=2 * s) - s
    dx = (u[:, 1] * (2 * s + 1)).long().clamp(max=2 * s) - s
    x = _shift(protos, dy, dx, s) if s else protos
    if f.flip:
        x = torch.where((u[:, 2] < 0.5).view(-1, 1, 1, 1), x.flip(-1), x)
    gain = 1 + f.jitter * (2 * u[:, 3:6] - 1)
    bias = f.jitter * (2 * u[:, 6:9] - 1)
    return x * gain[:, :, None, None] + bias[:, :, None, None] + f.noise * eps


def train_size(cfg: Config, train: bool = True) -> int:
    """Samples of the split: sum of the class sizes (capped by data.subset), or the pairs."""
    _check(cfg)
    if not train:
        return cfg.face.eval_pairs
    n = int(class_counts(cfg).sum())
    return min(n, cfg.data.subset) if cfg.data.subset else n


class SyntheticFaceLoader:
    """Training micro-batches of one rank: labels by cumulative class counts."""

    def __init__(self, cfg: Config, batch_size: int, rank: int, world: int, seed: int,
                 device: torch.device) -> None:
        self.cfg, self.n = cfg, train_size(cfg)
        self.cum = class_counts(cfg).cumsum(0)
        self.batch_size, self.rank, self.world, self.seed = batch_size, rank, world, seed
        self.drop_last, self.device, self.epoch = cfg.data.drop_last, device, 0
        f = cfg.face
        self.z = latents(torch.arange(f.num_classes), f.latent_dim)
        self.template, self.basis = decoder(f.latent_dim, f.image_size)

    def set_epoch(self, epoch: int) -> None:
        """Choose the permutation and the augmentation draws of ``epoch`` (same on all ranks)."""
        self.epoch = epoch

    def _indices(self) -> torch.Tensor:
        return shard_indices(self.n, self.rank, self.world, self.seed, self.epoch, True,
                             self.drop_last)

    def __len__(self) -> int:
        n = len(self._indices())
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def labels(self, index: torch.Tensor) -> torch.Tensor:
        """Identity of each global sample index (the class whose cumulative count exceeds it)."""
        return torch.searchsorted(self.cum, index.contiguous(), right=True)

    def sample(self, index: torch.Tensor) -> Batch:
        """Images and labels of global sample ``index`` for the current epoch."""
        labels = self.labels(index)
        keys = [(self.seed * 1_000_003 + self.epoch) * 10_000_019 + int(i) for i in index]
        x = augment(render(self.z[labels], self.template, self.basis), keys, self.cfg)
        return x.to(self.device), labels.to(self.device)

    def __iter__(self) -> Iterator[Batch]:
        idx = self._indices()
        stop = len(idx) - len(idx) % self.batch_size if self.drop_last else len(idx)
        for start in range(0, stop, self.batch_size):
            yield self.sample(idx[start:start + self.batch_size])


def pair_ids(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids (P, 2), same (P,))`` of the verification pairs: even pairs the same identity."""
    f = cfg.face
    gen = torch.Generator().manual_seed(_EVAL_SEED)
    p = f.eval_pairs
    same = (torch.arange(p) % 2 == 0).long()
    a = torch.randint(0, f.eval_identities, (p,), generator=gen)
    step = torch.randint(1, f.eval_identities, (p,), generator=gen)
    b = torch.where(same.bool(), a, (a + step) % f.eval_identities)
    return torch.stack([a, b], 1) + f.num_classes, same  # held out: past every training id


def verification_pairs(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images (P, 2, 3, H, W), same (P,))`` of the held-out identities (fixed)."""
    _check(cfg)
    f = cfg.face
    ids, same = pair_ids(cfg)
    z = latents(torch.arange(f.eval_identities) + f.num_classes, f.latent_dim)
    protos = render(z[(ids - f.num_classes).flatten()], *decoder(f.latent_dim, f.image_size))
    keys = [_EVAL_SEED * 7_919 + k for k in range(2 * len(same))]
    return augment(protos, keys, cfg).view(len(same), 2, *protos.shape[1:]), same


class PairLoader(PairBatches):
    """This rank's unpadded share of the verification pairs (every pair counted once)."""

    def __init__(self, cfg: Config, rank: int, world: int, device: torch.device,
                 batch_size: int = 256) -> None:
        images, same = verification_pairs(cfg)
        self.index = torch.arange(rank, len(same), world)
        self.images, self.same = images[self.index], same[self.index]
        self.batch_size, self.device = batch_size, device
        self.total = len(same)



def eval_loaders(cfg: Config, rank: int, world: int,
                 device: torch.device) -> PairLoader | dict[str, object]:
    """The held-out identities' pairs; with ``face.val_targets``, those ``.bin`` sets too
    (the held-out set stays first: the primary ``verification_*`` metrics)."""
    held_out = PairLoader(cfg, rank, world, device)
    if not cfg.face.val_targets:
        return held_out
    from largebatch.data.bin_pairs import val_loaders
    return {"synthetic": held_out, **val_loaders(cfg, rank, world, device)}


def synthetic_faces_spec():  # -> DatasetSpec (imported lazily by the registry)
    """The registry entry of ``data.name=synthetic_faces`` (nothing to download)."""
    from largebatch.data.registry import DatasetSpec
    return DatasetSpec(size=train_size, prepare=lambda data, denv: None,
                       train_loader=SyntheticFaceLoader, eval_loader=eval_loaders,
                       full_config=True)
