"""batch.adapt=goodput: the choice against closed forms, and in real runs (1 process, 2 gloo ranks).

Real step times on this shared machine are noise, so the runs replace the two timing sources
(the forward+backward profile and each step's seconds) by a known time model:
``T(m, a) = a * tau(m) + GAMMA`` with ``tau(m) = ALPHA + BETA * m``. Everything else is real:
the live noise scale from the real gradients, the plan changes, the loader, the LR, resume.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

import largebatch.policies.goodput as goodput
from largebatch import plot
from largebatch.config import ConfigError, load_config
from largebatch.plan import BatchPlan
from largebatch.policies.goodput import GoodputAdapter, efficiency, fit_line
from tests._launch import spawn
from tests.conftest import CONFIGS, cli, run_many

ALPHA, BETA, GAMMA = 0.002, 2e-5, 0.05
SUBSET, MICRO, MAX_MICRO, LR = 3000, 30, 240, 0.05


def true_seconds(m: int, a: int, slow: float = 1.0) -> float:
    return slow * (a * (ALPHA + BETA * m) + GAMMA)


# ---- the model against closed forms -------------------------------------------------------------
def test_efficiency_is_the_empirical_models_sample_ratio() -> None:
    # E(B) = E_min (1 + B / B_noise): samples at the initial batch over samples at batch B.
    noise, m0 = 400.0, 60
    for b in (60, 120, 600, 6000):
        assert efficiency(b, noise, m0) == pytest.approx((1 + m0 / noise) / (1 + b / noise))
    assert efficiency(m0, noise, m0) == 1.0


def test_fit_line_recovers_an_exact_line_and_falls_back_with_one_x() -> None:
    assert fit_line([1.0, 2.0, 5.0], [3.5, 5.5, 11.5]) == pytest.approx((1.5, 2.0))
    assert fit_line([2.0, 2.0], [5.0, 7.0]) == (0.0, 3.0)


def _plan(micro: int, accum: int, world: int, max_global: int = 10 ** 6) -> BatchPlan:
    g = micro * accum * world
    return BatchPlan(global_size=g, micro_size=micro, accum_steps=accum, world_size=world,
                     dataset_size=10 ** 7, drop_last=False, base_lr=0.1, scale_rule="linear",
                     base_batch=g, peak_lr=0.1, warmup_steps=0, max_global_size=max_global)


@pytest.mark.parametrize("noise", [50.0, 800.0, 20000.0])
def test_best_accumulation_is_the_closed_form_optimum(noise: float) -> None:
    # Micro fixed: goodput(a) ~ a / ((p a + gamma)(B + q a)), p = c tau, q = m W; its maximum
    # over real a is at a* = sqrt(gamma B / (p q)) (derivative: gamma B - p q a^2 = 0).
    micro, world, gamma = 32, 4, 0.3
    adapter = GoodputAdapter(_plan(micro, 1, world), 10, None, can_change_micro=False)
    adapter.profile = {micro: 0.01 + 0.001 * micro}
    p, q = adapter.tau_of(micro), micro * world
    a_star = math.sqrt(gamma * noise / (p * q))
    m, a, _ = adapter.best(_plan(micro, 1, world), noise, 1.0, gamma, [micro])
    assert m == micro and a in (max(1, math.floor(a_star)), math.ceil(a_star))
    # ... and it is the better of the two integers around a*.
    around = [k for k in {max(1, math.floor(a_star)), math.ceil(a_star)}]
    value = {k: adapter.goodput(_plan(micro, 1, world), micro, k, noise, 1.0, gamma)
             for k in around}
    assert a == max(value, key=value.get)


def test_no_overhead_and_a_fixed_micro_keep_the_smallest_batch() -> None:
    # gamma = 0: throughput does not depend on the accumulation, efficiency falls with it.
    adapter = GoodputAdapter(_plan(16, 2, 1), 10, None, can_change_micro=False)
    adapter.profile = {16: 0.016}
    assert adapter.best(_plan(16, 2, 1), 100.0, 1.0, 0.0, [16])[:2] == (16, 2)


# ---- real runs with a known time model -----------------------------------------------------------
def _config(root: str, out: str, *extra: str):
    return load_config(CONFIGS / "mnist" / "mlp.yaml", [
        f"data.root={root}", "data.download=false", f"data.subset={SUBSET}",
        "data.test_subset=500", "data.loader=memory", "batch.global_size=60",
        f"batch.micro_size={MICRO}", "batch.adapt=goodput", "batch.adapt_every_steps=10",
        f"batch.adapt_max_micro={MAX_MICRO}", "batch.max_global_size=960",
        f"optim.lr={LR}", "optim.momentum=0.5", "optim.scale_rule=linear",
        "train.epochs=3", "train.device=cpu", f"log.out_dir={out}", "log.progress=false",
        "log.every_steps=1", *extra])


def _fake_timing(monkeypatch: Any, run: Any, slow: float = 1.0, stop_at: int = 0) -> None:
    monkeypatch.setattr(goodput, "time_forward_backward",
                        lambda model, loss, x, y, sizes, autocast: [
                            slow * (ALPHA + BETA * m) for m in sizes])
    adapter, trainer = run.policies.policies[-1].adapter, run.trainer
    real = adapter.observe

    def observe(micro: int, n_micro: int, seconds: float, raw: Any = None) -> None:
        real(micro, n_micro, true_seconds(micro, n_micro, slow), raw)
        if stop_at and trainer.state.step == stop_at - 1:  # (agreed in the next step)
            trainer.request_stop()  # as SIGUSR1 would: checkpoint this step, stop
    adapter.observe = observe


def _untimed(changes: list[dict]) -> list[dict]:
    """The changes without their wall-clock field (each rank and run has its own)."""
    return [{k: v for k, v in c.items() if k != "time_s"} for c in changes]


def _train(cfg: Any, monkeypatch: Any, stop_at: int = 0) -> tuple[dict, dict]:
    from largebatch.train.build import build_run, finish_run
    run = build_run(cfg, quiet=True)
    _fake_timing(monkeypatch, run, stop_at=stop_at)
    summary = finish_run(run, run.trainer.fit(), quiet=True)
    weights = {k: v.clone() for k, v in run.engine.unwrapped().state_dict().items()}
    return summary, weights


def _brute_force(noise: float, world: int, min_accum: int) -> tuple[int, int]:
    """The argmax of goodput under the true time model over every candidate."""
    micros = [30, 60, 120, MAX_MICRO]
    best, arg = -1.0, None
    for m in micros:
        for a in range(min_accum, 960 // (m * world) + 1):
            b = m * a * world
            g = b / true_seconds(m, a) * (noise + 60) / (noise + b)
            if g > best:
                best, arg = g, (m, a)
    return arg


def test_adapts_micro_and_accumulation_to_the_goodput_optimum(mnist_root: Path, tmp_path: Path,
                                                               monkeypatch: Any) -> None:
    out = tmp_path / "run"
    summary, _ = _train(_config(str(mnist_root), str(out)), monkeypatch)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    changes = summary["plan_changes"]
    assert changes and changes == [r for r in records if r["kind"] == "plan_change"]
    assert {c["action"] for c in changes} == {"adapt"}
    micro_before, moved_mid_epoch = MICRO, False
    assert [c for c in changes if c["reason"] == "decision"]
    for i, c in enumerate(changes):
        assert c["global_size"] == c["micro_size"] * c["accum_steps"] <= 960
        assert c["accum_steps"] >= 2  # one process: the noise scale's small batches
        assert c["lr"] == pytest.approx(LR * c["global_size"] / 60, rel=1e-12)  # linear rule
        position = c["samples"] % SUBSET  # this (only) rank's samples into the epoch
        assert position % c["micro_size"] == 0, c  # the rest of the epoch in whole micro-batches
        moved_mid_epoch |= position > 0 and c["micro_size"] != micro_before
        if c["reason"] == "pending_micro":  # the micro size of the decision one step before
            prev = changes[i - 1]
            assert prev["reason"] == "decision" and c["step"] == prev["step"] + 1, (prev, c)
            assert c["global_size"] == prev["global_size"] and c["micro_size"] != micro_before
        else:
            assert c["predicted_gain"] >= 1.05 and c["noise_scale"] > 0
        if c["reason"] == "decision" and i:  # two accumulations known: the fit is exact
            micro, accum = _brute_force(c["noise_scale"], 1, 2)
            assert c["global_size"] == micro * accum, (c, micro, accum)
            if micro != c["micro_size"]:  # it did not divide the position: it follows
                assert position % micro and changes[i + 1]["micro_size"] == micro, c
        micro_before = c["micro_size"]
    # Every judged decision is a record, changed or not. Where the fit saw two accumulations
    # (gamma > 0) it recovers the true time model, and the best candidate is the brute-force
    # argmax (but where that micro size could not be reached from this position).
    judged = [r for r in records if r["kind"] == "adapt_decision"]
    decided = {c["step"]: c for c in changes if c["reason"] == "decision"}
    assert len(judged) > len(decided)
    fitted = 0
    for j in judged:
        assert j["changes"] == (j["step"] in decided), j
        if j["changes"]:
            c = decided[j["step"]]
            assert (c["noise_scale"], c["predicted_gain"]) == (j["noise_scale"],
                                                               j["predicted_gain"])
        else:
            assert j["predicted_gain"] < 1.05 or (j["best_micro"], j["best_accum"]) == (
                j["micro_size"], j["accum_steps"]), j
        if j["gamma"] > 0:
            fitted += 1
            assert j["c"] == pytest.approx(1.0) and j["gamma"] == pytest.approx(GAMMA), j
            micro, accum = _brute_force(j["noise_scale"], 1, 2)
            reachable = (j["samples"] % SUBSET) % micro == 0 or micro % j["micro_size"] == 0
            assert not reachable or j["best_global"] == micro * accum, (j, micro, accum)
    assert fitted
    # Every optimizer step trained on the batch in effect, but where an epoch's end cut the
    # window short, or a window was shortened to reach a position the next micro size divides.
    train = [r for r in records if r["kind"] == "train"]
    size, left, by_step = 60, SUBSET, {c["step"]: c["global_size"] for c in changes}
    aligned = {c["step"]: c["micro_size"] for c in changes if c["reason"] == "pending_micro"}
    for prev, r in zip([{"samples": 0}] + train, train):
        added = r["samples"] - prev["samples"]
        if r["step"] in aligned and added < min(size, left):
            assert (r["samples"] % SUBSET) % aligned[r["step"]] == 0, r
        else:
            assert added == min(size, left), r
        assert r["lr"] == pytest.approx(LR * size / 60, rel=1e-12)
        left = left - added or SUBSET
        size = by_step.get(r["step"], size)
    assert summary["samples"] == 3 * SUBSET
    assert moved_mid_epoch  # (this run re-cuts an epoch at least once)
    # `largebatch plot` draws the adapted batch: the samples each step added, but where an
    # epoch's end cut the window short.
    steps, sizes = plot.batch_series(plot.load_run(out, "run"))
    added = [b["samples"] - a["samples"] for a, b in zip([{"samples": 0}] + train, train)]
    assert steps == [float(r["step"]) for r in train]
    assert all(a == z or r["samples"] % SUBSET == 0 or r["step"] in aligned
               for a, z, r in zip(added, sizes, train))
    assert plot.plan_marks(plot.load_run(out, "run"))["run adapt"] == [c["step"] for c in changes]
    assert summary["plan"]["global_size"] == 60  # the initial plan; the changes say the rest


def test_resume_continues_the_adaptive_state_exactly(mnist_root: Path, tmp_path: Path,
                                                     monkeypatch: Any) -> None:
    straight, w_straight = _train(_config(str(mnist_root), str(tmp_path / "a")), monkeypatch)
    # Stop right after a decision whose micro size is still pending (the hardest state).
    pending = [c for c in straight["plan_changes"] if c["reason"] == "pending_micro"]
    assert pending
    stop = pending[0]["step"] - 1
    cfg = _config(str(mnist_root), str(tmp_path / "b"), "checkpoint.resume=auto")
    first, _ = _train(cfg, monkeypatch, stop_at=stop)
    assert first["stop_reason"] == "preempted" and first["steps"] == stop
    resumed, w_resumed = _train(cfg, monkeypatch)
    assert _untimed(resumed["plan_changes"]) == _untimed(straight["plan_changes"])
    assert resumed["steps"] == straight["steps"]
    for k in w_straight:
        assert torch.equal(w_straight[k], w_resumed[k]), k


def _two_ranks(rank: int, world: int, root: str, out: str) -> dict[str, Any]:
    import largebatch.engines.ddp as ddp
    from largebatch.dist import DistEnv
    from largebatch.train.build import build_run
    calls = {"n": 0}
    hook = ddp._squaring_allreduce_hook

    def counting(state, bucket):  # (DDP refuses a hook whose bucket is annotated otherwise)
        calls["n"] += 1
        return hook(state, bucket)
    ddp._squaring_allreduce_hook = counting
    cfg = _config(root, out, "train.epochs=2")
    run = build_run(cfg, DistEnv("torchrun", rank=rank, world_size=world), quiet=True)
    patch = pytest.MonkeyPatch()
    _fake_timing(patch, run, slow=1.0 + rank)  # the ranks disagree on every time they see
    summary = run.trainer.fit()
    patch.undo()
    buckets = len(run.engine.model.reducer._get_zeros_like_grad_buckets())
    return {"changes": run.trainer.state.plan_changes, "steps": summary["steps"],
            "calls": calls["n"], "buckets": buckets, "samples": summary["samples"]}


def test_two_ranks_agree_and_reduce_once_per_step(mnist_root: Path, tmp_path: Path) -> None:
    got = spawn(_two_ranks, 2, str(mnist_root), str(tmp_path / "ddp"), timeout=240)
    assert _untimed(got[0]["changes"]) == _untimed(got[1]["changes"]) and got[0]["changes"]
    for r in got:
        # one all-reduce per bucket per optimizer step, whatever the accumulation became
        assert r["calls"] == r["steps"] * r["buckets"], r
        assert r["samples"] == 2 * SUBSET
    for c in got[0]["changes"]:
        assert c["global_size"] == c["micro_size"] * c["accum_steps"] * 2
        assert c["lr"] == pytest.approx(LR * c["global_size"] / 60, rel=1e-12)


def _resume_on_two_ranks(rank: int, world: int, root: str, out: str) -> dict[str, Any]:
    from largebatch.dist import DistEnv
    from largebatch.train.build import build_run
    cfg = _config(root, out, "checkpoint.resume=auto")
    run = build_run(cfg, DistEnv("torchrun", rank=rank, world_size=world), quiet=True)
    plan = run.trainer.plan  # as loaded: resharded from the 1-process set
    patch = pytest.MonkeyPatch()
    _fake_timing(patch, run)
    summary = run.trainer.fit()
    patch.undo()
    return {"start": [plan.global_size, plan.micro_size, plan.accum_steps, plan.world_size],
            "changes": run.trainer.state.plan_changes, "steps": summary["steps"]}


def test_resume_at_another_world_size_keeps_the_adapted_batch(mnist_root: Path,
                                                              tmp_path: Path,
                                                              monkeypatch: Any) -> None:
    """A 1-process set saved right after a decision whose micro size was still pending,
    resumed on 2 gloo ranks: the global batch in effect at the save goes on (cut for 2 ranks),
    the pending micro size (chosen for the old world's positions) is dropped, and every later
    change is a valid 2-rank batch with the linear rule's LR."""
    straight, _ = _train(_config(str(mnist_root), str(tmp_path / "a")), monkeypatch)
    pending = [c for c in straight["plan_changes"] if c["reason"] == "pending_micro"]
    assert pending
    stop = pending[0]["step"] - 1
    out = tmp_path / "b"
    first, _ = _train(_config(str(mnist_root), str(out), "checkpoint.resume=auto"),
                      monkeypatch, stop_at=stop)
    assert first["steps"] == stop
    saved = [c for c in straight["plan_changes"] if c["step"] <= stop][-1]
    assert saved["reason"] == "decision"  # its micro size had not been applied yet
    got = spawn(_resume_on_two_ranks, 2, str(mnist_root), str(out), timeout=240)
    assert _untimed(got[0]["changes"]) == _untimed(got[1]["changes"])
    g, m, a, w = got[0]["start"]
    assert (g, w) == (saved["global_size"], 2) and m * a * w == g, got[0]["start"]
    after = [c for c in got[0]["changes"] if c["step"] > stop]
    size = g
    for c in after:
        assert c["global_size"] == c["micro_size"] * c["accum_steps"] * 2 <= 960, c
        assert c["lr"] == pytest.approx(LR * c["global_size"] / 60, rel=1e-12), c
        if c["reason"] == "pending_micro":  # only the micro size changes, never the batch
            assert c["global_size"] == size, (c, size)
        size = c["global_size"]
    assert got[0]["steps"] == got[1]["steps"] > stop


# ---- bad input -----------------------------------------------------------------------------------
BAD_INPUT = [
    (["batch.micro_size=60"], "batch.accum_steps >= 2"),
    (["batch.adapt_max_micro=10"], "batch.adapt_max_micro=10"),
    (["batch.adapt_every_steps=0"], "batch.adapt_every_steps=0"),
    (["schedule.name=plateau", "schedule.plateau.action=grow_batch"], "grow_batch"),
    (["engine.name=deepspeed"], "deepspeed"),
    (["data.drop_last=true"], "data.drop_last"),
]


@pytest.fixture(scope="module")
def bad_input_runs(mnist_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every BAD_INPUT run as a real process, once per module and two at a time (each is
    mostly the interpreter's start-up): overrides tuple -> its ``Ran``."""
    cmds = [cli("train", "configs/mnist/mlp.yaml", f"data.root={mnist_root}",
                "data.download=false", "data.subset=600", "batch.global_size=60",
                "batch.micro_size=30", "batch.adapt=goodput",
                f"log.out_dir={tmp_path_factory.mktemp('bad')}", *args)
            for args, _ in BAD_INPUT]
    return {tuple(args): proc
            for (args, _), proc in zip(BAD_INPUT, run_many(cmds, timeout=120))}


@pytest.mark.parametrize("args, words", BAD_INPUT)
def test_bad_input_is_one_line_exit_2(bad_input_runs: dict, args: list[str], words: str) -> None:
    proc = bad_input_runs[tuple(args)]
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and words in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_config_error_names_the_numbers_in_process() -> None:
    with pytest.raises(ConfigError, match="batch.adapt_max_micro=10 is smaller than "
                                          "batch.micro_size=30"):
        load_config(CONFIGS / "mnist" / "mlp.yaml", ["batch.global_size=60",
                                                     "batch.micro_size=30",
                                                     "batch.adapt=goodput",
                                                     "batch.adapt_max_micro=10"])
