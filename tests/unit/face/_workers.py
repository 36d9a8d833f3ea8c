"""What the 2 gloo ranks run for the Partial FC tests (one spawn serves every 2-rank test).

Each rank computes with the head and saves what it got; the tests (in the parent process)
compare it with plain single-process references. Data are generated from fixed seeds, the
same on every rank, and each rank takes its slice: rank 0 the first rows of the global batch.
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F

from largebatch.face import ArcFace, CombinedMargin, CosFace, PartialFC, PartialFCAdamW, \
    PartialFCSGD
from largebatch.face.shards import init_rows

# exactness at r = 1: uneven shards [0, 501) + [501, 1001), labels on the boundaries
C, D, SEED, S = 1001, 32, 7, 64.0
LABELS = [500, 501, 0, 1000, 499, 502, 1, 999, 250, 750, 500, 501, 3, 998, 600, 42]
SIZES = (9, 7)  # rank 0 / rank 1 local batch: an uneven gather

# sampling at r = 0.1: 2 micro-steps of 4 rows per rank per window
SD, SR, MICRO, WINDOWS = 16, 0.1, 4, 3
LR, MOMENTUM, WD = 0.1, 0.9, 5e-4


class StraightThroughArc(CombinedMargin):
    """ArcFace whose margin gradient is passed straight through (insightface's no_grad)."""

    def target(self, cos: torch.Tensor) -> torch.Tensor:
        return cos + (super().target(cos) - cos).detach()


def margin(kind: str) -> CombinedMargin:
    """CosFace(64, 0.4), ArcFace(64, 0.5) or its straight-through twin."""
    return {"cos": CosFace(S, 0.4), "arc": ArcFace(S, 0.5),
            "st": StraightThroughArc(S, m2=0.5)}[kind]


def global_batch(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """16 embeddings: random, near their centre (cos ~ .95) and opposite it (ArcFace fallback)."""
    gen = torch.Generator().manual_seed(11)
    centres = init_rows(0, C, D, SEED, 0.01, dtype=torch.float64)
    y = torch.tensor(LABELS)
    e = torch.randn(len(LABELS), D, generator=gen, dtype=torch.float64)
    unit = F.normalize(centres[y], dim=1)
    e[4:8] = 20.0 * unit[4:8] + torch.randn(4, D, generator=gen, dtype=torch.float64)
    e[8:12] = -20.0 * unit[8:12] + torch.randn(4, D, generator=gen, dtype=torch.float64)
    return e.to(dtype), y


def window_batch(window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of one sampled window: 2 ranks x 2 micro-steps x 4 rows (fp64)."""
    gen = torch.Generator().manual_seed(100 + window)
    y = torch.randint(0, C, (4 * MICRO,), generator=gen)
    y[:4] = torch.tensor([500, 501, 0, 1000])
    return torch.randn(4 * MICRO, SD, generator=gen, dtype=torch.float64), y


def _local(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t[rank * 2 * MICRO: (rank + 1) * 2 * MICRO]


def exact_scenarios(rank: int) -> dict:
    """r = 1: loss and gradients for every (margin, dtype), and the no-clamp losses."""
    start = sum(SIZES[:rank])
    results = {}
    for kind, dtype in [("cos", torch.float64), ("arc", torch.float64), ("st", torch.float64),
                        ("cos", torch.float32), ("arc", torch.float32),
                        ("arc", torch.bfloat16)]:
        head = PartialFC(margin(kind), D, C, sample_rate=1.0, seed=SEED)
        if dtype == torch.float64:
            head = head.double()
        e, y = global_batch(dtype)
        e = e[start: start + SIZES[rank]].clone().requires_grad_(True)
        loss = head(e, y[start: start + SIZES[rank]])
        loss.backward()
        results[(kind, str(dtype))] = {"loss": loss.detach(), "e_grad": e.grad,
                                       "w_grad": head.weight.grad, "weight": head.weight.detach(),
                                       "class_start": head.class_start}
    results["no_clamp"] = _no_clamp_losses()
    return results


def _no_clamp_losses() -> dict[str, float]:
    """8 orthogonal centres over the 2 ranks; rows fit their class perfectly or another one."""
    got = {}
    for kind in ("cos", "arc"):
        head = PartialFC(margin(kind), 8, 8)
        with torch.no_grad():  # centre k = e_k: every cosine is exactly 0 or 1
            head.weight.copy_(torch.eye(8)[head.class_start: head.class_start + head.num_local])
        y = torch.tensor([0, 4, 7, 3])
        got[f"{kind}_fit"] = head(torch.eye(8)[y], y).item()
        got[f"{kind}_wrong"] = head(torch.eye(8)[(y + 1) % 8], y).item()
    return got


def _sampled_head(**kw) -> PartialFC:
    return PartialFC(ArcFace(S, 0.5), SD, C, sample_rate=SR, seed=5, **kw).double()


def accumulation(rank: int) -> dict:
    """One window: 2 micro-steps (head A) vs one big batch (head B), same sample."""
    e, y = (_local(t, rank) for t in window_batch(0))
    head_a, head_b = _sampled_head(), _sampled_head()
    e_a, e_b = e.clone().requires_grad_(True), e.clone().requires_grad_(True)
    n = head_a.begin_window(y)
    total = 0.0
    for k in range(2):
        rows = slice(k * MICRO, (k + 1) * MICRO)
        loss = head_a(e_a[rows], y[rows])
        loss.backward()
        total = total + loss.detach()
    head_b.begin_window(y)
    big = head_b(e_b, y)
    big.backward()
    return _missing_class_raises_everywhere(head_a) | {"n": n, "accum_loss": total, "big_loss": big.detach(), "e_accum": e_a.grad,
            "e_big": e_b.grad, "w_accum": head_a.shard_grad(), "w_big": head_b.shard_grad(),
            "sample_a": head_a.sampled_classes(), "sample_b": head_b.sampled_classes(),
            "weight": head_a.weight.detach().clone(), "class_start": head_a.class_start,
            "num_sample": head_a.num_sample}


def _missing_class_raises_everywhere(head: PartialFC) -> dict:
    """A class missing from rank 1's sample: both ranks raise (rank 0 is not left hanging)."""
    chosen = [None]
    if head.rank == 1:
        sampled = set(head.sampled_classes().tolist())
        chosen = [next(c for c in range(head.class_start, C) if c not in sampled)]
    dist.broadcast_object_list(chosen, src=1)
    try:
        head(torch.zeros(1, SD, dtype=torch.float64), torch.tensor(chosen))
    except ValueError as err:
        return {"missing_error": str(err)}
    return {"missing_error": None}


def _train_windows(head: PartialFC, opt, rank: int, windows: int) -> list[dict]:
    """Accumulated windows with a step each; what the shard and its state were around it."""
    log = []
    for w in range(windows):
        e, y = (_local(t, rank) for t in window_batch(w))
        head.begin_window(y)
        for k in range(2):
            rows = slice(k * MICRO, (k + 1) * MICRO)
            head(e[rows], y[rows]).backward()
        state = {k: v.clone() for k, v in opt.state.get(head.weight, {}).items()}
        index, grad = head.window_grad()
        before = {"weight": head.weight.detach().clone(), "state": state,
                  "index": index.clone(), "grad": grad.clone()}
        opt.step()
        opt.zero_grad()
        after = {k: v.clone() for k, v in opt.state[head.weight].items()}
        log.append(before | {"weight_after": head.weight.detach().clone(), "state_after": after})
    return log


def sampled_scenarios(rank: int) -> dict:
    """r = 0.1 accumulation, sparse vs dense SGD, sparse AdamW, states to reshard."""
    sgd = _sampled_head()
    sgd_opt = PartialFCSGD(sgd, lr=LR, momentum=MOMENTUM, weight_decay=WD)
    dense = _sampled_head(sparse_update=False)
    dense_opt = PartialFCSGD(dense, lr=LR, momentum=MOMENTUM, weight_decay=WD)
    adam = _sampled_head()
    adam_opt = PartialFCAdamW(adam, lr=1e-3, weight_decay=0.01)
    return {"accumulation": accumulation(rank),
            "sgd": _train_windows(sgd, sgd_opt, rank, WINDOWS), "sgd_state": sgd.state_dict(),
            "dense": _train_windows(dense, dense_opt, rank, WINDOWS),
            "adamw": _train_windows(adam, adam_opt, rank, 2), "adamw_state": adam.state_dict(),
            "continuation": continuation(rank)}


def continuation(rank: int) -> dict:
    """r = 1 with momentum: the state after window 0, the shard after window 1."""
    head = PartialFC(ArcFace(S, 0.5), SD, C, sample_rate=1.0, seed=5).double()
    opt = PartialFCSGD(head, lr=LR, momentum=MOMENTUM, weight_decay=WD)
    states = []
    for w in range(2):
        e, y = (_local(t, rank) for t in window_batch(w))
        head(e, y).backward()
        opt.step()
        opt.zero_grad()
        states.append(copy.deepcopy(head.state_dict()))  # it holds the live tensors
    return {"state0": states[0], "weight1": head.weight.detach().clone()}


def run_all(rank: int, world: int, out: str) -> None:
    """Every 2-rank scenario, saved to ``out/rank{rank}.pt``."""
    assert world == 2
    torch.save({"exact": exact_scenarios(rank), "sampled": sampled_scenarios(rank)},
               f"{out}/rank{rank}.pt")

