"""Partial FC at r = 1 on 2 real gloo ranks against a plain single-process full softmax.

C = 1001 classes make uneven shards ([0, 501) and [501, 1001)); the labels sit on the shard
boundaries; the ranks hold 9 and 7 rows (an uneven gather). The reference is written
plainly: F.normalize, F.linear, the margin as torch ops (cos(theta + m) by the angle-sum
identity, not the head's code), F.cross_entropy and autograd (tests/unit/face/_reference.py).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.unit.face._reference import margin_logits, reference
from tests.unit.face._workers import S, SIZES, global_batch


def _ranks(pfc2, key):
    return [pfc2[r]["exact"][key] for r in range(2)]


@pytest.mark.parametrize("kind,dtype,tol", [("cos", torch.float64, 1e-9),
                                            ("arc", torch.float64, 1e-9),
                                            ("cos", torch.float32, 1e-5),
                                            ("arc", torch.float32, 1e-5)])
def test_r1_two_ranks_equal_full_softmax(pfc2, kind, dtype, tol):
    """fp64: the arithmetic is exact (1e-9); fp32: within 1e-5 (absolute + relative)."""
    ranks = _ranks(pfc2, (kind, str(dtype)))
    assert [r["class_start"] for r in ranks] == [0, 501]
    w = torch.cat([r["weight"] for r in ranks]).double()
    e, y = global_batch(dtype)
    assert torch.cos(torch.tensor(math.pi - 0.5)) > F.cosine_similarity(
        e[8:12].double(), w[y[8:12]]).max()  # these rows take ArcFace's fallback
    loss, e_grad, w_grad = reference(e.double(), y, w, kind)
    for r in range(2):
        got = ranks[r]
        torch.testing.assert_close(got["loss"].double(), loss, rtol=tol, atol=tol)
        # the convention: each rank's embeddings get world_size x dL/dE (DDP divides by 2)
        rows = slice(sum(SIZES[:r]), sum(SIZES[: r + 1]))
        torch.testing.assert_close(got["e_grad"].double(), 2 * e_grad[rows], rtol=tol, atol=tol)
        # centre gradients reach ~5 (1 / |w| with |w| ~ 0.06), fp32 keeps ~7 digits of them
        cls = slice(got["class_start"], got["class_start"] + len(got["weight"]))
        torch.testing.assert_close(got["w_grad"].double(), w_grad[cls], rtol=tol, atol=tol)
    assert e_grad.abs().max() > 1e-2 and w_grad.abs().max() > 1e-2  # not vacuous


def test_straight_through_margin_fails_the_tolerance(pfc2):
    """Same loss, wrong gradient: the exactness test above tells the two apart."""
    st = _ranks(pfc2, ("st", str(torch.float64)))
    e, y = global_batch(torch.float64)
    w = torch.cat([r["weight"] for r in st])
    loss, e_grad, w_grad = reference(e, y, w, "arc")
    torch.testing.assert_close(st[0]["loss"], loss, rtol=0, atol=1e-9)
    assert (st[0]["e_grad"] - 2 * e_grad[: SIZES[0]]).abs().max() > 1e-2  # >> 1e-5
    assert (torch.cat([r["w_grad"] for r in st]) - w_grad).abs().max() > 1e-2


def test_no_probability_clamp(pfc2):
    """s = 64: a perfect fit costs ~0, a confident wrong class its true ~90 (not 69.08)."""
    got = pfc2[0]["exact"]["no_clamp"]
    assert got == pfc2[1]["exact"]["no_clamp"]  # every rank reports the global loss
    arc_t = -math.sin(0.5)  # ArcFace's phi at cos = 0: cos(pi/2 + 0.5)
    wrong = {"cos": math.log(math.exp(S) + 6 + math.exp(-0.4 * S)) + 0.4 * S,
             "arc": math.log(math.exp(S) + 6 + math.exp(arc_t * S)) - arc_t * S}
    fit = {"cos": math.log1p(7 * math.exp(-0.6 * S)),
           "arc": math.log1p(7 * math.exp(-math.cos(0.5) * S))}
    for kind in ("cos", "arc"):
        assert abs(got[f"{kind}_fit"] - fit[kind]) <= 1e-6
        assert wrong[kind] > 69.08 + 20
        assert abs(got[f"{kind}_wrong"] - wrong[kind]) <= 1e-6 * wrong[kind]


def test_bf16_inputs_reduce_in_fp32(pfc2):
    """bf16 embeddings: everything after the bf16 cosines runs in fp32.

    Against the same bf16 cosines pushed through an fp64 margin softmax the loss agrees to
    1e-5 (relative); the same cross-entropy in bf16 is off by ~3e-3, and the whole result stays
    within bf16's rounding of the fp64 reference.
    """
    got = _ranks(pfc2, ("arc", str(torch.bfloat16)))
    assert got[0]["loss"].dtype == torch.float32 and got[0]["e_grad"].dtype == torch.bfloat16
    w = torch.cat([g["weight"] for g in got])
    e, y = global_batch(torch.bfloat16)
    cos = F.linear(F.normalize(e, dim=1), F.normalize(w.to(torch.bfloat16), dim=1))
    logits = margin_logits(cos.double(), y, "arc")
    same_cos = F.cross_entropy(logits, y).item()
    assert abs(got[0]["loss"].item() - same_cos) <= 1e-5 * same_cos
    assert abs(F.cross_entropy(logits.to(torch.bfloat16), y).item() - same_cos) > 1e-3 * same_cos
    loss, e_grad, w_grad = reference(e.double(), y, w.double(), "arc")
    assert abs(got[0]["loss"].item() - loss.item()) <= 1e-2 * loss.item()
    e_got = torch.cat([g["e_grad"] for g in got]).double()
    assert (e_got - 2 * e_grad).norm() <= 3e-2 * (2 * e_grad).norm()
    w_got = torch.cat([g["w_grad"] for g in got]).double()
    assert (w_got - w_grad).norm() <= 3e-2 * w_grad.norm()
