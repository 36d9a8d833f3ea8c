"""The DeepSpeed config: generated from the batch plan, merged with the user's JSON, checked.

largebatch's config is the source of truth for everything it already decides: the three batch
fields come from the ``BatchPlan``, the ZeRO stage from ``engine.zero_stage``, the precision
block from ``train.precision`` and ``gradient_clipping`` from ``optim.grad_clip``. A user JSON
(``engine.deepspeed_config``) may add anything else (bucket sizes, offload, loss scaling, ...);
when it restates one of the owned fields with another value, that is a ``ConfigError`` naming
both values, raised here, before ``deepspeed.initialize`` (whose own batch-size assertion is
DeepSpeed's most reported user error and comes after a slow start-up).

This module imports nothing from DeepSpeed, so configs are checked without paying its import.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Optional

from largebatch.config import Config, ConfigError
from largebatch.plan import BatchPlan

# DeepSpeed batch field -> the BatchPlan attribute it must equal.
BATCH_FIELDS = {"train_batch_size": "global_size",
                "train_micro_batch_size_per_gpu": "micro_size",
                "gradient_accumulation_steps": "accum_steps"}

# Blocks that would hand optimizer or LR schedule to DeepSpeed: largebatch owns both, so the
# recipe behaves the same on every engine.
FORBIDDEN_BLOCKS = {"optimizer": "optim.*", "scheduler": "schedule.*"}

# fp16 defaults: dynamic loss scaling like torch's GradScaler (initial scale 2**16).
_FP16_BLOCK = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}


def generate_ds_config(cfg: Config, plan: BatchPlan) -> dict[str, Any]:
    """The DeepSpeed config largebatch derives from its own config and the batch plan.

    Args:
        cfg: the run configuration (engine.zero_stage, train.precision, optim.grad_clip).
        plan: the validated batch plan; its ``deepspeed_fields()`` are the batch fields.

    Returns:
        A plain dict accepted by ``deepspeed.initialize(config=...)``.
    """
    stage = cfg.engine.zero_stage
    out: dict[str, Any] = dict(plan.deepspeed_fields())
    out["zero_optimization"] = {"stage": stage}
    # largebatch always hands DeepSpeed its own (client) optimizer; at ZeRO >= 1 DeepSpeed
    # refuses any optimizer it has not tested (torch SGD, LARS, LAMB, ...) without this flag.
    if stage >= 1:
        out["zero_allow_untested_optimizer"] = True
    if cfg.train.precision == "bf16":
        out["bf16"] = {"enabled": True}
    elif cfg.train.precision == "fp16":
        out["fp16"] = dict(_FP16_BLOCK)
    out["gradient_clipping"] = float(cfg.optim.grad_clip)
    # largebatch prints its own progress; DeepSpeed's periodic lines would interleave with it.
    out["steps_per_print"] = 2 ** 31 - 1
    out["wall_clock_breakdown"] = False
    return out


def read_user_config(path: str | Path) -> dict[str, Any]:
    """Read the user's DeepSpeed JSON; a missing or malformed file is a one-line ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"engine.deepspeed_config: file not found: {p}")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"engine.deepspeed_config: {p} is not valid JSON (line {exc.lineno}: "
                          f"{exc.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"engine.deepspeed_config: {p} must hold a JSON object")
    return data


def _is_auto(value: Any) -> bool:
    # "auto" (the Hugging Face convention) means "let the framework fill it in".
    return isinstance(value, str) and value == "auto"


def _check_batch_fields(user: dict[str, Any], plan: BatchPlan) -> None:
    for key, attr in BATCH_FIELDS.items():
        if key in user and not _is_auto(user[key]) and user[key] != getattr(plan, attr):
            raise ConfigError(f"engine.deepspeed_config {key}={json.dumps(user[key])} "
                              f"contradicts the batch plan's {attr} {getattr(plan, attr)}")


def _check_owned_fields(user: dict[str, Any], cfg: Config) -> None:
    """ZeRO stage, precision and clipping are set in largebatch's config, not in the JSON."""
    zero = user.get("zero_optimization")
    if isinstance(zero, dict) and "stage" in zero and not _is_auto(zero["stage"]):
        if zero["stage"] != cfg.engine.zero_stage:
            raise ConfigError(f"engine.deepspeed_config zero_optimization.stage={zero['stage']} "
                              f"contradicts engine.zero_stage={cfg.engine.zero_stage}")
    for block in ("bf16", "fp16"):
        section = user.get(block)
        if isinstance(section, dict) and "enabled" in section and not _is_auto(section["enabled"]):
            wanted = cfg.train.precision == block
            if bool(section["enabled"]) != wanted:
                raise ConfigError(f"engine.deepspeed_config {block}.enabled="
                                  f"{json.dumps(section['enabled'])} contradicts "
                                  f"train.precision={cfg.train.precision}")
    clip = user.get("gradient_clipping")
    if clip is not None and not _is_auto(clip) and clip != cfg.optim.grad_clip:
        raise ConfigError(f"engine.deepspeed_config gradient_clipping={clip} contradicts "
                          f"optim.grad_clip={cfg.optim.grad_clip}")
    for block, owner in FORBIDDEN_BLOCKS.items():
        if block in user:
            raise ConfigError(f"engine.deepspeed_config sets '{block}'; largebatch builds "
                              f"it from {owner} (remove the block)")


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` over ``base``; an ``"auto"`` value keeps what ``base`` has (or is dropped)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict):
            current = out.get(key)
            out[key] = _deep_merge(current if isinstance(current, dict) else {}, value)
        elif not _is_auto(value):
            out[key] = copy.deepcopy(value)
    return out


def merge_ds_config(generated: dict[str, Any], user: dict[str, Any], cfg: Config,
                    plan: BatchPlan) -> dict[str, Any]:
    """Merge the user's JSON over the generated config after checking it contradicts nothing.

    Keys the user adds win (e.g. ``zero_optimization.overlap_comm``); keys largebatch owns may
    be restated with the same value or ``"auto"`` only.

    Raises:
        ConfigError: a batch field disagrees with the plan, or an owned field with the config.
    """
    _check_batch_fields(user, plan)
    _check_owned_fields(user, cfg)
    return _deep_merge(generated, user)


def build_ds_config(cfg: Config, plan: BatchPlan,
                    user_path: Optional[str | Path] = None) -> dict[str, Any]:
    """The final DeepSpeed config: generated, then merged with ``engine.deepspeed_config``.

    Args:
        cfg: the run configuration.
        plan: the batch plan of this launch.
        user_path: the user's JSON (default: ``cfg.engine.deepspeed_config``).
    """
    ds = generate_ds_config(cfg, plan)
    path = user_path if user_path is not None else cfg.engine.deepspeed_config
    if path:
        ds = merge_ds_config(ds, read_user_config(path), cfg, plan)
    return ds
