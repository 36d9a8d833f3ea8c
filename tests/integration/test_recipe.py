"""The large-batch recipe's config: its batch plan and LR rule in closed form, and a short real run.

Fast checks only. The claim itself (98% test accuracy in at most 1.5x the seed recipe's
epochs) takes minutes of CPU and lives in ``benchmarks/bench_recipe.py``.
"""
from __future__ import annotations

import json
import math

import pytest

from largebatch.config import load_config
from largebatch.plan import make_plan
from largebatch.train.build import train
from tests.conftest import CONFIGS

RECIPE = CONFIGS / "mnist" / "large_batch.yaml"
NAIVE = CONFIGS / "mnist" / "naive_linear.yaml"
RECIPE_16K = CONFIGS / "mnist" / "large_batch_16k.yaml"
MNIST_TRAIN = 60000


def _closed_form_lr(cfg, step: int, warmup: int) -> float:
    """The recipe's LR for the optimizer step after ``step`` steps, written out independently:
    peak = lr x sqrt(global / base_batch), linear warmup from start_factor x peak, then the peak."""
    peak = cfg.optim.lr * math.sqrt(cfg.batch.global_size / cfg.optim.base_batch)
    s = cfg.schedule.warmup_start_factor
    return peak * (s + (1 - s) * step / warmup) if step < warmup else peak


@pytest.mark.parametrize("world", [1, 2])
def test_recipe_plan_matches_the_rule(world):
    cfg = load_config(RECIPE)
    # The recipe the docs describe: AdamW, sqrt rule from the seed's batch, warmup, constant.
    assert (cfg.optim.name, cfg.optim.scale_rule, cfg.optim.base_batch,
            cfg.schedule.name) == ("adamw", "sqrt", 60, "constant")
    assert cfg.model.name == "seed_cnn"
    plan = make_plan(cfg, world, MNIST_TRAIN)
    assert plan.global_size >= 4096
    assert plan.global_size == plan.micro_size * plan.accum_steps * world
    assert plan.accum_steps == 4096 // (1024 * world)  # micro 1024: accumulation fills the rest
    assert plan.steps_per_epoch == math.ceil(MNIST_TRAIN / 4096) == 15
    assert plan.peak_lr == pytest.approx(cfg.optim.lr * math.sqrt(4096 / 60), rel=1e-12)
    assert plan.warmup_steps == round(cfg.schedule.warmup_epochs * 15)
    assert plan.warmup_steps >= 1


@pytest.mark.parametrize("world", [1, 2])
def test_16k_recipe_keeps_the_4096_peak_and_warms_up_one_epoch(world):
    """large_batch_16k.yaml is the 4096 recipe at 4x the batch with the same peak LR (the sqrt
    rule from 0.002 collapsed the net, docs/LARGE_BATCH.md) and a warmup of one epoch."""
    cfg, base = load_config(RECIPE_16K), load_config(RECIPE)
    plan, plan_4096 = make_plan(cfg, world, MNIST_TRAIN), make_plan(base, world, MNIST_TRAIN)
    assert plan.global_size == 16384 == plan.micro_size * plan.accum_steps * world
    assert plan.steps_per_epoch == math.ceil(MNIST_TRAIN / 16384) == 4
    assert plan.peak_lr == pytest.approx(plan_4096.peak_lr, rel=1e-12)
    assert plan.peak_lr == pytest.approx(0.002 * math.sqrt(4096 / 60), rel=1e-12)
    assert plan.warmup_steps == 4
    # Everything else is the 4096 recipe's: same net, optimizer, betas, schedule, target.
    for section, key in [("model", "name"), ("optim", "name"), ("optim", "betas"),
                         ("optim", "weight_decay"), ("schedule", "name"),
                         ("schedule", "warmup_start_factor"), ("train", "target_acc")]:
        assert getattr(getattr(cfg, section), key) == getattr(getattr(base, section), key), key


def test_naive_linear_is_the_seed_lr_times_the_batch_ratio():
    plan = make_plan(load_config(NAIVE), 1, MNIST_TRAIN)
    assert (plan.global_size, plan.warmup_steps) == (4096, 0)
    assert plan.peak_lr == pytest.approx(0.02 * 4096 / 60, rel=1e-12)


def test_recipe_trains_a_few_steps_on_real_mnist(tmp_path, mnist_root):
    """The first six optimizer steps of the real run (the whole warmup and one step at the
    peak): the logged LRs follow the closed form, the loss is finite and falls, no divergence."""
    out = tmp_path / "run"
    steps = 6
    cfg = load_config(RECIPE, [f"data.root={mnist_root}", "data.download=false",
                               "data.test_subset=2000",
                               f"train.max_steps={steps}", "train.eval_every_samples=0",
                               "train.stop_at_target=false", f"log.out_dir={out}",
                               "log.progress=false", "log.wandb.mode=disabled"])
    summary = train(cfg, quiet=True)
    assert summary["steps"] == steps and not summary["diverged"]
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if r["kind"] == "train"]
    losses = [r["loss"] for r in train_recs]
    assert all(math.isfinite(v) for v in losses)
    assert losses[0] == pytest.approx(math.log(10), abs=0.15)  # an untrained net: chance level
    assert losses[-1] < 0.85 * losses[0]
    plan = make_plan(cfg, 1, MNIST_TRAIN)
    assert plan.warmup_steps == steps - 1 == 5
    expected = [_closed_form_lr(cfg, k, plan.warmup_steps) for k in range(steps)]
    assert [r["lr"] for r in train_recs] == pytest.approx(expected, rel=1e-9)
    assert summary["final_val_acc"] > 0.3  # chance is 0.1
