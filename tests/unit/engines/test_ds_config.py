"""The DeepSpeed config: generated from the batch plan, merged with a user JSON, contradictions.

Pure dict tests: nothing here imports DeepSpeed (the generated config is fed to the real
``deepspeed.initialize`` in test_deepspeed.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from largebatch.config import ConfigError, load_config
from largebatch.engines.deepspeed.config import (build_ds_config, generate_ds_config, merge_ds_config,
                                          read_user_config)
from largebatch.plan import make_plan
from tests.conftest import CONFIGS

MLP = CONFIGS / "mnist" / "mlp.yaml"


def _cfg_plan(*overrides: str, world: int = 2, dataset: int = 4800):
    cfg = load_config(MLP, ["engine.name=deepspeed", *overrides])
    return cfg, make_plan(cfg, world, dataset)


def _user_json(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("world, micro, accum", [(1, 60, 4), (2, 60, 2), (4, 60, 1)])
def test_batch_fields_come_from_the_plan(world, micro, accum):
    cfg, plan = _cfg_plan(world=world)
    ds = generate_ds_config(cfg, plan)
    # mlp.yaml: global 240, micro 60 -> accum = 240 / (60 x world)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"],
            ds["gradient_accumulation_steps"]) == (240, micro, accum)
    assert ds["train_batch_size"] == micro * accum * world


def test_batch_fields_follow_a_plan_built_from_micro_and_accum():
    cfg, plan = _cfg_plan("batch.global_size=null", "batch.micro_size=32", "batch.accum_steps=3",
                          world=2)
    assert plan.deepspeed_fields() == {"train_batch_size": 192,
                                       "train_micro_batch_size_per_gpu": 32,
                                       "gradient_accumulation_steps": 3}
    assert {k: generate_ds_config(cfg, plan)[k] for k in plan.deepspeed_fields()} == \
        plan.deepspeed_fields()


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_and_untested_optimizer_flag(stage):
    cfg, plan = _cfg_plan(f"engine.zero_stage={stage}")
    ds = generate_ds_config(cfg, plan)
    assert ds["zero_optimization"] == {"stage": stage}
    # DeepSpeed refuses the client torch SGD at ZeRO >= 1 without this flag.
    assert ds.get("zero_allow_untested_optimizer", False) is (stage >= 1)


def test_precision_blocks():
    cfg, plan = _cfg_plan()
    ds = generate_ds_config(cfg, plan)
    assert "bf16" not in ds and "fp16" not in ds
    cfg, plan = _cfg_plan("train.precision=bf16")
    ds = generate_ds_config(cfg, plan)
    assert ds["bf16"] == {"enabled": True} and "fp16" not in ds
    cfg, plan = _cfg_plan("train.precision=fp16")
    ds = generate_ds_config(cfg, plan)
    # loss_scale 0 = DeepSpeed's dynamic loss scaling, starting at 2**16 like torch's GradScaler
    assert ds["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    assert "bf16" not in ds


def test_gradient_clipping_from_optim():
    cfg, plan = _cfg_plan("optim.grad_clip=0.5")
    assert generate_ds_config(cfg, plan)["gradient_clipping"] == 0.5
    cfg, plan = _cfg_plan()
    assert generate_ds_config(cfg, plan)["gradient_clipping"] == 0.0


def test_user_json_is_merged_deeply(tmp_path):
    cfg, plan = _cfg_plan("engine.zero_stage=2", "train.precision=bf16",
                          f"engine.deepspeed_config={tmp_path / 'ds.json'}")
    _user_json(tmp_path, {"zero_optimization": {"overlap_comm": False, "reduce_bucket_size": 1000},
                          "bf16": {"immediate_grad_update": True},
                          "train_batch_size": 240, "gradient_accumulation_steps": "auto",
                          "communication_data_type": "fp32"})
    ds = build_ds_config(cfg, plan)
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": False,
                                       "reduce_bucket_size": 1000}
    assert ds["bf16"] == {"enabled": True, "immediate_grad_update": True}
    assert ds["communication_data_type"] == "fp32"
    # restating the plan's value, or "auto", keeps the plan's value
    assert (ds["train_batch_size"], ds["gradient_accumulation_steps"]) == (240, 2)


def test_auto_in_a_block_largebatch_does_not_enable_is_dropped():
    cfg, plan = _cfg_plan()
    ds = merge_ds_config(generate_ds_config(cfg, plan), {"fp16": {"enabled": "auto"}}, cfg, plan)
    assert ds["fp16"] == {}  # DeepSpeed reads a block without 'enabled' as disabled


@pytest.mark.parametrize("key, value, expected", [
    ("train_batch_size", 512,
     "engine.deepspeed_config train_batch_size=512 contradicts the batch plan's global_size 240"),
    ("train_micro_batch_size_per_gpu", 30,
     "engine.deepspeed_config train_micro_batch_size_per_gpu=30 contradicts the batch plan's "
     "micro_size 60"),
    ("gradient_accumulation_steps", 4,
     "engine.deepspeed_config gradient_accumulation_steps=4 contradicts the batch plan's "
     "accum_steps 2"),
    ("train_batch_size", "240",
     "engine.deepspeed_config train_batch_size=\"240\" contradicts the batch plan's "
     "global_size 240"),
])
def test_batch_field_contradiction_names_both_values(tmp_path, key, value, expected):
    path = _user_json(tmp_path, {key: value})
    cfg, plan = _cfg_plan(f"engine.deepspeed_config={path}")
    with pytest.raises(ConfigError) as err:
        build_ds_config(cfg, plan)
    assert str(err.value) == expected


@pytest.mark.parametrize("user, overrides, expected", [
    ({"zero_optimization": {"stage": 2}}, ["engine.zero_stage=1"],
     "engine.deepspeed_config zero_optimization.stage=2 contradicts engine.zero_stage=1"),
    ({"bf16": {"enabled": True}}, [],
     "engine.deepspeed_config bf16.enabled=true contradicts train.precision=fp32"),
    ({"fp16": {"enabled": False}}, ["train.precision=fp16"],
     "engine.deepspeed_config fp16.enabled=false contradicts train.precision=fp16"),
    ({"gradient_clipping": 1.0}, ["optim.grad_clip=0.5"],
     "engine.deepspeed_config gradient_clipping=1.0 contradicts optim.grad_clip=0.5"),
    ({"optimizer": {"type": "Adam"}}, [],
     "engine.deepspeed_config sets 'optimizer'; largebatch builds it from optim.* "
     "(remove the block)"),
    ({"scheduler": {"type": "WarmupLR"}}, [],
     "engine.deepspeed_config sets 'scheduler'; largebatch builds it from schedule.* "
     "(remove the block)"),
])
def test_owned_field_contradictions(tmp_path, user, overrides, expected):
    path = _user_json(tmp_path, user)
    cfg, plan = _cfg_plan(f"engine.deepspeed_config={path}", *overrides)
    with pytest.raises(ConfigError) as err:
        build_ds_config(cfg, plan)
    assert str(err.value) == expected


def test_same_values_restated_are_not_contradictions(tmp_path):
    path = _user_json(tmp_path, {"train_batch_size": 240, "train_micro_batch_size_per_gpu": 60,
                                 "gradient_accumulation_steps": 2,
                                 "zero_optimization": {"stage": 1}, "gradient_clipping": 1,
                                 "bf16": {"enabled": False}})
    cfg, plan = _cfg_plan(f"engine.deepspeed_config={path}", "engine.zero_stage=1",
                          "optim.grad_clip=1.0")
    ds = build_ds_config(cfg, plan)
    assert ds["gradient_clipping"] == 1 and ds["zero_optimization"]["stage"] == 1


@pytest.mark.parametrize("content, fragment", [
    (None, "engine.deepspeed_config: file not found"),
    ("{not json", "is not valid JSON (line 1:"),
    ("[1, 2]", "must hold a JSON object"),
])
def test_unreadable_user_json(tmp_path, content, fragment):
    path = tmp_path / "ds.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as err:
        read_user_config(path)
    assert fragment in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_layerwise_optimizers_only_at_zero_0(name):
    # ZeRO >= 1 hands the client optimizer flat partitions of many tensors: a per-layer trust
    # ratio would silently become a per-partition one (measured: LARS at ZeRO 2 ends 1e-5 off
    # ZeRO 0 after 3 steps). config.validate refuses it before any DeepSpeed config exists.
    cfg, plan = _cfg_plan(f"optim.name={name}", "optim.momentum=0", "engine.zero_stage=0")
    assert build_ds_config(cfg, plan)["zero_optimization"]["stage"] == 0
    with pytest.raises(ConfigError, match=f"optim.name={name} needs whole parameter tensors"):
        _cfg_plan(f"optim.name={name}", "optim.momentum=0", "engine.zero_stage=2")


# ---- the engine takes the run's plan -------------------------------------------------------
def test_deepspeed_engine_takes_the_runs_plan_and_never_rebuilds_it():
    """The batch arithmetic has one source: the plan handed over (here one grown to accum 4,
    which the config alone, accum 2 at world 2, would never give)."""
    import torch

    from largebatch.dist import DistEnv
    from largebatch.engines import build_engine
    from largebatch.engines.deepspeed.engine import DeepSpeedEngine
    cfg, plan = _cfg_plan()
    grown = plan.grown(2)
    assert (plan.accum_steps, grown.accum_steps) == (2, 4)
    denv, cpu = DistEnv("torchrun", rank=0, world_size=2), torch.device("cpu")
    engine = DeepSpeedEngine(denv, cpu, cfg=cfg, plan=grown)
    assert engine.plan is grown
    assert (engine.ds_config["train_batch_size"], engine.ds_config["gradient_accumulation_steps"],
            engine.ds_config["train_micro_batch_size_per_gpu"]) == (480, 4, 60)
    with pytest.raises(TypeError, match="plan"):
        DeepSpeedEngine(denv, cpu, cfg=cfg)  # no default plan to fall back on
    with pytest.raises(ValueError, match="the batch plan is for world_size 2, the launch has 4"):
        DeepSpeedEngine(DistEnv("torchrun", rank=0, world_size=4), cpu, cfg=cfg, plan=plan)
    with pytest.raises(ValueError, match="needs the run's batch plan"):
        build_engine(cfg, denv, cpu)
    assert build_engine(cfg, denv, cpu, plan).plan is plan
