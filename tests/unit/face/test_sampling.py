"""Partial FC at r = 0.1 on 2 real gloo ranks: exact accumulation, sparse updates, resharding.

Windows hold 2 micro-steps of 4 rows per rank (16 global samples); C = 1001 gives shards of
501 and 500 classes, so a sample keeps ceil(0.1 * 501) = 51 and 50 rows. References: the
plain full softmax over the sampled classes (one process), torch.optim.SGD / AdamW on the
sampled rows with their own state, and bitwise equality for everything that must not move.
"""
from __future__ import annotations

import torch
from torch import nn

from largebatch.face import ArcFace, PartialFC, PartialFCSGD, reshard
from tests.unit.face._reference import reference
from tests.unit.face._workers import C, LR, MOMENTUM, SD, WD, window_batch


def _sampled(pfc2, key):
    return [pfc2[r]["sampled"][key] for r in range(2)]


def test_accumulation_equals_one_big_batch_with_the_same_sample(pfc2):
    acc = _sampled(pfc2, "accumulation")
    for a in acc:  # 2 micro-steps normalised over the window == one 16-row batch
        assert a["n"] == 16 and torch.equal(a["sample_a"], a["sample_b"])
        torch.testing.assert_close(a["accum_loss"], a["big_loss"], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a["e_accum"], a["e_big"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(a["w_accum"], a["w_big"], rtol=1e-10, atol=1e-12)
    assert [len(a["sample_a"]) for a in acc] == [51, 50]
    e, y = window_batch(0)
    sample = torch.cat([a["sample_a"] for a in acc])  # sorted global class ids
    assert set(y.tolist()) <= set(sample.tolist())  # every positive kept
    w = torch.cat([a["weight"] for a in acc])
    loss, e_grad, w_grad = reference(e, torch.searchsorted(sample, y), w[sample], "arc")
    torch.testing.assert_close(acc[0]["accum_loss"], loss, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.cat([a["e_accum"] for a in acc]), 2 * e_grad,
                               rtol=1e-9, atol=1e-10)
    dense = torch.cat([a["w_accum"] for a in acc])
    torch.testing.assert_close(dense[sample], w_grad, rtol=1e-9, atol=1e-10)
    off = torch.ones(C, dtype=torch.bool)
    off[sample] = False
    assert not dense[off].any()


def test_class_missing_from_one_shards_sample_raises_on_every_rank(pfc2):
    errors = [a["missing_error"] for a in _sampled(pfc2, "accumulation")]
    assert all(e and "not in this window's sample" in e for e in errors), errors
    assert errors[0] == errors[1]  # rank 0 names rank 1's missing class too


def _off_sample(window: dict) -> torch.Tensor:
    off = torch.ones(len(window["weight"]), dtype=torch.bool)
    off[window["index"]] = False
    return off


def _torch_sgd_rows(weight, grad, buf):
    """torch.optim.SGD's step of these rows with these momentum rows (None: fresh)."""
    p = nn.Parameter(weight.clone())
    p.grad = grad.clone()
    opt = torch.optim.SGD([p], lr=LR, momentum=MOMENTUM, weight_decay=WD)
    if buf is not None:
        opt.state[p]["momentum_buffer"] = buf.clone()
    opt.step()
    return p.detach(), opt.state[p]["momentum_buffer"]


def test_sparse_sgd_leaves_unsampled_rows_and_momentum_bit_unchanged(pfc2):
    for log in _sampled(pfc2, "sgd"):
        stale = 0  # unsampled rows carrying momentum: a dense step would move them
        for w in log:
            off, idx = _off_sample(w), w["index"]
            buf = w["state"].get("momentum_buffer")
            assert torch.equal(w["weight_after"][off], w["weight"][off])
            if buf is not None:
                assert torch.equal(w["state_after"]["momentum_buffer"][off], buf[off])
                stale += int(buf[off].any(dim=1).sum())
            ref_w, ref_buf = _torch_sgd_rows(w["weight"][idx], w["grad"],
                                             None if buf is None else buf[idx])
            torch.testing.assert_close(w["weight_after"][idx], ref_w, rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(w["state_after"]["momentum_buffer"][idx], ref_buf,
                                       rtol=1e-12, atol=1e-15)
            assert not torch.equal(w["weight_after"][idx], w["weight"][idx])
        assert stale > 50, stale


def test_dense_update_moves_every_row_like_torch_sgd(pfc2):
    """sparse_update=False is torch.optim.SGD on the dense gradient (zeros off the sample)."""
    for log in _sampled(pfc2, "dense"):
        for w in log:
            full = torch.zeros_like(w["weight"]).index_copy_(0, w["index"], w["grad"])
            ref_w, _ = _torch_sgd_rows(w["weight"], full, w["state"].get("momentum_buffer"))
            torch.testing.assert_close(w["weight_after"], ref_w, rtol=1e-12, atol=1e-15)
            off = _off_sample(w)
            assert (w["weight_after"][off] != w["weight"][off]).all(dim=1).all()


def _torch_adamw_rows(weight, grad, prev: dict | None):
    p = nn.Parameter(weight.clone())
    p.grad = grad.clone()
    opt = torch.optim.AdamW([p], lr=1e-3, weight_decay=0.01)
    if prev is not None:
        opt.state[p].update(step=torch.tensor(float(prev["step"])),
                            exp_avg=prev["exp_avg"].clone(),
                            exp_avg_sq=prev["exp_avg_sq"].clone())
    opt.step()
    return p.detach()


def test_sparse_adamw_per_row_steps(pfc2):
    for log in _sampled(pfc2, "adamw"):
        for w in log:
            off, idx, before, after = _off_sample(w), w["index"], w["state"], w["state_after"]
            assert torch.equal(w["weight_after"][off], w["weight"][off])
            for key in ("exp_avg", "exp_avg_sq", "row_step"):
                if key in before:
                    assert torch.equal(after[key][off], before[key][off])
            prev_steps = before["row_step"][idx] if before else torch.zeros(len(idx), dtype=int)
            torch.testing.assert_close(after["row_step"][idx], prev_steps + 1)
            for step in prev_steps.unique().tolist():  # rows sampled before vs first time
                rows = (prev_steps == step).nonzero().view(-1)
                prev = None if step == 0 else {"step": step, **{
                    k: before[k][idx[rows]] for k in ("exp_avg", "exp_avg_sq")}}
                ref = _torch_adamw_rows(w["weight"][idx[rows]], w["grad"][rows], prev)
                torch.testing.assert_close(w["weight_after"][idx[rows]], ref, rtol=1e-10,
                                           atol=1e-14)
        assert log[1]["state"]["row_step"].max() == 1  # some rows sampled twice: step 2
        assert log[1]["state_after"]["row_step"].max() == 2


def _rows(state: dict) -> dict:
    return state["_extra_state"]["optimizer"]["rows"]


def _assert_same_shard(a: dict, b: dict) -> None:
    for key in ("class_start", "num_local", "num_classes"):
        assert a["_extra_state"][key] == b["_extra_state"][key]
    assert torch.equal(a["weight"], b["weight"])
    assert _rows(a).keys() == _rows(b).keys()
    for key in _rows(a):
        assert torch.equal(_rows(a)[key], _rows(b)[key]), key


def test_reshard_round_trips_with_optimizer_state(pfc2):
    """2 -> 1, 1 -> 2, 2 -> 3 (uneven 334 + 334 + 333) -> 2 and -> 1, bit for bit."""
    for key, row_keys in (("sgd_state", {"momentum_buffer"}),
                          ("adamw_state", {"exp_avg", "exp_avg_sq", "row_step"})):
        states = _sampled(pfc2, key)
        assert set(_rows(states[0])) == row_keys
        full = reshard(states, 1, 0)
        assert (full["_extra_state"]["class_start"], full["_extra_state"]["num_local"]) == (0, C)
        assert torch.equal(full["weight"], torch.cat([s["weight"] for s in states]))
        for k in row_keys:
            assert torch.equal(_rows(full)[k], torch.cat([_rows(s)[k] for s in states]))
            assert _rows(full)[k].abs().sum() > 0
        for r in range(2):
            _assert_same_shard(reshard([full], 2, r), states[r])
        three = [reshard(states[::-1], 3, r) for r in range(3)]  # any order of old shards
        assert [(t["_extra_state"]["class_start"], t["_extra_state"]["num_local"])
                for t in three] == [(0, 334), (334, 334), (668, 333)]
        for r in range(2):
            _assert_same_shard(reshard(three, 2, r), states[r])
        _assert_same_shard(reshard(three, 1, 0), full)


def test_resharded_state_resumes_on_one_rank(pfc2):
    """2 ranks' state after window 0, resharded to 1: window 1 on one process == 2 ranks."""
    cont = _sampled(pfc2, "continuation")
    target = torch.cat([c["weight1"] for c in cont])
    full = reshard([c["state0"] for c in cont], 1, 0)
    e, y = window_batch(1)  # the global batch: rank 0's rows, then rank 1's
    moved = []
    for keep_momentum in (True, False):
        head = PartialFC(ArcFace(64.0, 0.5), SD, C, seed=123).double()  # init is overwritten
        head.load_state_dict(full)
        opt = PartialFCSGD(head, lr=LR, momentum=MOMENTUM, weight_decay=WD)  # loaded after
        if not keep_momentum:
            opt.state.clear()
        head(e, y).backward()
        opt.step()
        moved.append((head.weight.detach() - target).abs().max().item())
    assert moved[0] <= 1e-12 and moved[1] > 1e-4, moved
