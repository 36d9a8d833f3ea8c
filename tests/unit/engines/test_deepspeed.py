"""DeepSpeed engine on 2 real gloo processes: ZeRO 0/1/2/3 reproduce the DDP engine's parameters.

Two kinds of runs:
  * one ``torch.multiprocessing`` session of 2 ranks (imports paid once) that trains the DDP
    references, ZeRO 3 and the clipped cases through ``largebatch.train.build.train``, and probes the
    engine directly (LR writes, a window longer than DeepSpeed's configured accumulation,
    ZeRO 3 state gathering, ``setup_sharded``, state_dict/load_state_dict);
  * six real ``torchrun ... largebatch train`` launches, ZeRO 0/1/2 x (10 steps, short last
    window), that must match DDP and all exit 0 (DeepSpeed's sporadic abort after a finished
    run, ~1 in 8-10 runs without the CLI's hard exit, must never reach the launcher).

Tolerance: ``ATOL = 1e-6`` on every parameter after 10 steps. DeepSpeed and DDP both reduce fp32
gradients, but in other buckets and orders (DDP's reducer buckets vs DeepSpeed's flat
all-reduce at ZeRO 0/1 and reduce-scatter of partitions at ZeRO 2/3), so sums may differ in the
last bit: measured here 0 at ZeRO 0/1 and 3e-8 at ZeRO 2/3 (parameters of magnitude ~0.1, fp32
eps 1.2e-7). 1e-6 leaves 30x headroom, yet is >1000x smaller than what a wrong accumulation
boundary or a second division by the accumulation steps changes (~1e-3: one update of lr x grad).
"""
from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from largebatch.config import ConfigError, load_config
from largebatch.dist import DistEnv, seed_everything
from largebatch.engines.sharded import ShardedModule
from largebatch.models import build_model
from largebatch.train.build import plan_for
from tests._launch import spawn
from tests.conftest import CONFIGS, cli_env, run_cli, run_torchrun

MLP = CONFIGS / "mnist" / "mlp.yaml"
ATOL = 1e-6  # see the module docstring
# 10 steps of mlp.yaml (global 240 = micro 60 x accum 2 x world 2); the warmup makes the
# schedule write a new LR on every one of the first steps, so an LR that never reaches
# DeepSpeed's optimizer step shows up as a parameter difference.
TEN_STEPS = ["data.subset=4800", "train.max_steps=10", "schedule.warmup_steps=4"]
# 1000 samples: 500 per rank = 8 micro-batches of 60 + one of 20, i.e. windows of 2,2,2,2,1
# micro-batches; the last holds 20 samples instead of 120.
SHORT_WINDOW = ["data.subset=1000", "train.epochs=1"]
# Clipping (DeepSpeed's, from optim.grad_clip) gets its own runs: a clipped update no longer
# depends on the gradient's scale, so it would hide a loss scaled twice in the runs above.
CLIPPED = SHORT_WINDOW + ["optim.grad_clip=0.5"]
DS_STAGES = (0, 1, 2)


def _common(root: str, out: Path) -> list[str]:
    return [f"data.root={root}", "data.download=false", "data.test_subset=500",
            "log.progress=false", f"log.out_dir={out}"]


def _deepspeed(stage: int) -> list[str]:
    return ["engine.name=deepspeed", f"engine.zero_stage={stage}"]


SCENARIOS = {"10": TEN_STEPS, "short": SHORT_WINDOW}
# DDP references, ZeRO 3 and the clipped cases train inside the session; the torchrun matrix
# below is ZeRO 0/1/2 x SCENARIOS. Clipping runs at ZeRO 0 (the engine clips the module's
# gradients) and 2 (the ZeRO optimizer clips its partitions).
SESSION_RUNS = {"ddp_10": TEN_STEPS + ["engine.name=ddp"],
                "ddp_short": SHORT_WINDOW + ["engine.name=ddp"],
                "ddp_clip": CLIPPED + ["engine.name=ddp"],
                **{f"ds3_{name}": extra + _deepspeed(3) for name, extra in SCENARIOS.items()},
                **{f"ds{s}_clip": CLIPPED + _deepspeed(s) for s in (0, 2)}}


# ---- the 2-rank session -------------------------------------------------------------------
def _micro_batches(n: int, seed: int, size: int = 30) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, 28, 28, generator=gen),
             torch.randint(0, 10, (size,), generator=gen)) for _ in range(n)]


def _closed_form_sgd(model: nn.Module, batches: list, lr: float) -> dict[str, torch.Tensor]:
    """Parameters after one plain SGD step on the mean loss of all ``batches`` (equal sizes)."""
    ref = copy.deepcopy(model)
    loss = sum(F.nll_loss(ref(x), y) for x, y in batches) / len(batches)
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    return {name: (p - lr * g).detach()
            for (name, p), g in zip(ref.named_parameters(), grads)}


class _LocalHead(ShardedModule, nn.Linear):
    """A per-rank module with the interface's defaults (gradient in its parameters)."""


def _window(engine, batches: list, lr: float) -> dict[str, torch.Tensor]:
    """One optimizer step the way the trainer drives it, after an LR write like LRSchedule's."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
    for i, (x, y) in enumerate(batches):
        with engine.accumulate(is_boundary=i == len(batches) - 1):
            loss = F.nll_loss(engine.model(x), y)
        engine.backward(loss / len(batches))
    engine.step()
    return engine.state_dict()["model"]


def _probe(stage: int, denv: DistEnv) -> dict:
    """Three steps against closed forms: LR 0.1, LR 0, then a window longer than DeepSpeed's
    configured gradient_accumulation_steps (as after batch growth on a plateau)."""
    from largebatch.engines.deepspeed.engine import DeepSpeedEngine
    from largebatch.optim import build_optimizer
    cfg = load_config(MLP, _deepspeed(stage) + ["optim.momentum=0", "data.subset=4800"])
    seed_everything(0)
    model = build_model(cfg.model)
    ref = copy.deepcopy(model)  # ZeRO 3 partitions ``model`` in place
    two, three = _micro_batches(4, seed=7), _micro_batches(6, seed=8)
    engine = DeepSpeedEngine(denv, torch.device("cpu"), cfg=cfg,
                             plan=plan_for(cfg, denv.world_size))
    assert engine.ds_config["gradient_accumulation_steps"] == 2
    optimizer = build_optimizer(cfg.optim, model, lr=0.05)
    engine.setup(model, optimizer)
    head = engine.setup_sharded(_LocalHead(4, 3))  # no optimizer: placed, never stepped
    head_before = copy.deepcopy(head.state_dict())
    r = denv.rank  # each rank takes its own share of the global window
    out: dict = {"same_groups": engine.optimizer.param_groups is optimizer.param_groups,
                 "local_numel": sum(p.numel() for p in engine.unwrapped().parameters()),
                 "expected_lr0.1": _closed_form_sgd(ref, two, lr=0.1),
                 "state_lr0.1": _window(engine, two[2 * r: 2 * r + 2], lr=0.1),
                 "state_lr0.0": _window(engine, two[2 * r: 2 * r + 2], lr=0.0)}
    ref.load_state_dict(out["state_lr0.0"])
    out["expected_long"] = _closed_form_sgd(ref, three, lr=0.1)
    out["state_long"] = _window(engine, three[3 * r: 3 * r + 3], lr=0.1)
    head_now = head.state_dict()
    out["head_unchanged"] = all(torch.equal(v, head_now[k]) for k, v in head_before.items())
    out["head_not_zero"] = not any(hasattr(p, "ds_id") for p in head.parameters())
    state = engine.state_dict()  # a collective at ZeRO 3: both ranks call it
    rank_state = engine.rank_state_dict()
    out["extra_state"] = rank_state["sharded"]
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    reloaded = torch.load(buffer, weights_only=True)  # checkpoint-safe
    out["reloaded_model"] = reloaded["model"]
    _window(engine, three[3 * r: 3 * r + 3], lr=0.1)  # move away, then restore
    try:
        engine.load_state_dict(reloaded, rank_state)
        out["restored"] = engine.state_dict()["model"]
    except ConfigError:
        out["restored"] = None
    return out


# Measured with tests/_launch.py's thread check: after the session, ZeRO 3 keeps its engine,
# optimizer and `Init` context alive (DeepSpeedEngine.destroy() does not release them), hence
# the process groups and their gloo threads; DeepSpeed's TorchBackend also binds the world group
# in `barrier`'s default argument when imported inside it.
DS_LEAKS = "DeepSpeed ZeRO 3 keeps its engine and the process groups alive in-process"


def _session(rank: int, world: int, root: str, out: str) -> None:
    from largebatch.train.build import train
    denv = DistEnv("torchrun", rank=rank, world_size=world, local_rank=rank)
    for name, overrides in SESSION_RUNS.items():
        cfg = load_config(MLP, _common(root, Path(out) / name) + overrides)
        train(cfg, denv, quiet=True)
    probes = {stage: _probe(stage, denv) for stage in (0, 1, 2, 3)}
    torch.save(probes, Path(out) / f"probe{rank}.pt")


@pytest.fixture(scope="module")
def session(tmp_path_factory, mnist_root) -> Path:
    """Run the 2-rank session once for the module; returns its output folder."""
    out = tmp_path_factory.mktemp("ds_session")
    ext = out / "torch_extensions"
    ext.mkdir()
    # An empty extensions dir: it must stay empty (no JIT-compiled DeepSpeed op is needed).
    spawn(_session, 2, str(mnist_root), str(out), timeout=600,
          env={"TORCH_EXTENSIONS_DIR": str(ext)}, leaks=DS_LEAKS)
    return out


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path / "model.pt", weights_only=True)["model"]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _initial_weights() -> dict[str, torch.Tensor]:
    cfg = load_config(MLP)
    seed_everything(cfg.train.seed)  # as largebatch.train.build does before building the model
    return build_model(cfg.model).state_dict()


def _check_summary(out: Path, scenario: str) -> None:
    summary = json.loads((out / "summary.json").read_text())
    if scenario == "short":
        assert (summary["steps"], summary["samples"]) == (5, 1000)  # windows 2,2,2,2,1 micro
    else:
        assert (summary["steps"], summary["samples"]) == (10, 2400)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_zero3_matches_ddp(session, scenario):
    _check_summary(session / f"ds3_{scenario}", scenario)
    diff = _max_diff(_weights(session / f"ds3_{scenario}"), _weights(session / f"ddp_{scenario}"))
    assert diff <= ATOL, f"ZeRO 3 ({scenario}): max |DeepSpeed - DDP| = {diff:.3g}"


@pytest.mark.parametrize("stage", (0, 2))
def test_gradient_clipping_matches_ddp(session, stage):
    diff = _max_diff(_weights(session / f"ds{stage}_clip"), _weights(session / "ddp_clip"))
    assert diff <= ATOL, f"ZeRO {stage} (clipped): max |DeepSpeed - DDP| = {diff:.3g}"
    # the clip was active: the unclipped run ended elsewhere
    assert _max_diff(_weights(session / "ddp_clip"), _weights(session / "ddp_short")) > 1e-3


@pytest.mark.parametrize("stage", (0, 1, 2, 3))
def test_lr_written_by_the_schedule_reaches_deepspeeds_step(session, stage):
    for rank in range(2):
        got = torch.load(session / f"probe{rank}.pt", weights_only=True)[stage]
        # The schedule writes into engine.optimizer.param_groups: the client's own list.
        assert got["same_groups"]
        # lr written as 0.1 (the optimizer was built with 0.05): one plain SGD step at 0.1
        # on the mean gradient of the 2 ranks' 4 micro-batches.
        assert _max_diff(got["state_lr0.1"], got["expected_lr0.1"]) <= ATOL
        # lr written as 0: DeepSpeed's step must leave every parameter alone.
        assert _max_diff(got["state_lr0.0"], got["state_lr0.1"]) == 0.0


@pytest.mark.parametrize("stage", (0, 1, 2, 3))
def test_window_longer_than_configured_accumulation(session, stage):
    # 3 micro-batches per rank while DeepSpeed was configured with 2 (batch growth): the step
    # must come exactly at the trainer's boundary, with the mean over all 6 micro-batches.
    for rank in range(2):
        got = torch.load(session / f"probe{rank}.pt", weights_only=True)[stage]
        assert _max_diff(got["state_long"], got["expected_long"]) <= ATOL
        assert _max_diff(got["state_long"], got["state_lr0.0"]) > 1e-3


def test_state_dict_is_full_and_weights_only_loadable(session):
    full = sum(v.numel() for v in _initial_weights().values())
    for rank in range(2):
        probes = torch.load(session / f"probe{rank}.pt", weights_only=True)
        assert probes[2]["local_numel"] == full  # ZeRO 2 keeps whole parameters on each rank
        assert probes[3]["local_numel"] < full  # ZeRO 3 holds only placeholders locally ...
        state = probes[3]["state_long"]
        assert sum(v.numel() for v in state.values()) == full  # ... state_dict gathers them
        for stage in (0, 1, 2, 3):  # and engine.state_dict() survives a weights_only load
            assert _max_diff(probes[stage]["reloaded_model"], probes[stage]["state_long"]) == 0
        # load_state_dict restores at every stage (ZeRO 1-3: each rank's partitions, see
        # tests/unit/engines/test_deepspeed_resume.py)
        for stage in (0, 1, 2, 3):
            assert _max_diff(probes[stage]["restored"], probes[stage]["state_long"]) == 0


def test_sharded_module_is_placed_not_partitioned_nor_stepped(session):
    for rank in range(2):
        for stage, got in torch.load(session / f"probe{rank}.pt", weights_only=True).items():
            assert got["head_not_zero"] and got["head_unchanged"], stage
            assert set(got["extra_state"][0]) == {"weight", "bias"}


def test_no_jit_compiled_op_is_needed(session):
    assert list((session / "torch_extensions").iterdir()) == []


# ---- the real launcher path ---------------------------------------------------------------
@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("stage", DS_STAGES)
def test_torchrun_deepspeed_matches_ddp_and_exits_0(session, mnist_root, tmp_path, stage,
                                                     scenario):
    """Six consecutive 2-process launches (ZeRO 0/1/2 x 10 steps / short last window)."""
    out = tmp_path / "run"
    proc = run_torchrun(2, "train", str(MLP), *_common(str(mnist_root), out),
                        *SCENARIOS[scenario], *_deepspeed(stage),
                        env=cli_env(TORCH_EXTENSIONS_DIR=str(tmp_path / "ext")))
    # exit 0 from the launcher: a finished run is never reported as failed (SIGABRT at exit)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "terminate called" not in proc.stderr
    _check_summary(out, scenario)
    ours = _weights(out)
    diff = _max_diff(ours, _weights(session / f"ddp_{scenario}"))
    assert diff <= ATOL, f"ZeRO {stage} ({scenario}): max |DeepSpeed - DDP| = {diff:.3g}"
    assert _max_diff(ours, _initial_weights()) > 1e-3  # it did train
    assert not (tmp_path / "ext").exists()  # no JIT-compiled DeepSpeed op was needed


def test_conflicting_batch_field_is_one_line_and_exit_2(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text('{"train_batch_size": 512, "zero_optimization": {"overlap_comm": false}}')
    proc = run_cli("train", str(MLP), "engine.name=deepspeed", f"engine.deepspeed_config={user}",
                   "data.download=false", f"log.out_dir={tmp_path / 'out'}")
    assert proc.returncode == 2
    # one line, no traceback, and DeepSpeed was never imported (it warns on import)
    assert proc.stderr.strip().splitlines() == [
        "largebatch: error: engine.deepspeed_config train_batch_size=512 contradicts the batch "
        "plan's global_size 240"]


def test_fp16_on_cpu_is_refused_before_deepspeed_starts():
    from largebatch.engines.deepspeed.engine import DeepSpeedEngine
    cfg = load_config(MLP, ["engine.name=deepspeed", "train.precision=fp16"])
    with pytest.raises(ConfigError, match="train.precision=fp16 with engine.name=deepspeed needs "
                                          "a GPU"):
        DeepSpeedEngine(DistEnv("none"), torch.device("cpu"), cfg=cfg, plan=plan_for(cfg, 1),
                        precision="fp16")


@pytest.mark.parametrize("overrides", [["engine.zero_stage=1"], ["train.precision=bf16"], []])
def test_resume_is_accepted_where_deepspeed_partitions_the_state(overrides):
    # (refused before DeepSpeed's partitioned state was checkpointed)
    from largebatch.engines.deepspeed.engine import DeepSpeedEngine
    cfg = load_config(MLP, ["engine.name=deepspeed", "checkpoint.resume=old/ck", *overrides])
    engine = DeepSpeedEngine(DistEnv("none"), torch.device("cpu"), cfg=cfg,
                             plan=plan_for(cfg, 1), precision=cfg.train.precision)
    assert engine.zero_stage == cfg.engine.zero_stage


def test_build_engine_hands_the_config_to_deepspeed_engine():
    from largebatch.engines import build_engine
    cfg = load_config(MLP, ["engine.name=deepspeed", "engine.zero_stage=2", "train.precision=bf16",
                            "optim.grad_clip=1.0"])
    engine = build_engine(cfg, DistEnv("torchrun", rank=0, world_size=4), torch.device("cpu"),
                          plan_for(cfg, 4))
    assert engine.name == "deepspeed" and engine.zero_stage == 2
    # world 4: global 240 = micro 60 x accum 1 x 4
    assert {k: engine.ds_config[k] for k in engine.plan.deepspeed_fields()} == {
        "train_batch_size": 240, "train_micro_batch_size_per_gpu": 60,
        "gradient_accumulation_steps": 1}
    assert engine.ds_config["bf16"] == {"enabled": True}
    assert engine.ds_config["gradient_clipping"] == 1.0
