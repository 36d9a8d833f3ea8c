"""``synthetic_faces``: layout-independent samples, the long tail, held-out pairs, augmentation.

References are independent of the module's formulas: the single-process epoch (for the rank
shards), each sample rendered alone in a fresh loader (for every batch shape, order, world size
and thread count), the docstring's closed form in float64 (prototypes), Python ``math`` (class
sizes), plain slicing of a replicate-padded image (shifts), ``torch.flip`` (flips) and a
least-squares fit (colour jitter).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from largebatch.config import ConfigError, load_config
from largebatch.data.faces import (PairLoader, PrototypeCache, SyntheticFaceLoader, decoder,
                                   latents, pair_ids, render, train_size, verification_pairs)
from largebatch.data.loaders import shard_indices
from tests.conftest import CONFIGS

TINY = CONFIGS / "face" / "synthetic_tiny.yaml"
# 37 classes, long tail 0.7 from 12 down to a floor of 3: 130 samples (no shard padding at
# world sizes 1, 2 and 5)
SMALL = ["face.num_classes=37", "face.samples_per_class=12", "face.long_tail=0.7",
         "face.min_samples_per_class=3", "face.image_size=8", "face.latent_dim=6",
         "face.eval_identities=9", "face.eval_pairs=40"]


def cfg_of(*extra: str):
    return load_config(TINY, SMALL + list(extra))


def epoch(cfg, batch: int, rank: int = 0, world: int = 1, ep: int = 0):
    loader = SyntheticFaceLoader(cfg, batch, rank, world, seed=5, device="cpu")
    loader.set_epoch(ep)
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def expected_counts(c: int, spc: int, alpha: float, floor: int) -> list[int]:
    if alpha == 0:  # uniform: no floor
        return [spc] * c
    return [max(floor, math.floor(spc * (k + 1) ** -alpha + 0.5)) for k in range(c)]


def test_rank_shards_interleave_to_the_single_process_epoch():
    cfg = cfg_of()
    n = train_size(cfg)
    assert n == sum(expected_counts(37, 12, 0.7, 3)) == 130
    x1, y1 = epoch(cfg, n)  # one batch: the whole epoch in DistributedSampler order
    for world, micro in ((2, 7), (5, 4), (1, 13)):
        shards = [epoch(cfg, micro, r, world) for r in range(world)]
        # rank r holds positions r, r + world, ... of the epoch's order (130 % world == 0)
        x = torch.stack([s[0] for s in shards], 1).flatten(0, 1)
        y = torch.stack([s[1] for s in shards], 1).flatten(0, 1)
        assert torch.equal(x, x1) and torch.equal(y, y1), (world, micro)


def alone(cfg, index: int, ep: int = 0) -> torch.Tensor:
    """Sample ``index`` rendered by itself: a batch of one, in a fresh loader (empty cache)."""
    loader = SyntheticFaceLoader(cfg, 1, 0, 1, seed=5, device="cpu")
    loader.set_epoch(ep)
    return loader.sample(torch.tensor([index]))[0][0]


@pytest.mark.parametrize("size", [7, 8])  # 3 * 7 * 7 = 147: SIMD tails in every row
def test_a_sample_is_the_same_in_every_batch_shape_order_and_layout(size):
    cfg = cfg_of(f"face.image_size={size}", "face.shift=2")
    n = train_size(cfg)
    for ep in (0, 1):
        ref = torch.stack([alone(cfg, i, ep) for i in range(n)])
        assert len({r.numpy().tobytes() for r in ref}) == n  # distinct samples: a real check
        # the same indices in batches of many shapes and in shuffled orders; a warm cache
        # (prototypes reused across batches) and a one-identity cache (each batch re-rendered)
        warm = SyntheticFaceLoader(cfg, 1, 0, 1, seed=5, device="cpu")
        cold = SyntheticFaceLoader(cfg, 1, 0, 1, seed=5, device="cpu")
        cold.prototypes = PrototypeCache(cfg.face.latent_dim, size, max_bytes=1)
        assert cold.prototypes.capacity == 1
        gen = torch.Generator().manual_seed(ep)
        for loader in (warm, cold):
            loader.set_epoch(ep)
            for bs in (1, 2, 3, 7, 13, 64, n):
                order = torch.randperm(n, generator=gen)
                for start in range(0, n, bs):
                    index = order[start:start + bs]
                    x, _ = loader.sample(index)
                    for i, img in zip(index.tolist(), x):
                        assert torch.equal(img, ref[i]), (size, ep, bs, i)
            # repeats of one index inside a batch (the padding of a sharded epoch does that)
            index = torch.tensor([3, 3, 100, 3, 0, 100])
            x, _ = loader.sample(index)
            assert all(torch.equal(img, ref[i]) for i, img in zip(index.tolist(), x))
        # the real loaders: rank shards of several world sizes and micro sizes (world 3 pads
        # 130 to 132 by repeating samples), each yielded row against its index's sample alone
        for world, micro in ((1, 1), (1, 130), (2, 7), (3, 64), (5, 4), (4, 13)):
            for rank in range(world):
                loader = SyntheticFaceLoader(cfg, micro, rank, world, seed=5, device="cpu")
                loader.set_epoch(ep)
                index = shard_indices(n, rank, world, 5, ep, True, cfg.data.drop_last)
                x = torch.cat([xb for xb, _ in loader])
                assert len(x) == len(index)
                for i, img in zip(index.tolist(), x):
                    assert torch.equal(img, ref[i]), (size, ep, world, micro, rank, i)


def test_prototypes_do_not_depend_on_the_thread_count():
    """torchrun sets OMP_NUM_THREADS=1 for several ranks; one process uses every core. At 112 x
    112 a field (37,632 values) is past ATen's grain size, so a torch reduction or a ``tanh``
    over it would be split across threads; the dataset must not change with that."""
    threads = torch.get_num_threads()
    ids = torch.tensor([0, 5, 299, 301])
    got = []
    try:
        for t in (1, 3):
            torch.set_num_threads(t)
            template, basis = decoder(16, 112)
            got.append((template, basis, render(latents(ids, 16), template, basis),
                        PrototypeCache(16, 112)(ids.flip(0))))
    finally:
        torch.set_num_threads(threads)
    (t1, b1, r1, c1), (t3, b3, r3, c3) = got
    assert torch.equal(t1, t3) and torch.equal(b1, b3)
    assert torch.equal(r1, r3) and torch.equal(c1, c3) and torch.equal(c1, r1.flip(0))


def test_prototypes_match_the_closed_form_in_float64():
    """``tanh(T + GAIN * sum_j z_j B_j / sqrt(k))`` with GAIN = 1.5, recomputed in float64 from
    the same float32 inputs. Bound: ``k`` products, ``k - 1`` sums, one scaling and one template
    sum in float32, each within ``u = 2^-24`` relative of its operands' magnitudes, so the
    pre-activation is within ``(k + 2) u (|T| + s sum_j |z_j B_j|)`` (to first order); tanh is
    1-Lipschitz and adds its own few ulps (|tanh| <= 1): ``+ 4u``."""
    clean = ("face.noise=0", "face.jitter=0", "face.flip=false", "face.shift=0")
    for size in (7, 16):
        cfg = cfg_of(f"face.image_size={size}", *clean)
        k = cfg.face.latent_dim
        template, basis = (t.double() for t in decoder(k, size))
        # the decoder's fields have unit RMS
        rms = basis.pow(2).mean(1).sqrt()
        assert torch.allclose(rms, torch.ones(k, dtype=torch.float64), atol=1e-6)
        assert abs(float(template.pow(2).mean().sqrt()) - 1) < 1e-6
        loader = SyntheticFaceLoader(cfg, 64, 0, 1, seed=5, device="cpu")
        index = torch.tensor([0, 11, 12, 57, 129])
        x, y = loader.sample(index)  # clean: the samples are their prototypes
        z = latents(y, k).double()
        s = 1.5 / math.sqrt(k)
        expect = torch.tanh(template.flatten() + s * z @ basis).view_as(x)
        u = 2.0 ** -24
        bound = (k + 2) * u * (template.flatten().abs() + s * z.abs() @ basis.abs()) + 4 * u
        err = (x.double() - expect).abs()
        assert (err <= bound.view_as(x)).all(), float((err - bound.view_as(x)).max())
        # and the bound is tight enough to see a wrong formula (another GAIN: 1.4 instead)
        wrong = torch.tanh(template.flatten() + 1.4 / math.sqrt(k) * z @ basis).view_as(x)
        assert float((x.double() - wrong).abs().max()) > 100 * float(bound.max())


def test_class_sizes_follow_the_configured_long_tail():
    for alpha, spc, floor in ((0.7, 12, 3), (0.0, 5, 1), (1.5, 40, 2), (0.0, 2, 3)):
        cfg = cfg_of(f"face.long_tail={alpha}", f"face.samples_per_class={spc}",
                     f"face.min_samples_per_class={floor}")
        _, y = epoch(cfg, 64)
        assert torch.bincount(y, minlength=37).tolist() == expected_counts(37, spc, alpha,
                                                                          floor)
    # data.subset keeps the first N samples: identity 0's 12, then 5 of identity 1's 7
    _, y = epoch(cfg_of("data.subset=17"), 64)
    assert torch.bincount(y).tolist() == [12, 5]


def test_held_out_pairs_are_disjoint_and_half_same():
    cfg = cfg_of()
    ids, same = pair_ids(cfg)
    _, y = epoch(cfg, 64)
    assert int(y.max()) < 37 <= int(ids.min()) and int(ids.max()) < 37 + 9
    assert set(y.tolist()).isdisjoint(ids.flatten().tolist())
    assert int(same.sum()) == 20 and same.tolist() == [1, 0] * 20
    assert torch.equal(ids[:, 0] == ids[:, 1], same.bool())
    images, same2 = verification_pairs(cfg)
    assert torch.equal(same, same2) and images.shape == (40, 2, 3, 8, 8)
    # the two images of a same pair are two different draws of one identity
    assert all(not torch.equal(images[p, 0], images[p, 1]) for p in range(0, 40, 2))
    # sharded over 3 ranks: every pair exactly once, with its global index
    loaders = [PairLoader(cfg, r, 3, "cpu", batch_size=4) for r in range(3)]
    got = {int(i): (xb[k], int(s)) for pl in loaders for xb, yb in pl
           for k, (i, s) in enumerate(yb.tolist())}
    assert sorted(got) == list(range(40))
    assert all(torch.equal(got[p][0], images[p]) and got[p][1] == same[p] for p in range(40))


def test_augmentation_is_fresh_each_epoch_and_fixed_per_sample():
    cfg = cfg_of()
    loader = SyntheticFaceLoader(cfg, 8, 0, 1, seed=5, device="cpu")
    index = torch.tensor([0, 50, 129])
    x0, y0 = loader.sample(index)
    again, _ = SyntheticFaceLoader(cfg, 3, 1, 2, seed=5, device="cpu").sample(index)
    assert torch.equal(x0, again)  # a function of (seed, epoch, index) only
    loader.set_epoch(1)
    x1, y1 = loader.sample(index)
    assert torch.equal(y0, y1) and all(not torch.allclose(a, b) for a, b in zip(x0, x1))


def prototypes(cfg, labels):
    f = cfg.face
    return render(latents(labels, f.latent_dim), *decoder(f.latent_dim, f.image_size))


def test_shifts_flips_jitter_and_noise_match_plain_references():
    clean = ("face.noise=0", "face.jitter=0", "face.flip=false")
    cfg = cfg_of(*clean, "face.shift=2")
    x, y = epoch(cfg, 64)
    p = F.pad(prototypes(cfg, y), (2, 2, 2, 2), mode="replicate")
    shifts = set()
    for img, pad in zip(x, p):  # exactly one window of the padded prototype
        hits = [(dy, dx) for dy in range(5) for dx in range(5)
                if torch.allclose(img, pad[:, dy:dy + 8, dx:dx + 8], atol=1e-6)]
        assert len(hits) == 1
        shifts.add(hits[0])
    assert len(shifts) == 25  # every shift in [-2, 2]^2 occurs
    cfg = cfg_of("face.noise=0", "face.jitter=0", "face.shift=0")
    x, y = epoch(cfg, 64)
    proto = prototypes(cfg, y)
    flipped = [torch.allclose(a, b.flip(-1), atol=1e-6) for a, b in zip(x, proto)]
    kept = [torch.allclose(a, b, atol=1e-6) for a, b in zip(x, proto)]
    assert all(f != k for f, k in zip(flipped, kept)) and 0.35 < sum(flipped) / len(x) < 0.65
    cfg = cfg_of("face.noise=0", "face.flip=false", "face.shift=0", "face.jitter=0.2")
    x, y = epoch(cfg, 64)
    proto = prototypes(cfg, y)
    a = torch.stack([proto.flatten(2), torch.ones_like(proto.flatten(2))], -1)
    fit = torch.linalg.lstsq(a, x.flatten(2).unsqueeze(-1)).solution[..., 0]  # (n, 3, 2)
    assert torch.allclose(torch.einsum("ncpk,nck->ncp", a, fit), x.flatten(2), atol=1e-4)
    gain, bias = fit[..., 0], fit[..., 1]
    assert (gain - 1).abs().max() <= 0.2 + 1e-4 and bias.abs().max() <= 0.2 + 1e-4
    assert (gain - 1).abs().max() > 0.15 and bias.std() > 0.05  # and it does vary
    cfg = cfg_of("face.noise=0.3", "face.jitter=0", "face.flip=false", "face.shift=0")
    x, y = epoch(cfg, 64)
    resid = x - prototypes(cfg, y)
    assert abs(float(resid.std()) - 0.3) < 0.01 and abs(float(resid.mean())) < 0.01


def test_identities_are_seeded_by_their_id_and_share_one_generator():
    assert torch.equal(latents(torch.tensor([30, 4]), 6), latents(torch.arange(31), 6)[[30, 4]])
    cfg = cfg_of("face.noise=0", "face.jitter=0", "face.flip=false", "face.shift=0")
    f = cfg.face
    template, basis = decoder(f.latent_dim, f.image_size)
    protos = render(latents(torch.arange(200), 6).double(), template.double(), basis.double())
    # shared structure: the identities' pre-tanh images span only latent_dim + 1 directions
    sv = torch.linalg.svdvals(torch.atanh(protos.flatten(1)))
    assert sv[6] > 1e-3 * sv[0] and sv[7] < 1e-6 * sv[0]


@pytest.mark.parametrize("override, key", [
    ("face.samples_per_class=0", "face.samples_per_class=0"),
    ("face.min_samples_per_class=13", "face.min_samples_per_class=13"),
    ("face.long_tail=-0.5", "face.long_tail=-0.5"),
    ("face.shift=8", "face.shift=8"),
    ("face.jitter=1.0", "face.jitter=1.0"),
    ("face.noise=-0.1", "face.noise=-0.1"),
    ("face.latent_dim=0", "face.latent_dim=0"),
    ("face.eval_pairs=1", "face.eval_pairs=1"),
    ("face.eval_identities=1", "face.eval_identities=1"),
])
def test_bad_values_are_one_line_config_errors(override, key):
    with pytest.raises(ConfigError) as err:
        train_size(cfg_of(override))
    assert key in str(err.value) and "\n" not in str(err.value)
