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
  sample is fresh each epoch. The random draws are per sample (one seeded generator each: a
  few microseconds); augmenting is batched tensor ops, far cheaper than the model step.
* **Layout independence, by construction.** A sample is bit-identical on every layout (world
  size, micro-batch size, position in a batch, rank, thread count), and not by luck of one
  CPU's kernels: a batched ``z @ B`` is not an option, since BLAS blocks the product by the
  batch size (so a row's summation order, and its last bits, depend on the batch it is in);
  neither is a batched ``tanh``, since ATen's vectorised loops compute the elements past the
  last full SIMD vector (and past each thread's chunk) with another implementation, which can
  differ in the last ulp. So every value is made by one of three kinds of operation:
  (1) correctly rounded elementwise IEEE ops (``+ - * /``, ``sqrt``) and exact ones (gathers,
  pads, flips, ``where``): their result is a function of their operands alone, whatever the
  tensor shape, the position, the SIMD width or the threads; (2) calls whose shape and
  operands never change and that run on one thread: ``tanh`` of one identity's pre-activation
  in chunks of ``_TANH_CHUNK`` elements (fewer than ATen's CPU grain sizes, so never split
  across threads), the bilinear upsampling of one decoder plane (12,544 values at 112 x 112),
  each per-sample generator's draws (serial by nature); (3) ``math.fsum`` (exact, rounded
  once) for the decoder's RMS. Hence ``render`` forms ``sum_j z_cj B_j`` as a fixed-order sum
  (``j = 0, 1, ...``) of elementwise products, so row ``c`` of any batch equals identity ``c``
  rendered alone; prototypes are cached by id (``PrototypeCache``: the cache changes speed,
  never values); and a batch is then gathers and elementwise ops. (The decoder used to
  normalise by a torch ``mean``, which at 112 x 112 is split across threads: the whole dataset
  depended on ``OMP_NUM_THREADS``, which ``torchrun`` sets to 1, i.e. on the world size.)
  Different CPUs (another SIMD width, another libm) may still differ in the last ulp of
  ``tanh`` or of the Gaussian draws; the layouts of one machine never do.
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
from collections import OrderedDict
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
#: Elements per ``tanh`` call: at most every ATen CPU grain size (32768 for plain kernels, 2048
#: for the VML-backed unary ones), so each call runs on one thread in one fixed pass.
_TANH_CHUNK = 1024
#: Elements per block of the elementwise latent mix (rows x pixels): a cache-sized working set.
_MIX_BLOCK = 2 ** 18
#: Bytes of prototypes a ``PrototypeCache`` keeps, the least recently used evicted: every
#: identity of a 10^5-identity set at 16 x 16 (3 KiB each), ~3,600 at 112 x 112 (147 KiB).
_CACHE_BYTES = 512 * 2 ** 20


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


def _unit_rms(fields: torch.Tensor) -> torch.Tensor:
    """Each of ``fields (count, ...)`` divided by its RMS. The sum of squares is ``math.fsum``'s
    (float32 squares are exact in float64; fsum is exact, then rounded once): one number, not
    a torch reduction whose blocking follows the thread count."""
    out = torch.empty_like(fields)
    for i, field in enumerate(fields):
        mean_sq = math.fsum(v * v for v in field.flatten().tolist()) / field.numel()
        out[i] = field / max(math.sqrt(mean_sq), 1e-6)
    return out


def _smooth_fields(count: int, res: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """``(count, 3, size, size)`` random ``res x res`` fields, upsampled, nearly mirror
    symmetric (as faces are: a flip is then a mild nuisance, not another identity), unit RMS.
    Each plane is upsampled alone (a fixed shape, fewer elements than a grain: one thread)."""
    low = torch.randn(count, 3, res, res, generator=gen)
    up = torch.cat([F.interpolate(plane[None, None], size=(size, size), mode="bilinear",
                                  align_corners=False)
                    for plane in low.flatten(0, 1)]).view(count, 3, size, size)
    up = (up + up.flip(-1)) / 2 + _ASYMMETRY * (up - up.flip(-1)) / 2
    return _unit_rms(up)


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
    """Prototype images ``(n, 3, H, W)`` of latent codes ``z (n, k)``:
    ``tanh(T + GAIN * sum_j z_ij B_j / sqrt(k))``, row ``i`` a function of ``z[i]`` alone
    (bit for bit whatever the batch, its order or the threads; see the module docstring): the
    sum is accumulated elementwise in the fixed order ``j = 0 .. k - 1`` (each product and each
    partial sum correctly rounded: no BLAS blocking), and ``tanh`` runs on each row alone, in
    fixed single-threaded chunks."""
    n, k = z.shape
    d = basis.shape[1]
    scale = _GAIN / math.sqrt(k)
    flat_template = template.reshape(-1)
    out = torch.empty(n, d, dtype=torch.result_type(z, basis))
    rows = max(1, _MIX_BLOCK // d)
    for start in range(0, n, rows):
        zb = z[start:start + rows]
        mix = basis[0] * zb[:, :1]
        for j in range(1, k):
            mix = mix + basis[j] * zb[:, j:j + 1]
        out[start:start + rows] = flat_template + mix * scale
    for columns in out.split(_TANH_CHUNK, dim=1):
        for piece in columns.unbind():  # one row's chunk: contiguous, always the same shape
            piece.tanh_()
    return out.view(n, *template.shape)


class PrototypeCache:
    """Identity prototypes by id, each rendered alone from its id-seeded latent and kept (least
    recently used evicted past ``max_bytes``): a batch's prototypes are then a gather. Values
    never depend on the cache's state, only the time to produce them does."""

    def __init__(self, latent_dim: int, image_size: int, max_bytes: int = _CACHE_BYTES) -> None:
        self.latent_dim = latent_dim
        self.template, self.basis = decoder(latent_dim, image_size)
        per_id = self.template.numel() * self.template.element_size()
        self.capacity = max(1, max_bytes // per_id)
        self._lru: OrderedDict[int, torch.Tensor] = OrderedDict()

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """``(len(ids), 3, H, W)`` prototypes of identities ``ids``."""
        keys = torch.unique(ids).tolist()
        missing = [c for c in keys if c not in self._lru]
        found = {c: self._lru[c] for c in keys if c in self._lru}
        for c in found:
            self._lru.move_to_end(c)
        if missing:
            new = render(latents(torch.tensor(missing), self.latent_dim), self.template,
                         self.basis)
            for c, proto in zip(missing, new):
                found[c] = self._lru[c] = proto.clone()  # not a view pinning the whole batch
            while len(self._lru) > self.capacity:
                self._lru.popitem(last=False)
        if len(ids) == 0:
            return torch.empty(0, *self.template.shape, dtype=self.template.dtype)
        return torch.stack([found[c] for c in ids.tolist()])


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
        self.prototypes = PrototypeCache(cfg.face.latent_dim, cfg.face.image_size)

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
        x = augment(self.prototypes(labels), keys, self.cfg)
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
    protos = PrototypeCache(f.latent_dim, f.image_size)(ids.flatten())
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
