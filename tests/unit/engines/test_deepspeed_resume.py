"""DeepSpeed ZeRO 1/2/3 checkpoints: exact resume at the same world size, and
``train.nonfinite=skip|stop`` under DeepSpeed, on 2 real gloo ranks with DeepSpeed running.

One 2-rank session (DeepSpeed imported once) trains every case in-process through
``largebatch.train.build``: for each (stage, optimizer, precision) an uninterrupted 6-step run, and a
run stopped at step 3 (``train.max_steps=3``, a set every 3 steps) then resumed to step 6 in
the same checkpoint directory (``checkpoint.resume=auto``, as a requeue does). The reference
for "exact" is the uninterrupted run, read through DeepSpeed's own public API
(``safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state``), independent of the code
that writes and restores the checkpoint: final module weights, fp32 master weights and every
optimizer-state tensor must be bit-identical (``torch.equal``), which at the same world size
they can be (the same partitions, buckets and reduction order on both sides).
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch

from largebatch.checkpoint import list_sets, load_checkpoint
from tests._launch import spawn
from tests.conftest import CONFIGS

MLP = CONFIGS / "mnist" / "mlp.yaml"
# 10 windows an epoch (960 samples, global 96 = micro 24 x accum 2 x 2 ranks); warmup makes
# the schedule write a new LR every step, so a lost param-group LR shows in the weights.
BASE = ["data.subset=960", "data.test_subset=200", "batch.global_size=96",
        "batch.micro_size=24", "schedule.warmup_steps=4", "log.progress=false",
        "engine.name=deepspeed", "checkpoint.every_steps=3"]
SGD = ["optim.name=sgd", "optim.momentum=0.9"]
ADAMW = ["optim.name=adamw", "optim.momentum=0", "optim.lr=0.002", "optim.weight_decay=0.01"]
# name -> (stage, overrides): momentum SGD at ZeRO 1, AdamW (moments + step counter) at ZeRO
# 2, and AdamW in bf16 (fp32 masters distinct from the bf16 module weights) at ZeRO 3; the
# skip cases below run momentum SGD at ZeRO 2 and 3.
RESUME_CASES = {"z1_sgd": (1, SGD), "z2_adamw": (2, ADAMW),
                "z3_adamw_bf16": (3, ADAMW + ["train.precision=bf16"])}
# DeepSpeed vs DDP after 6 steps: the same gradients summed in other buckets and orders
# differ in the last bits (measured 0 to 3e-8 in tests/unit/engines/test_deepspeed.py).
ATOL = 1e-6
BAD_WINDOW = 4  # the non-finite window (1-based); optimizer state exists by then
DS_LEAKS = "DeepSpeed ZeRO 3 keeps its engine and the process groups alive in-process"


# ---- inside the ranks ---------------------------------------------------------------------
def _cfg(root: str, out: Path, stage: int | None, extra: list[str]):
    """The case's config; ``stage`` None: the DDP engine (the reference of the skip cases)."""
    from largebatch.config import load_config
    engine = ["engine.name=ddp"] if stage is None else [f"engine.zero_stage={stage}"]
    return load_config(MLP, [f"data.root={root}", "data.download=false", f"log.out_dir={out}",
                             *BASE, *engine, *extra])


def _full_state(engine) -> dict:
    """What the run's continuation depends on, read independently of the checkpoint code:
    every parameter's fp32 master gathered by DeepSpeed's public ``safe_get_full_fp32_param``
    (a collective: every rank calls it), and this rank's optimizer state as the client
    optimizer holds it (momentum / Adam moments of its partitions, Adam's step), plus the LR
    of each param group. (``safe_get_full_optimizer_state`` cannot serve: with two param
    groups, ZeRO 1/2 link its views after the first group's first step, before the second
    group has any state, and then raise for the second group's parameters.)"""
    from deepspeed.utils import safe_get_full_fp32_param
    out = {}
    for name, p in engine.unwrapped().named_parameters():
        out[f"master.{name}"] = safe_get_full_fp32_param(p).detach().cpu().clone()
    client = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for i, state in enumerate(client.state.values()):
        for k, v in state.items():
            out[f"state{i}.{k}"] = v.detach().cpu().clone() if torch.is_tensor(v) else v
    out["steps"] = [float(s["step"]) for s in client.state.values() if "step" in s]
    out["lr"] = [g["lr"] for g in client.param_groups]
    return out


def _train(root: str, out: Path, stage: int, extra: list[str], poison=None):
    from largebatch.train.build import build_run, finish_run
    run = build_run(_cfg(root, out, stage, extra), quiet=True)
    if poison is not None:
        poison(run)
    summary = finish_run(run, run.trainer.fit(), quiet=True)
    loaded = run.trainer.checkpointer.loaded
    return run, summary, (None if loaded is None else loaded.step)


def _resume_cases(root: str, out: Path) -> dict:
    results = {}
    for name, (stage, extra) in RESUME_CASES.items():
        straight, _, _ = _train(root, out / name / "straight", stage, extra + ["train.max_steps=6"])
        ref = _full_state(straight.engine)
        cut = out / name / "cut"
        _, first, _ = _train(root, cut, stage, extra + ["train.max_steps=3"])
        resumed, summary, from_step = _train(root, cut, stage, extra + ["train.max_steps=6"])
        results[name] = {"ref": ref, "got": _full_state(resumed.engine), "from": from_step,
                         "steps": (first["steps"], summary["steps"])}
    return results


class _NanGrad(torch.autograd.Function):
    """Identity forward; a NaN gradient flows back (a finite loss with non-finite grads)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


def _poison(how: str, only_rank: int | None):
    """Make the task's loss non-finite in window BAD_WINDOW: 'loss' (NaN value, finite
    gradient) or 'grad' (finite value, NaN gradient); on ``only_rank`` or on every rank."""
    def apply(run) -> None:
        task, windows = run.trainer.task, [0]
        real_loss, real_begin = task.loss, task.begin_window

        def begin(labels):
            windows[0] += 1
            return real_begin(labels)

        def loss(model, x, y):
            out = real_loss(model, x, y)
            if windows[0] != BAD_WINDOW or only_rank not in (None, run.denv.rank):
                return out
            return out + out.detach() * float("nan") if how == "loss" else _NanGrad.apply(out)
        task.loss, task.begin_window = loss, begin
    return apply


def _recording(run) -> list:
    """Wrap train_step: the DeepSpeed state (full, public API) and counters around each window."""
    trainer, snaps = run.trainer, []
    real = trainer.train_step

    def snap():
        return {"ds": _full_state(run.engine), "step": trainer.state.step,
                "sched": trainer.schedule.state_dict(), "lr": trainer.schedule.lr,
                "counters": run.engine.counters()}

    def step(*a, **kw):
        before = snap()
        result = real(*a, **kw)
        snaps.append({"before": before, "after": snap(), "applied": result[2]})
        return result
    trainer.train_step = step
    return snaps


def _recorded(how: str, only_rank: int | None):
    def setup(run) -> None:
        _poison(how, only_rank)(run)
        run.trainer.snaps = _recording(run)
    return setup


def _nonfinite_cases(root: str, out: Path) -> dict:
    """skip: NaN gradients on both ranks at ZeRO 2, a NaN loss on rank 1 only (finite
    gradients: DeepSpeed itself sees nothing) at ZeRO 3; stop: NaN gradients at ZeRO 1."""
    results = {}
    for name, stage, how, only in (("z2_grad", 2, "grad", None), ("z3_loss_rank1", 3, "loss", 1)):
        run, summary, _ = _train(root, out / name, stage,
                                 SGD + ["train.nonfinite=skip", "train.max_steps=6"],
                                 _recorded(how, only))
        # the same poisoned run on DDP, whose skip (zeroing .grad) test_faults checks
        ddp, _, _ = _train(root, out / f"{name}_ddp", None,
                           SGD + ["train.nonfinite=skip", "train.max_steps=6"], _poison(how, only))
        results[name] = {"snaps": run.trainer.snaps, "summary": summary,
                         "ddp": {k: v.detach().clone()
                                 for k, v in ddp.engine.unwrapped().state_dict().items()},
                         "ours": run.engine.model_state_dict()}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # the one line rank 0 prints
        run, summary, _ = _train(root, out / "z1_stop", 1, SGD + ["train.max_steps=6"],
                                 _recorded("grad", None))
    results["z1_stop"] = {"snaps": run.trainer.snaps, "summary": summary,
                          "printed": printed.getvalue()}
    return results


def _session(rank: int, world: int, root: str, out: str) -> dict:
    out_dir = Path(out)
    return {"resume": _resume_cases(root, out_dir),
            "nonfinite": _nonfinite_cases(root, out_dir)}


@pytest.fixture(scope="module")
def session(tmp_path_factory, mnist_root):
    """Run the 2-rank session once; returns (output folder, each rank's results)."""
    out = tmp_path_factory.mktemp("ds_resume")
    results = spawn(_session, 2, str(mnist_root), str(out), timeout=400,
                    env={"TORCH_EXTENSIONS_DIR": str(out / "ext")}, leaks=DS_LEAKS)
    return out, results


def _assert_equal_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), f"{k} differs by {(a[k] - b[k]).abs().max().item()}"
        else:
            assert a[k] == b[k], k


# ---- resume -------------------------------------------------------------------------------
@pytest.mark.parametrize("case", RESUME_CASES)
def test_resume_is_bit_identical_to_the_uninterrupted_run(session, case):
    out, results = session
    for rank in range(2):
        got = results[rank]["resume"][case]
        assert got["from"] == 3 and got["steps"] == (3, 6)
        # fp32 masters, momentum / Adam moments and step counts, group LRs: all bit-identical
        _assert_equal_states(got["ref"], got["got"])
        assert len(got["ref"]) > 4  # masters and per-element optimizer state were compared
    if "adamw" in case:
        assert results[0]["resume"][case]["got"]["steps"] == [6.0, 6.0]
    weights = {name: load_checkpoint(out / case / name / "model.pt")["model"]
               for name in ("straight", "cut")}
    _assert_equal_states(weights["straight"], weights["cut"])


@pytest.mark.parametrize("case", RESUME_CASES)
def test_checkpoint_files_are_weights_only_and_partitioned(session, case):
    out, _ = session
    stage = RESUME_CASES[case][0]
    sets = list_sets(out / case / "cut" / "checkpoints")
    assert [s.step for s in sets] == [3, 6]
    trainer = load_checkpoint(sets[0].path / "trainer.pt")  # torch.load(weights_only=True)
    full = sum(v.numel() for v in trainer["engine"]["model"].values())
    assert trainer["engine"]["optimizer"] is None  # DeepSpeed's state lives per rank
    ranks = [torch.load(sets[0].path / f"rank-{r:05d}.pt", weights_only=True)["engine"]
             ["deepspeed"] for r in range(2)]
    for r, local in enumerate(ranks):
        assert (local["zero_stage"], local["rank"], local["world_size"]) == (stage, r, 2)
        held = sum(t.numel() for t in local["masters"])
        # each rank holds its partition: about half the model (+ alignment padding)
        assert full / 2 <= held <= full / 2 + 64, (held, full)
        assert all(s for s in local["state"])  # optimizer state after 3 steps


# ---- non-finite ---------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["z2_grad", "z3_loss_rank1"])
def test_nonfinite_skip_drops_the_step_on_every_rank(session, case):
    _, results = session
    finals = []
    for rank in range(2):
        got = results[rank]["nonfinite"][case]
        snaps = got["snaps"]
        # 7 windows for 6 steps: the 4th is dropped on both ranks alike
        assert [s["applied"] for s in snaps] == [True] * 3 + [False] + [True] * 3
        bad = snaps[BAD_WINDOW - 1]
        _assert_equal_states(bad["before"]["ds"], bad["after"]["ds"])  # masters + state + LR
        for k in ("step", "sched", "lr", "counters"):
            assert bad["before"][k] == bad["after"][k], k
        # the next window trains again (masters move) and everything stays finite
        nxt = snaps[BAD_WINDOW]
        assert not torch.equal(nxt["before"]["ds"]["master.net.1.weight"],
                               nxt["after"]["ds"]["master.net.1.weight"])
        assert all(torch.isfinite(v).all() for v in snaps[-1]["after"]["ds"].values()
                   if torch.is_tensor(v))
        assert (got["summary"]["steps"], got["summary"]["skipped_steps"]) == (6, 1)
        finals.append({k: v for k, v in snaps[-1]["after"]["ds"].items()
                       if k.startswith("master.")})  # (the optimizer state is per partition)
    _assert_equal_states(finals[0], finals[1])  # the ranks never drifted apart
    # The window after the skip starts from clean gradients: the final weights equal the
    # same poisoned run on DDP within ATOL (a gradient left over from the dropped window,
    # or a momentum decayed by it, moves them by ~1e-3: one update of lr x grad).
    got = results[0]["nonfinite"][case]
    diff = max(float((got["ours"][k] - got["ddp"][k]).abs().max()) for k in got["ddp"])
    assert diff <= ATOL, f"max |DeepSpeed - DDP| after the skip = {diff:.3g}"


def test_nonfinite_stop_names_the_step_and_checkpoints_the_last_good_state(session):
    out, results = session
    got = results[0]["nonfinite"]["z1_stop"]
    lines = [l for l in got["printed"].splitlines() if "non-finite" in l]
    assert lines == ["largebatch: non-finite loss or gradients at step 4 (loss nan); stopped "
                     "with the last good state, step 3"], lines
    assert results[1]["nonfinite"]["z1_stop"]["printed"].count("non-finite") == 0  # rank 0 only
    assert got["summary"]["stop_reason"] == "diverged" and got["summary"]["steps"] == 3
    snaps = got["snaps"]
    assert [s["applied"] for s in snaps] == [True] * 3 + [False]
    good = snaps[-1]["before"]["ds"]  # after step 3
    _assert_equal_states(good, snaps[-1]["after"]["ds"])
    sets = list_sets(out / "z1_stop" / "checkpoints")
    assert [s.step for s in sets] == [3]
    saved = load_checkpoint(sets[0].path / "trainer.pt")["engine"]["model"]
    for name, w in saved.items():
        assert torch.equal(w, good[f"master.{name}"]), name  # fp32: module == masters


def test_another_world_size_is_refused_in_one_line():
    # The flat partitions are cut per world size: a set of 3 ranks cannot load on 1 at ZeRO 2.
    from largebatch.config import ConfigError, load_config
    from largebatch.dist import DistEnv
    from largebatch.engines.deepspeed.engine import DeepSpeedEngine
    from largebatch.train.build import plan_for
    cfg = load_config(MLP, ["engine.name=deepspeed", "engine.zero_stage=2"])
    engine = DeepSpeedEngine(DistEnv("none"), torch.device("cpu"), cfg=cfg, plan=plan_for(cfg, 1))
    with pytest.raises(ConfigError, match=r"^checkpoint: a DeepSpeed ZeRO 2 / fp32 checkpoint of "
                                          r"world size 3 cannot resume at world size 1 .*"
                                          r"relaunch on 3 ranks$"):
        engine.load_resharded({"model": {}}, [{}, {}, {}])
