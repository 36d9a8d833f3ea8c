"""Partial FC in one process: shards, sampling, optimizers vs torch, state, memory plan."""
from __future__ import annotations

import math

import pytest
import torch

from largebatch.config import ConfigError
from largebatch.face import ArcFace, CosFace, PartialFC, PartialFCAdamW, PartialFCSGD, \
    expected_positive_share, fc_memory, reshard, shard_range
from largebatch.face.shards import init_rows
from tests.unit.face._reference import reference


def _batch(n: int, d: int, classes: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=gen, dtype=torch.float64),
            torch.randint(0, classes, (n,), generator=gen))


def test_insightface_split_and_world_independent_init():
    assert [shard_range(1001, 2, r) for r in range(2)] == [(0, 501), (501, 500)]
    assert [shard_range(1001, 3, r) for r in range(3)] == [(0, 334), (334, 334), (668, 333)]
    assert [shard_range(10, 4, r) for r in range(4)] == [(0, 3), (3, 3), (6, 2), (8, 2)]
    with pytest.raises(ConfigError, match="num_classes=1"):
        shard_range(1, 2, 0)
    full = init_rows(0, 9000, 8, seed=3, std=0.01)  # blocks of 4096 rows cross shard edges
    parts = [init_rows(*shard_range(9000, 7, r), 8, seed=3, std=0.01) for r in range(7)]
    assert torch.equal(full, torch.cat(parts))
    assert abs(full.std().item() - 0.01) < 5e-4


def test_one_rank_r1_equals_full_softmax():
    head = PartialFC(ArcFace(64.0, 0.5), 16, 50).double()
    e, y = _batch(12, 16, 50)
    e.requires_grad_(True)
    loss = head(e, y)
    loss.backward()
    ref_loss, ref_e, ref_w = reference(e, y, head.weight, "arc")
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(e.grad, ref_e, rtol=0, atol=1e-12)  # world 1: factor 1
    torch.testing.assert_close(head.weight.grad, ref_w, rtol=0, atol=1e-12)


def test_sample_keeps_positives_and_is_seeded():
    e, y = _batch(20, 8, 1000)
    heads = [PartialFC(CosFace(), 8, 1000, sample_rate=0.05, seed=s).double() for s in (1, 1, 2)]
    samples = []
    for head in heads:
        assert head.begin_window(y) == 20
        samples.append(head.sampled_classes())
    assert len(samples[0]) == math.ceil(0.05 * 1000) == 50
    assert set(y.tolist()) <= set(samples[0].tolist())
    assert torch.equal(samples[0], samples[1]) and not torch.equal(samples[0], samples[2])
    head = heads[0]
    loss = head(e, y)
    loss.backward()
    ref, _, ref_w = reference(e, torch.searchsorted(samples[0], y), head.weight[samples[0]], "cos")
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(head.shard_grad()[samples[0]], ref_w, rtol=0, atol=1e-12)
    head.end_window()
    head.begin_window(y)  # the next window draws other negatives
    assert not torch.equal(head.sampled_classes(), samples[0])


def test_window_misuse_is_reported():
    head = PartialFC(CosFace(), 8, 1000, sample_rate=0.01).double()
    e, y = _batch(4, 8, 1000)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 1000\)"):
        head(e, torch.tensor([0, 1, 2, 1000]))
    head.begin_window(y)
    outside = torch.tensor([c for c in range(1000) if c not in head.sampled_classes()][:4])
    with pytest.raises(ValueError, match="not in this window's sample"):
        head(e, outside)
    loss = head(e, y)
    loss.backward()
    with pytest.raises(RuntimeError, match="backpropagated once"):
        loss.backward()
    with pytest.raises(RuntimeError, match="never stepped"):
        head.begin_window(y)
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="face.sample_rate"):
            PartialFC(CosFace(), 8, 1000, sample_rate=bad)


def test_forward_outside_a_window_samples_its_own_batch():
    """insightface's usage: forward, backward, step; a new sample per step."""
    head = PartialFC(CosFace(), 8, 1000, sample_rate=0.01).double()
    opt = PartialFCSGD(head, lr=0.1)
    e, y = _batch(4, 8, 1000)
    head(e, y)  # no backward: the next forward may resample
    head(e, y).backward()
    first = head.sampled_classes()
    assert set(y.tolist()) <= set(first.tolist())
    opt.step()
    assert head.sampled_classes() is None  # the step closed the window
    head(e, y)
    assert not torch.equal(head.sampled_classes(), first)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_at_r1_is_torch_sgd(nesterov):
    head = PartialFC(ArcFace(), 8, 30).double()
    ref_w = torch.nn.Parameter(head.weight.detach().clone())
    opt = PartialFCSGD(head, lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=nesterov)
    ref = torch.optim.SGD([ref_w], lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=nesterov)
    for step in range(3):
        e, y = _batch(6, 8, 30, seed=step)
        head(e, y).backward()
        ref_w.grad = head.weight.grad.clone()
        opt.step(), ref.step(), opt.zero_grad()
    torch.testing.assert_close(head.weight.detach(), ref_w.detach(), rtol=0, atol=1e-15)


def test_adamw_at_r1_is_torch_adamw():
    head = PartialFC(ArcFace(), 8, 30).double()
    ref_w = torch.nn.Parameter(head.weight.detach().clone())
    opt = PartialFCAdamW(head, lr=1e-2, weight_decay=0.05)
    ref = torch.optim.AdamW([ref_w], lr=1e-2, weight_decay=0.05)
    for step in range(3):
        e, y = _batch(6, 8, 30, seed=step)
        head(e, y).backward()
        ref_w.grad = head.weight.grad.clone()
        opt.step(), ref.step(), opt.zero_grad()
    torch.testing.assert_close(head.weight.detach(), ref_w.detach(), rtol=1e-12, atol=1e-15)


def test_grad_norm_contribution_and_clip():
    head = PartialFC(ArcFace(), 8, 1000, sample_rate=0.1).double()
    e, y = _batch(6, 8, 1000)
    head.begin_window(y)
    head(e, y).backward()
    dense = head.shard_grad()
    torch.testing.assert_close(head.grad_sq_norm(), dense.pow(2).sum(), rtol=1e-12, atol=0)
    assert head.grad_sq_norm() > 0
    head.mul_grad_(0.5)
    torch.testing.assert_close(head.shard_grad(), 0.5 * dense, rtol=0, atol=0)


def test_state_dict_round_trip_and_wrong_shard():
    head = PartialFC(ArcFace(), 8, 1000, sample_rate=0.1, seed=4).double()
    opt = PartialFCSGD(head, lr=0.1, momentum=0.9)
    e, y = _batch(6, 8, 1000)
    head.begin_window(y)
    head(e, y).backward()
    opt.step()
    state = head.state_dict()
    again = PartialFC(ArcFace(), 8, 1000, sample_rate=0.1, seed=99).double()
    again_opt = PartialFCSGD(again, lr=0.1, momentum=0.9)
    again.load_state_dict(state)
    assert torch.equal(again.weight, head.weight)
    assert torch.equal(again_opt.state[again.weight]["momentum_buffer"],
                       opt.state[head.weight]["momentum_buffer"])
    head.begin_window(y), again.begin_window(y)  # the sampling stream resumes too
    assert torch.equal(again.sampled_classes(), head.sampled_classes())
    other = {"weight": state["weight"] + 1.0,  # same shape, another class range
             "_extra_state": dict(state["_extra_state"], class_start=500)}
    before = again.weight.detach().clone()
    with pytest.raises(ValueError, match="reshard"):
        again.load_state_dict(other)
    assert torch.equal(again.weight, before)  # refused before anything was copied
    with pytest.raises(ValueError, match="reshard"):
        again.load_state_dict(reshard([state], 2, 1))  # another shape: the same message
    with pytest.raises(ValueError, match="gap or overlap"):
        reshard([reshard([state], 2, 1)], 1, 0)


def test_fc_memory_numbers():
    got = fc_memory(1001, 16, 2, sample_rate=0.1, optimizer="sgd", global_micro_batch=8)
    assert (got["num_local"], got["num_sample"]) == (501, 51)
    assert got["weight_bytes"] == 501 * 16 * 4 == got["optimizer_bytes"]
    assert got["grad_bytes"] == 2 * 51 * 16 * 4  # sampled copy + its gradient
    assert (got["logits_elements"], got["logits_bytes"]) == (8 * 51, 8 * 51 * 4)
    assert got["total_bytes"] == 2 * 32064 + 6528
    adam = fc_memory(200_000, 512, 1, optimizer="adamw", dtype=torch.bfloat16)
    assert adam["optimizer_bytes"] == 2 * 200_000 * 512 * 2 + 8 * 200_000
    one, two = (fc_memory(200_000, 512, w, sample_rate=0.1)["total_bytes"] for w in (1, 2))
    assert one == 2 * two  # per rank, proportional to C / world
    with pytest.raises(ConfigError, match="face.optimizer"):
        fc_memory(10, 4, 1, optimizer="lamb")
    assert abs(expected_positive_share(1000, 1000) - (1 - 0.999 ** 1000)) < 1e-12


def test_normalize_rows_matches_torch_normalize():
    """The head's cheaper normalisation: values and gradient equal F.normalize's (zero row too)."""
    from largebatch.face.softmax_ce import normalize_rows
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    x[3] = 0.0  # its norm is clamped at eps
    g = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    mine, ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    normalize_rows(mine).backward(g)
    torch.nn.functional.normalize(ref, dim=1).backward(g)
    torch.testing.assert_close(normalize_rows(x), torch.nn.functional.normalize(x, dim=1),
                               rtol=0, atol=1e-15)
    torch.testing.assert_close(mine.grad, ref.grad, rtol=1e-12, atol=1e-12)
