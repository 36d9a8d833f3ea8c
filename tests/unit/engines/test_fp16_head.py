"""fp16 with the Partial FC head: one grad scaler over backbone and head (DDP, 2 gloo ranks).

One 2-rank session trains, through ``build_run`` and the real trainer, the tiny face recipe
(``configs/face/synthetic_tiny.yaml``: AdamW, 20 steps) in fp32 and in fp16, a short fp16 run
with an inf written into ONE rank's head gradient, and two clipped SGD runs (fp32, fp16). Each
rank returns its head shard, the backbone, its records and what the wrapped ``engine.step``
saw.

The fp16 runs start at loss scale 2^12 (set through the engine's own state dict). From
torch's default 2^16 this model's first three steps overflow (the backbone's fp16 bias
gradients, sums over the batch) and are skipped, and from 2^13 the fourth: the fp16 run would
train on windows shifted against the fp32 run's. At 2^12 no step of the 20 overflows.

Bounds. fp16 keeps 11 significant bits: a rounding is off by at most u = 2^-11 = 4.9e-4
(relative). One step's gradient passes ~10 roundings (inputs, weights and outputs of two
convolutions and the embedding layer, their gradients, the cosines), partly cancelling: its
norm is off by ~u (measured 2.3e-4 at step 1, bound 2e-3 = 4u); over 20 steps the weights
drift apart and the gradients with them (measured <= 1.8e-3, bound 1e-2). The loss averages
120 rows: measured <= 1.7e-4 (final step 1.2e-4), bound 1e-3. The weights' change over the
20 steps differs by 0.58% (AdamW turns each gradient's rounding into lr-sized moves of small
entries), bound 3%. Clipped SGD's first gradient: 9.7e-4, bound 5e-3. Each bound is ~5x the
measured gap and >= 10^3 below what a wrong scale gives: head gradients left scaled make the
logged norm ~2^12 times too large and, under clipping, hand all of the clip to the head.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import pytest
import torch

from tests._launch import spawn
from tests.conftest import CONFIGS

TINY = CONFIGS / "face" / "synthetic_tiny.yaml"
START_SCALE = 2.0 ** 12  # see the module docstring
STEPS = 20
COMMON = [f"train.max_steps={STEPS}", "train.epochs=1", "face.eval_identities=10",
          "face.eval_pairs=40", "engine.name=ddp", "log.progress=false", "log.grad_norm=true",
          "checkpoint.resume=never"]
FP16 = ["train.precision=fp16"]
# Clipping: plain SGD (its step is proportional to the gradient, so a mis-scaled part shows
# in the update) with a clip well below the norms seen (25-140): every step is clipped.
CLIP_NORM = 5.0
CLIP = ["train.max_steps=3", "optim.name=sgd", "optim.lr=0.05", "optim.scale_rule=none",
        "schedule.name=constant", "schedule.warmup_steps=0", f"optim.grad_clip={CLIP_NORM}"]
INJECT_AT, INJECT_RANK = 3, 1  # the engine step (1-based) whose head gradient gets an inf
RUNS: dict[str, tuple[list[str], dict[str, Any]]] = {
    "fp32": (COMMON, {}),
    "fp16": (COMMON + FP16, {"scale": START_SCALE}),
    "inject": (COMMON + FP16 + ["train.max_steps=5"], {"scale": START_SCALE,
                                                        "inject": INJECT_AT}),
    "clip32": (COMMON + CLIP, {"capture": True}),
    "clip16": (COMMON + FP16 + CLIP, {"scale": START_SCALE, "capture": True}),
}


# ---- the ranks -------------------------------------------------------------------------------
def _snapshot(run: Any) -> dict[str, Any]:
    """Everything a skipped step must leave alone, copied."""
    engine = run.engine
    head = engine.sharded.modules[0]
    opt_state = engine.optimizer.state_dict()["state"]
    return {"model": {k: v.clone() for k, v in engine.unwrapped().state_dict().items()},
            "head": head.weight.detach().clone(),
            "opt": {i: {k: v.clone() for k, v in s.items()} for i, s in opt_state.items()},
            "head_opt": {k: v.clone() for k, v in head.optimizer.row_state()["rows"].items()},
            "scale": engine.loss_scale(), "sched_steps": run.trainer.schedule.step_count}


def _capture_clipped(engine: Any, box: list) -> None:
    """Save the first applied step's gradients as the optimizers see them: unscaled and
    clipped (the backbone's ``optimizer.step`` runs before the head's)."""
    real = engine.optimizer.step
    head = engine.sharded.modules[0]

    def step(*args: Any, **kwargs: Any) -> Any:
        if not box:
            grads = [p.grad.flatten() for p in engine.parameters() if p.grad is not None]
            box.append({"backbone": torch.cat(grads).double(),
                        "head": head.shard_grad().flatten().double()})
        return real(*args, **kwargs)

    engine.optimizer.step = step


def _watch(run: Any, rank: int, opts: dict[str, Any]) -> list[dict[str, Any]]:
    """Wrap ``engine.step``: per call, the scale and schedule count around it and whether it
    applied; at the first call and around ``opts['inject']`` full snapshots, and the inf written
    into one rank's head gradient just before that call (after the window's backward)."""
    engine, calls = run.engine, []
    real = engine.step
    inject = opts.get("inject")

    def step(compute_norm: bool = False) -> tuple[Optional[float], bool]:
        k = len(calls) + 1
        full = k == 1 or (inject is not None and k in (inject, inject + 1))
        if k == inject and rank == INJECT_RANK:
            _, grad = engine.sharded.modules[0].window_grad()
            grad.view(-1)[0] = math.inf
        before = _snapshot(run) if full else {"scale": engine.loss_scale(),
                                              "sched_steps": run.trainer.schedule.step_count}
        norm, applied = real(compute_norm)
        after = _snapshot(run) if full else {"scale": engine.loss_scale()}
        calls.append({"before": before, "after": after, "applied": applied, "norm": norm})
        return norm, applied

    engine.step = step
    return calls


def _start_scale(engine: Any, scale: float) -> None:
    """Start the grad scaler at ``scale`` through the engine's own state round trip."""
    state = engine.state_dict()
    state["scaler"]["scale"] = scale
    engine.load_state_dict(state, engine.rank_state_dict())


def _session(rank: int, world: int, out: str) -> dict[str, dict[str, Any]]:
    """Train every run of ``RUNS`` on this rank; what each test needs of it."""
    from largebatch.config import load_config
    from largebatch.dist import DistEnv
    from largebatch.io import read_jsonl
    from largebatch.train.build import build_run

    denv = DistEnv("torchrun", rank=rank, world_size=world, local_rank=rank)
    results = {}
    for name, (extra, opts) in RUNS.items():
        where = Path(out) / name
        run = build_run(load_config(TINY, extra + [f"log.out_dir={where}"]), denv, quiet=True)
        if "scale" in opts:
            _start_scale(run.engine, opts["scale"])
        calls, clipped = _watch(run, rank, opts), []
        if opts.get("capture"):
            _capture_clipped(run.engine, clipped)
        summary = run.trainer.fit()
        run.logger.close(summary)
        head = run.engine.sharded.modules[0]
        results[name] = {"model": run.engine.state_dict()["model"],
                         "head": head.weight.detach().clone(), "class_start": head.class_start,
                         "records": read_jsonl(where / "metrics.jsonl"), "calls": calls,
                         "clipped": clipped[0] if clipped else None}
    return results


# ---- the tests -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, dict[str, Any]]]:
    """Each rank's results of every run."""
    return spawn(_session, 2, str(tmp_path_factory.mktemp("fp16_head")), timeout=240)


def _weights(ranks: list, name: str, at: str = "end") -> torch.Tensor:
    """Backbone and the whole head (shards in class order), flattened, float64; ``at``
    'start': before the first step."""
    parts = sorted((r[name] for r in ranks), key=lambda p: p["class_start"])
    first = [p["calls"][0]["before"] for p in parts]
    model = first[0]["model"] if at == "start" else parts[0]["model"]
    heads = [f["head"] for f in first] if at == "start" else [p["head"] for p in parts]
    return torch.cat([*(model[k].flatten() for k in sorted(model)),
                      *(h.flatten() for h in heads)]).double()


def _train(ranks: list, name: str) -> list[dict]:
    return [r for r in ranks[0][name]["records"] if r["kind"] == "train"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_fp16_run_tracks_fp32(ranks):
    """20 AdamW steps of the recipe: the fp16 run's losses, gradient norms and weights
    follow the fp32 run's within fp16's rounding (measured gaps in the module docstring)."""
    fp32, fp16 = _train(ranks, "fp32"), _train(ranks, "fp16")
    skips = [r for r in ranks[0]["fp16"]["records"] if r["kind"] == "skip"]
    assert not skips and len(fp16) == len(fp32) == STEPS  # the same 20 windows
    for a, b in zip(fp32, fp16):
        assert abs(b["loss"] - a["loss"]) <= 1e-3 * a["loss"], (a["step"], a["loss"], b["loss"])
        bound = 2e-3 if a["step"] == 1 else 1e-2  # one gradient's rounding; then + drift
        assert abs(b["grad_norm"] - a["grad_norm"]) <= bound * a["grad_norm"], (a, b)
    start = _weights(ranks, "fp32", "start")
    assert torch.equal(start, _weights(ranks, "fp16", "start"))
    moved32, moved16 = _weights(ranks, "fp32") - start, _weights(ranks, "fp16") - start
    assert _rel(moved16, moved32) <= 3e-2


def _unchanged(before: dict, after: dict) -> list[str]:
    """Names of the parts a step changed (a snapshot's tensors, compared bit for bit)."""
    changed = [k for k in before["model"] if not torch.equal(before["model"][k],
                                                              after["model"][k])]
    changed += [f"opt{i}.{k}" for i, s in before["opt"].items() for k in s
                if not torch.equal(s[k], after["opt"][i][k])]
    changed += [f"head_opt.{k}" for k, v in before["head_opt"].items()
                if not torch.equal(v, after["head_opt"][k])]
    return changed + (["head"] if not torch.equal(before["head"], after["head"]) else [])


def test_overflow_on_one_rank_skips_both(ranks):
    """An inf in rank 1's head gradient only: both ranks skip that step entirely (backbone,
    both head shards, both optimizers' states, the schedule), the scale halves exactly once,
    and the next step applies."""
    for rank, res in enumerate(ranks):
        calls = res["inject"]["calls"]
        assert [c["applied"] for c in calls] == [True, True, False, True, True, True], rank
        hit, nxt = calls[INJECT_AT - 1], calls[INJECT_AT]
        assert _unchanged(hit["before"], hit["after"]) == [], rank
        assert (hit["before"]["scale"], hit["after"]["scale"]) == (START_SCALE, START_SCALE / 2)
        assert nxt["before"]["sched_steps"] == hit["before"]["sched_steps"]  # not stepped
        # the next step applies at the halved scale and moves every part
        assert nxt["applied"] and nxt["after"]["scale"] == START_SCALE / 2, rank
        assert {"head", "embed.weight", "head_opt.exp_avg"} <= set(
            _unchanged(nxt["before"], nxt["after"])), rank
        assert calls[INJECT_AT + 1]["before"]["sched_steps"] == hit["before"]["sched_steps"] + 1
        skips = [r for r in res["inject"]["records"] if r["kind"] == "skip"]
        assert [(s["step"], s["reason"]) for s in skips] == [(INJECT_AT - 1, "fp16_overflow")]


def test_clip_fp16_matches_fp32(ranks):
    """Clipped SGD: the global norm (backbone + both shards) before the clip, and the clipped
    gradient itself, equal the fp32 run's within fp16 rounding; the clipped norm is the clip."""
    n32, n16 = _train(ranks, "clip32")[0]["grad_norm"], _train(ranks, "clip16")[0]["grad_norm"]
    assert n32 > 4 * CLIP_NORM  # clipping really acts
    assert abs(n16 - n32) <= 2e-3 * n32
    grads = {}
    for name in ("clip32", "clip16"):
        backbone = ranks[0][name]["clipped"]["backbone"]
        assert torch.equal(backbone, ranks[1][name]["clipped"]["backbone"])  # DDP: replicated
        grads[name] = torch.cat([backbone, *(r[name]["clipped"]["head"] for r in ranks)])
        assert abs(float(grads[name].norm()) - CLIP_NORM) <= 1e-6 * CLIP_NORM, name
    assert _rel(grads["clip16"], grads["clip32"]) <= 5e-3


# ---- one process ------------------------------------------------------------------------------
def test_head_reduces_in_fp32_under_fp16_autocast():
    """CPU fp16 autocast: the head's loss is fp32, its fp32 centres get an fp32 gradient
    within fp16 rounding of the fp32 head's (measured: loss 1.9e-5, gradient 7.0e-4), and at
    loss scale 2^13 that gradient is finite (normalising the centres in fp16, as CPU autocast
    would, gives inf there: its backward divides the scaled gradient by each centre's norm,
    0.01 sqrt(16) = 0.04, which gives entries up to 7.8e4, past fp16's 65504)."""
    from largebatch.face import PartialFC
    from largebatch.face.margins import CombinedMargin

    gen = torch.Generator().manual_seed(0)
    e = torch.randn(64, 16, generator=gen)
    y = torch.randint(0, 50, (64,), generator=gen)
    heads = [PartialFC(CombinedMargin(s=16.0, m3=0.2), 16, 50, seed=3) for _ in range(2)]
    loss32 = heads[0](e, y)
    loss32.backward()
    with torch.autocast("cpu", dtype=torch.float16):
        loss16 = heads[1](e.half(), y)
    (loss16 * 2.0 ** 13).backward()
    g32, g16 = heads[0].weight.grad, heads[1].weight.grad / 2.0 ** 13
    assert loss16.dtype == torch.float32 and g16.dtype == torch.float32
    assert bool(torch.isfinite(g16).all())
    assert abs(loss16.item() - loss32.item()) <= 1e-3 * loss32.item()
    assert _rel(g16, g32) <= 1e-2


def test_deepspeed_head_follows_its_loss_scale_and_skips():
    """DeepSpeed's step with a head (fp16 needs CUDA there, so its pieces are stand-ins): the
    head's gradient is unscaled by DeepSpeed's current scale before its own step, it is not
    stepped when DeepSpeed skips, and an inf in it drops the window and lowers the scale once.
    The real thing runs in tests/cuda/test_cuda.py."""
    from largebatch.dist import DistEnv
    from largebatch.engines.deepspeed.engine import DeepSpeedEngine
    from largebatch.engines.sharded import ShardedParts
    from largebatch.face import PartialFC, PartialFCSGD
    from largebatch.face.margins import CombinedMargin

    class _DS:  # DeepSpeed's engine and its fp16 optimizer, as the step uses them
        loss_scale, applied, lowered = 1024.0, True, 0

        def set_gradient_accumulation_boundary(self, flag: bool) -> None: ...
        def step(self) -> None: ...
        def was_step_applied(self) -> bool: return self.applied
        def get_global_grad_norm(self) -> float: return 3.0

        def _update_scale(self, overflow: bool) -> None:
            self.lowered += 1
            self.loss_scale /= 2

    engine = DeepSpeedEngine.__new__(DeepSpeedEngine)
    ds, dropped = _DS(), []
    engine.denv, engine.device, engine.precision, engine.grad_clip = (
        DistEnv("none"), torch.device("cpu"), "fp16", 0.0)
    engine.model = engine.optimizer = ds
    engine.zero_stage, engine.sharded = 1, ShardedParts()
    engine.zero_grad = lambda: (dropped.append(1), engine.sharded.drop_window())
    head = PartialFC(CombinedMargin(s=16.0, m3=0.2), 8, 10, seed=0)
    engine.sharded.add(head, PartialFCSGD(head, lr=1.0, momentum=0.0))

    def window(inf: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        before = head.weight.detach().clone()
        (head(torch.randn(6, 8), torch.arange(6)) * ds.loss_scale).backward()
        grad = head.weight.grad.clone() / ds.loss_scale
        if inf:
            head.weight.grad[0, 0] = math.inf
        return before, grad

    before, grad = window()
    norm, applied = engine.step(compute_norm=True)
    assert applied and torch.allclose(head.weight.detach(), before - grad, rtol=0, atol=1e-6)
    assert norm == pytest.approx(math.sqrt(9.0 + float(grad.square().sum())))
    ds.applied = False  # DeepSpeed's own overflow: the head stays
    before, _ = window()
    assert engine.step() == (None, False) and torch.equal(head.weight.detach(), before)
    ds.applied = True  # the head's overflow: the window dropped, the scale lowered once
    before, _ = window(inf=True)
    assert engine.step() == (None, False) and torch.equal(head.weight.detach(), before)
    assert (dropped, ds.lowered, ds.loss_scale) == ([1], 1, 512.0)
    assert head.weight.grad is None
