"""``batch.micro_size: auto`` on CPU: the size found fits and the next one does not, the run is
bit-identical to the explicit micro size, every rank agrees, restarts do not probe again, and
bad input is one line with exit code 2.

The reference for the measured peak is worked out by hand for the MLP (784 -> h -> 10, SGD with
momentum): parameters, gradients and momentum are 3 x 4 bytes per parameter; per sample, autograd
keeps the input (784 floats, the batch), the hidden ReLU output (h floats, which the second
Linear saves too: one storage), the log-probabilities (10 floats, saved by log_softmax and
nll_loss: one storage) and the int64 label. Only nll_loss's 0-d total weight is left over.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from largebatch.config import ConfigError, load_config
from largebatch.dist import DistEnv
from largebatch.train.build import build_run, finish_run
from largebatch.plan import micro_candidates
from largebatch.tune import micro_batch, step_memory
from largebatch.tune.micro_batch import CACHE_FILE, search
from tests._launch import spawn
from tests.conftest import CONFIGS, assert_same_weights, cli, model_weights, run_many

MLP_YAML = str(CONFIGS / "mnist" / "mlp.yaml")  # hidden 64, SGD lr 0.05 momentum 0.9, seed 1
HIDDEN = 64
PARAMS = 784 * HIDDEN + HIDDEN + HIDDEN * 10 + 10
MIB = 2 ** 20


def peak_reference(m: int) -> int:
    """Hand-derived bytes one step at micro size ``m`` holds (see the module docstring),
    without nll_loss's 4-byte scalar."""
    return 3 * 4 * PARAMS + m * (4 * (784 + HIDDEN + 10) + 8)


def _cfg(root: Path, out: Path, *extra: str):
    return load_config(MLP_YAML, [f"data.root={root}", "data.download=false",
                                  "data.subset=2400", "data.test_subset=500",
                                  "batch.global_size=240", "log.progress=false",
                                  f"log.out_dir={out}", *extra])


def _count_trials(monkeypatch) -> list[int]:
    """Count the trial steps (calls of the measured step) from here on."""
    calls = [0]
    original = step_memory.step_and_measure

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)
    monkeypatch.setattr(step_memory, "step_and_measure", counting)  # what the trials call
    return calls


# A budget between the reference peaks of the candidates 48 and 60 of global 240 on one rank.
BUDGET_48 = (peak_reference(48) + peak_reference(60)) / 2 / MIB


def test_candidates_keep_the_global_batch_and_search_finds_the_largest_fit():
    assert micro_candidates(240, 2) == [1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 24, 30, 40, 60, 120]
    assert micro_candidates(7, 1) == [1, 7]
    cands = micro_candidates(720, 1)
    for threshold in (1, 2, 7, 48, 50, 359, 360, 719, 720, 10 ** 6):
        tried = []
        found = search(cands, lambda m: tried.append(m) or m <= threshold)
        assert found == max(c for c in cands if c <= threshold), threshold  # brute force
        assert len(tried) <= 2 * len(cands).bit_length() + 2, (threshold, tried)
    assert search(cands, lambda m: False) is None


def test_found_size_fits_the_budget_and_the_next_one_does_not(tmp_path, mnist_root, monkeypatch):
    calls = _count_trials(monkeypatch)
    run = build_run(_cfg(mnist_root, tmp_path / "a", "batch.micro_size=auto",
                         f"batch.memory_budget_mb={BUDGET_48}"), quiet=True)
    plan, auto = run.plan, run.plan.micro_auto
    assert (plan.global_size, plan.micro_size, plan.accum_steps) == (240, 48, 5)
    limit = int(BUDGET_48 * MIB)
    assert auto["limit_bytes"] == limit and auto["source"] == "search"
    assert auto["trials"] == calls[0] > 0
    # measured = reference (+ nll_loss's 0-d total weight): the size fits, the next does not
    assert 0 <= auto["peak_bytes"] - peak_reference(48) <= 16
    assert 0 <= auto["next_peak_bytes"] - peak_reference(60) <= 16
    assert auto["peak_bytes"] <= limit < auto["next_peak_bytes"]
    assert "micro auto: 48 (search" in plan.describe()
    finish_run(run, run.trainer.fit(), quiet=True)
    saved = (tmp_path / "a" / "plan.json").read_text()
    assert '"micro_size": 48' in saved and '"source": "search"' in saved


def test_auto_trains_exactly_like_the_explicit_micro_size(tmp_path, mnist_root):
    common = ("train.max_steps=6", "checkpoint.resume=never")
    auto = build_run(_cfg(mnist_root, tmp_path / "auto", "batch.micro_size=auto",
                          f"batch.memory_budget_mb={BUDGET_48}", *common), quiet=True)
    assert auto.plan.micro_auto["trials"] > 0  # the model really took trial steps
    summary_auto = finish_run(auto, auto.trainer.fit(), quiet=True)
    explicit = build_run(_cfg(mnist_root, tmp_path / "m48", "batch.micro_size=48", *common),
                         quiet=True)
    summary_m48 = finish_run(explicit, explicit.trainer.fit(), quiet=True)
    a, b = model_weights(tmp_path / "auto"), model_weights(tmp_path / "m48")
    assert_same_weights(a, b)  # torch.equal, tensor by tensor
    assert summary_auto["final_train_loss"] == summary_m48["final_train_loss"]
    assert summary_auto["samples"] == summary_m48["samples"] == 6 * 240  # global batch kept
    torch.manual_seed(1)  # and it trained: far from the initialisation
    from largebatch.models.mnist import MLP
    init = MLP(HIDDEN).state_dict()
    assert max((a[k] - init[k]).abs().max().item() for k in a) > 1e-2


def test_restart_uses_the_cache_and_resume_keeps_the_checkpoint_plan(tmp_path, mnist_root,
                                                                     monkeypatch):
    out = tmp_path / "run"
    keys = ("batch.micro_size=auto", f"batch.memory_budget_mb={BUDGET_48}")
    calls = _count_trials(monkeypatch)
    first = build_run(_cfg(mnist_root, out, *keys, "train.max_steps=2"), quiet=True)
    finish_run(first, first.trainer.fit(), quiet=True)
    probes = calls[0]
    assert probes > 0 and (out / CACHE_FILE).is_file()
    # restart without a checkpoint to resume: the cache answers, no trial step
    fresh = build_run(_cfg(mnist_root, out, *keys, "checkpoint.resume=never",
                           "checkpoint.dir=" + str(tmp_path / "other")), quiet=True)
    assert calls[0] == probes
    assert fresh.plan.micro_size == 48 and fresh.plan.micro_auto["source"] == "cache"
    assert fresh.plan.micro_auto["trials"] == 0
    # resume: the checkpoint's plan wins even without the cache (no trial step either)
    (out / CACHE_FILE).unlink()
    resumed = build_run(_cfg(mnist_root, out, *keys, "train.max_steps=4"), quiet=True)
    assert calls[0] == probes
    assert resumed.plan.micro_size == 48 and resumed.plan.micro_auto["source"] == "checkpoint"
    summary = finish_run(resumed, resumed.trainer.fit(), quiet=True)
    assert summary["steps"] == 4


def _agree(rank: int, world: int, root: str, out: str, budgets: list[float]) -> dict:
    """One rank: build the run with its own budget, take two steps, report its plan."""
    cfg = _cfg(Path(root), Path(out), "batch.micro_size=auto", "engine.name=ddp",
               f"batch.memory_budget_mb={budgets[rank]}", "train.max_steps=2",
               "checkpoint.resume=never")
    run = build_run(cfg, DistEnv("torchrun", rank=rank, world_size=world), quiet=True)
    summary = finish_run(run, run.trainer.fit(), quiet=True)
    return {"micro": run.plan.micro_size, "accum": run.plan.accum_steps,
            "local_peak": run.plan.micro_auto["peak_bytes"], "samples": summary["samples"]}


def _agree_each(rank: int, world: int, root: str, out: str,
                cases: dict[str, list[float]]) -> dict[str, dict]:
    """``_agree`` for each case in turn, in one launch (start-up paid once): name -> result."""
    return {name: _agree(rank, world, root, str(Path(out) / name), budgets)
            for name, budgets in cases.items()}


def test_two_gloo_ranks_agree_on_one_micro_size(tmp_path, mnist_root):
    """Global 240 on 2 ranks: candidates divide 120. The same budget (between the peaks of 40
    and 60) gives 40 on both; with rank 1's budget below 40's peak, both take rank 1's 30."""
    same = (peak_reference(40) + peak_reference(60)) / 2 / MIB
    low = (peak_reference(30) + peak_reference(40)) / 2 / MIB
    cases = {"same": ([same, same], 40), "min": ([same, low], 30)}
    ranks = spawn(_agree_each, 2, str(mnist_root), str(tmp_path),
                  {name: budgets for name, (budgets, _) in cases.items()}, timeout=180)
    for name, (_, micro) in cases.items():
        got = [results[name] for results in ranks]
        assert [g["micro"] for g in got] == [micro, micro], (name, got)
        assert [g["accum"] for g in got] == [240 // (2 * micro)] * 2
        assert all(g["samples"] == 2 * 240 for g in got)


def test_bad_input_is_one_line_and_exit_2(tmp_path, mnist_root):
    root = f"data.root={mnist_root}"
    small, odd = run_many([  # two independent processes, side by side
        cli("train", MLP_YAML, root, "data.download=false", "data.subset=2400",
            "batch.micro_size=auto", "batch.memory_budget_mb=0.1",
            f"log.out_dir={tmp_path / 'small'}", "log.progress=false"),
        cli("plan", MLP_YAML, root, "batch.global_size=121", "batch.micro_size=auto",
            "--world-size", "2")])
    assert small.returncode == 2, small
    lines = [ln for ln in small.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, small
    assert "batch.memory_budget_mb=0.1" in lines[0]
    assert f"{(peak_reference(1) + 4) / MIB:.2f} MiB" in lines[0]  # micro size 1's peak
    assert odd.returncode == 2, odd
    lines = [ln for ln in odd.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "batch.global_size=121" in lines[0] and "world_size 2" in lines[0]


@pytest.mark.parametrize("overrides, key", [
    (["batch.micro_size=fast"], "batch.micro_size='fast'"),
    (["batch.micro_size=auto", "batch.accum_steps=2"], "batch.accum_steps=2"),
    (["batch.micro_size=auto", "batch.global_size=null"], "needs batch.global_size"),
    (["batch.memory_budget_mb=-1"], "batch.memory_budget_mb=-1"),
    (["batch.memory_fraction=1.5"], "batch.memory_fraction=1.5"),
    (["batch.micro_size=auto", "engine.name=deepspeed"], "engine.name=deepspeed"),
])
def test_config_refuses_what_auto_cannot_do(overrides, key):
    with pytest.raises(ConfigError, match=key.replace("(", r"\(")):
        load_config(MLP_YAML, overrides)


def test_oom_recovery_restores_the_exact_state(monkeypatch):
    """The CUDA trial's recovery, on CPU: an out-of-memory error raised half-way through the
    optimizer step (some parameters already updated, momentum created) leaves weights, grads,
    optimizer state and RNG exactly as before, and the search goes on below it. The CUDA
    memory counters are stubbed (peak = 1000 x m); tests/cuda runs the real thing."""
    from largebatch.models.mnist import MLP
    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 1000 * seen[-1])
    torch.manual_seed(3)
    model = MLP(HIDDEN)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    seen: list[int] = []
    real_step = opt.step

    def step_then_oom(*args, **kwargs):  # updates every parameter, then fails like a real OOM
        real_step(*args, **kwargs)
        if seen[-1] >= 40:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
    opt.step = step_then_oom
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))

    def loss(m, a, b):
        seen.append(len(a))
        return torch.nn.functional.nll_loss(m(a), b)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    found, peaks = micro_batch.run_search(micro_candidates(120, 1),
                                          step_memory.cuda_trial(model, opt, loss, x, y,
                                                                 "fp32", 10 ** 9))
    assert found == 30 and peaks[40] is None and peaks[30] == 30000  # 40 and up: "OOM"
    assert_same_weights(model.state_dict(), init)
    assert all(p.grad is None for p in model.parameters()) and not opt.state
    assert torch.equal(torch.get_rng_state(), rng)
