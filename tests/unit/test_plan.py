"""The batch plan: global = micro x accum x world, computed and validated in one place."""
from __future__ import annotations

import math

import pytest

from largebatch.config import ConfigError, load_config
from largebatch.plan import make_plan, resolve_batch, scaled_lr
from tests.conftest import CONFIGS


@pytest.mark.parametrize("g, m, a, w, expected", [
    (240, 60, None, 1, (240, 60, 4)),
    (240, 60, None, 2, (240, 60, 2)),
    (240, None, 2, 2, (240, 60, 2)),
    (None, 60, 4, 2, (480, 60, 4)),
    (240, 120, 1, 2, (240, 120, 1)),
    (240, None, None, 2, (240, 120, 1)),
    (None, 32, None, 4, (128, 32, 1)),
])
def test_any_two_of_three(g, m, a, w, expected):
    assert resolve_batch(g, m, a, w) == expected


@pytest.mark.parametrize("g, m, a, w, message", [
    (250, 60, None, 2, "batch.global_size=250 is not divisible by micro_size 60 x world_size 2"),
    (240, 60, 3, 2, "batch.global_size=240 != micro_size 60 x accum_steps 3 x world_size 2"),
    (240, None, 7, 1, "batch.global_size=240 is not divisible by accum_steps 7 x world_size 1"),
    (0, 60, None, 1, "batch.global_size=0 must be a positive integer"),
    (None, None, None, 1, "set at least batch.global_size or batch.micro_size"),
])
def test_errors_name_the_numbers(g, m, a, w, message):
    with pytest.raises(ConfigError) as exc:
        resolve_batch(g, m, a, w)
    assert message in str(exc.value)


def _plan(world: int, n: int, *overrides: str):
    cfg = load_config(CONFIGS / "mnist" / "mlp.yaml", list(overrides))
    return make_plan(cfg, world, n)


def test_steps_per_epoch_with_short_last_window():
    plan = _plan(2, 1000)  # global 240 = 60 x 2 x 2
    assert plan.shard_size == 500
    assert plan.micro_batches_per_epoch == math.ceil(500 / 60) == 9
    assert plan.steps_per_epoch == 5                      # 4 full windows + 1 short one
    assert plan.samples_per_step == 240


def test_steps_per_epoch_drop_last():
    plan = _plan(2, 1000, "data.drop_last=true")
    assert plan.steps_per_epoch == 1000 // 240 == 4
    assert plan.micro_batches_per_epoch == 8


def test_padding_follows_distributed_sampler():
    plan = _plan(3, 1001, "batch.global_size=180")   # 1001 / 3 -> 334 per rank, padded
    assert plan.shard_size == 334
    assert plan.steps_per_epoch == math.ceil(math.ceil(334 / 60) / 1)


def test_lr_scaling_rules_and_warmup_from_epochs():
    assert scaled_lr(0.1, "linear", 4096, 256) == pytest.approx(1.6)
    assert scaled_lr(0.1, "sqrt", 4096, 256) == pytest.approx(0.4)
    assert scaled_lr(0.1, "none", 4096, 256) == 0.1
    plan = _plan(1, 60000, "optim.scale_rule=linear", "optim.base_batch=60",
                 "schedule.warmup_epochs=2")
    assert plan.peak_lr == pytest.approx(0.05 * 240 / 60)
    assert plan.warmup_steps == 2 * 250
    with pytest.raises(ConfigError, match="both set"):
        _plan(1, 60000, "schedule.warmup_epochs=1", "schedule.warmup_steps=5")


def test_deepspeed_fields_and_growth():
    plan = _plan(2, 60000, "batch.max_global_size=960")
    assert plan.deepspeed_fields() == {"train_batch_size": 240,
                                       "train_micro_batch_size_per_gpu": 60,
                                       "gradient_accumulation_steps": 2}
    grown = plan.grown(0.5)
    assert (grown.global_size, grown.accum_steps, grown.micro_size) == (480, 4, 60)
    top = grown.grown(0.5)
    assert top.global_size == 960 and top.grown(0.5) is None
    assert plan.grown(0.5).peak_lr == plan.peak_lr  # Smith et al.: the LR stays


def test_plan_json_has_the_public_fields():
    j = _plan(2, 60000).to_json()
    for key in ("global_size", "micro_size", "accum_steps", "world_size", "steps_per_epoch"):
        assert key in j
    assert j["global_size"] == j["micro_size"] * j["accum_steps"] * j["world_size"]
