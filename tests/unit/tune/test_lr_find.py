"""The LR range test: exact restore, a quadratic with a known stable range, the command."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from largebatch.tune.lr_find import lr_find, ramp, smooth

from tests.conftest import REPO, assert_same_weights, run_cli


def _cfg(root: Path, out: Path, *extra: str):
    from largebatch.config import load_config
    return load_config(REPO / "configs/mnist/seed.yaml", [
        f"data.root={root}", "data.download=false", "data.subset=960", "batch.global_size=96",
        "batch.micro_size=48", "train.epochs=1", "train.max_steps=6", "log.progress=false",
        "optim.momentum=0.9", "train.device=cpu", "engine.name=auto", f"log.out_dir={out}",
        *extra])


def _state(trainer) -> dict:
    opt = trainer.engine.optimizer.state_dict()
    return {"params": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
            "opt": {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()}
                    for k, s in opt["state"].items()},
            "groups": [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]],
            "sched": trainer.schedule.state_dict(), "run": trainer.state.state_dict(),
            "torch_rng": torch.get_rng_state(), "py_rng": random.getstate(),
            "np_rng": np.random.get_state()[1].copy(), "epoch": trainer.train_loader.epoch}


def _assert_same(a: dict, b: dict) -> None:
    assert_same_weights(a["params"], b["params"])
    assert a["opt"].keys() == b["opt"].keys() and a["opt"]  # momentum buffers exist
    for k in a["opt"]:
        for n, v in a["opt"][k].items():
            assert torch.equal(v, b["opt"][k][n]) if torch.is_tensor(v) else v == b["opt"][k][n]
    assert a["groups"] == b["groups"] and a["sched"] == b["sched"]
    assert json.dumps(a["run"], default=str) == json.dumps(b["run"], default=str)
    assert torch.equal(a["torch_rng"], b["torch_rng"]) and a["py_rng"] == b["py_rng"]
    assert np.array_equal(a["np_rng"], b["np_rng"]) and a["epoch"] == b["epoch"]


def test_restores_model_optimizer_rng_and_a_later_training(tmp_path, mnist_root):
    from largebatch.train.build import build_run
    # (a) mid-run, with momentum state: two real steps first, then the test, then compare.
    run = build_run(_cfg(mnist_root, tmp_path / "a"), quiet=True)
    windows = run.trainer.full_windows()
    for _ in range(2):
        run.trainer.train_step(*next(windows))
    before = _state(run.trainer)
    result = lr_find(run.trainer, 1e-4, 10.0, 40)
    _assert_same(before, _state(run.trainer))
    assert len(result.losses) >= 10 and len(set(result.losses)) > 5  # it really trained
    # (b) a training after the test equals one without it, bit for bit (dropout included).
    plain = build_run(_cfg(mnist_root, tmp_path / "plain"), quiet=True)
    want = plain.trainer.fit()
    probed = build_run(_cfg(mnist_root, tmp_path / "probed"), quiet=True)
    lr_find(probed.trainer, 1e-4, 10.0, 20)
    got = probed.trainer.fit()
    assert got["steps"] == want["steps"] == 6
    assert got["final_train_loss"] == want["final_train_loss"]
    assert_same_weights(plain.engine.unwrapped().state_dict(),
                        probed.engine.unwrapped().state_dict())


# ---- a quadratic with a known stable range ---------------------------------------------------
LAMBDAS = torch.logspace(-1, 1, 20, dtype=torch.float64)  # lambda_max = 10: SGD stable < 0.2


class _Quadratic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(len(LAMBDAS), dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (LAMBDAS * self.w ** 2).sum() + 0.0 * x.sum()


class _Loader:
    """16 micro-batches of 4 zero inputs per epoch (the loss does not depend on them)."""

    epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return 16

    def __iter__(self):
        return iter([(torch.zeros(4, 1, dtype=torch.float64), torch.zeros(4))] * 16)


def _quadratic_trainer(tmp_path: Path):
    from largebatch.config import load_config
    from largebatch.dist import DistEnv
    from largebatch.engines import build_engine
    from largebatch.metrics import MetricsLogger
    from largebatch.noise.scale import NoiseScaleMonitor
    from largebatch.optim import build_optimizer
    from largebatch.optim.schedules import build_schedule
    from largebatch.plan import make_plan
    from largebatch.policies.base import Policies
    from largebatch.tasks.base import Metric, Task, TaskParts
    from largebatch.train.trainer import Trainer

    class QuadraticTask(Task):
        metrics = (Metric("loss", "min"),)

        def build(self) -> TaskParts:
            return TaskParts(_Quadratic())

        def loss(self, model, x, y):
            return model(x)

        def evaluate(self, model, loader, engine):
            return {"loss": float(model(torch.zeros(1, 1, dtype=torch.float64)))}

    cfg = load_config(REPO / "configs/mnist/mlp.yaml", [
        "optim.name=sgd", "optim.momentum=0", "optim.weight_decay=0", "batch.global_size=8",
        "batch.micro_size=4", "train.device=cpu", "engine.name=auto", "log.progress=false",
        f"log.out_dir={tmp_path}", "train.max_loss=1e300"])
    plan = make_plan(cfg, 1, 64)  # accumulation 2: the window's two halves
    engine = build_engine(cfg, DistEnv("none"), torch.device("cpu"), plan)
    task = QuadraticTask(cfg)
    model = task.build().model
    engine.setup(model, build_optimizer(cfg.optim, model, lr=plan.peak_lr))
    schedule = build_schedule(engine.optimizers, cfg.schedule, plan, 100)
    noise = NoiseScaleMonitor(engine, False)
    return Trainer(cfg, task, engine, schedule, plan, _Loader(), _Loader(),
                   MetricsLogger(cfg.log, False, {}), noise, Policies())


def _reference_losses(lrs: list[float]) -> list[float]:
    """Plain SGD on 0.5 * sum(lambda w^2) in closed form: w <- (1 - lr lambda) w."""
    w, out = torch.ones(len(LAMBDAS), dtype=torch.float64), []
    for lr in lrs:
        out.append(float(0.5 * (LAMBDAS * w ** 2).sum()))
        w = (1 - lr * LAMBDAS) * w
    return out


def test_quadratic_suggestions_lie_in_the_stable_range(tmp_path):
    trainer = _quadratic_trainer(tmp_path)
    result = lr_find(trainer, 1e-4, 10.0, 100)
    n = len(result.losses)
    # The curve is plain SGD's at the ramp's LRs; it stops after passing 2 / lambda_max.
    np.testing.assert_allclose(result.losses, _reference_losses(ramp(1e-4, 10.0, 100)[:n]),
                               rtol=1e-9)
    np.testing.assert_allclose(result.smoothed, smooth(result.losses), rtol=1e-12)
    limit = 2.0 / float(LAMBDAS.max())
    assert result.stop_reason == "diverged" and limit < result.lrs[-1] < 10.0
    s = result.suggestions
    for key in ("steepest", "max_stable", "lr"):
        assert limit / 20 < s[key] < limit, (key, s[key])
    assert s["onset"] < s["lr"] and s["warmup_steps"] > 0
    assert 0.01 <= s["warmup_start_factor"] < 1
    # restored: the weights are the initial ones again
    assert torch.equal(trainer.model.w.detach(), torch.ones(len(LAMBDAS), dtype=torch.float64))


# ---- the command -----------------------------------------------------------------------------
def test_cli_on_mnist_writes_json_and_png(tmp_path, mnist_root):
    out = tmp_path / "lrf"
    proc = run_cli("lr-find", "configs/mnist/seed.yaml", "--steps", "30", f"data.root={mnist_root}",
                   "data.download=false", "data.subset=3000", "--out", str(out),
                   f"log.out_dir={tmp_path / 'run'}", timeout=120)
    assert proc.returncode == 0, proc
    data = json.loads((out / "lr_find.json").read_text())
    assert len(data["lrs"]) == len(data["losses"]) == 30 and data["plan"]["global_size"] == 60
    for key in ("steepest", "max_stable", "lr", "lr_at_min"):
        assert math.isfinite(data["suggestions"][key]) and data["suggestions"][key] > 0
    assert (out / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "train with: largebatch train configs/mnist/seed.yaml" in proc.stdout
    assert not (tmp_path / "run").exists()  # the probe leaves log.out_dir alone


@pytest.mark.parametrize("args, words", [(["--min-lr", "1", "--max-lr", "0.1"], "--max-lr=0.1"),
                                         (["--steps", "3"], "--steps=3"),
                                         (["--min-lr", "0"], "--min-lr=0")])
def test_cli_bad_input_is_one_line_exit_2(capsys, args, words):
    from largebatch.cli import main
    with pytest.raises(SystemExit) as exc:
        main(["lr-find", "configs/mnist/seed.yaml", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and words in err[0], err


# ---- two ranks: the global batch through DDP ---------------------------------------------------
def _plain_ramp_losses(root: Path, lrs: list[float], global_size: int, seed: int) -> list[float]:
    """No trainer, no engine: SGD (momentum 0.5, seed.yaml's) over whole global batches in the
    sampler's order, the LR set to the ramp's before each step; each batch's loss."""
    import torch.nn.functional as F

    from largebatch.config import DataConfig
    from largebatch.data import load_mnist_tensors, shard_indices
    from largebatch.data.mnist import normalize_uint8
    from largebatch.models.mnist import MLP
    images, labels = load_mnist_tensors(DataConfig(root=str(root), download=False), train=True)
    torch.manual_seed(seed)  # the run seeds with train.seed before building the model
    model = MLP(hidden=64)
    opt = torch.optim.SGD(model.parameters(), lr=lrs[0], momentum=0.5)
    order, losses = shard_indices(len(labels), 0, 1, seed=seed, epoch=0), []
    for step, lr in enumerate(lrs):
        idx = order[step * global_size:(step + 1) * global_size]
        loss = F.nll_loss(model(normalize_uint8(images[idx])), labels[idx])
        opt.zero_grad()
        loss.backward()
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_two_ranks_ramp_is_the_global_batch_loss_of_a_plain_loop(tmp_path, mnist_root):
    """2 ranks x micro 60 x accum 2 = 240 (DDP): every step's loss equals a plain loop's over
    the whole global batch at the same LR, to 1e-5 (fp32 sums in another order)."""
    from tests.conftest import run_torchrun
    out = tmp_path / "lrf"
    proc = run_torchrun(2, "lr-find", "configs/mnist/seed.yaml", f"data.root={mnist_root}",
                        "data.download=false", "model.name=mlp", "batch.global_size=240",
                        "batch.micro_size=60", "engine.name=ddp", "train.seed=7",
                        "--min-lr", "1e-3", "--max-lr", "1", "--steps", "12", "--out", str(out),
                        f"log.out_dir={tmp_path / 'run'}", timeout=180)
    assert proc.returncode == 0, proc
    data = json.loads((out / "lr_find.json").read_text())
    assert data["plan"]["world_size"] == 2 and data["plan"]["accum_steps"] == 2
    assert data["stop_reason"] == "max_lr" and len(data["losses"]) == 12
    want = _plain_ramp_losses(mnist_root, ramp(1e-3, 1.0, 12), 240, 7)
    assert max(abs(a - b) for a, b in zip(data["losses"], want)) <= 1e-5
    assert min(want) < want[0] - 0.3  # the ramp really trained (not a flat curve matching)


@pytest.mark.parametrize("stage", (0, 2))
def test_deepspeed_restores_its_partitions_and_ramps_like_the_single_engine(tmp_path, mnist_root,
                                                                              stage):
    """DeepSpeed (one rank): module weights, fp32 masters, their momentum and its counters
    are put back bit for bit, and the ramp's losses are the single engine's to 1e-5."""
    pytest.importorskip("deepspeed")
    from largebatch.train.build import build_run

    def two_steps(*extra: str):
        run = build_run(_cfg(mnist_root, tmp_path / "-".join(extra), "model.name=mlp", *extra),
                        quiet=True)
        windows = run.trainer.full_windows()
        for _ in range(2):
            run.trainer.train_step(*next(windows))
        return run

    single = two_steps("engine.name=single")
    want = lr_find(single.trainer, 1e-4, 10.0, 20)
    run = two_steps("engine.name=deepspeed", f"engine.zero_stage={stage}")
    weights, local = run.engine.model_state_dict(), run.engine.local_state()
    got = lr_find(run.trainer, 1e-4, 10.0, 20)
    np.testing.assert_allclose(got.losses, want.losses, rtol=0, atol=1e-5)
    assert len(set(got.losses)) > 5  # it trained in between
    assert_same_weights(weights, run.engine.model_state_dict())
    after = run.engine.local_state()
    for a, b in zip(local["masters"], after["masters"], strict=True):
        assert torch.equal(a, b)
    assert any(torch.is_tensor(v) for st in local["state"] for v in st.values())  # momentum
    for a, b in zip(local["state"], after["state"], strict=True):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)
    assert after["counters"] == local["counters"] and after["counters"]["global_steps"] == 2
    assert after["groups"] == local["groups"]
