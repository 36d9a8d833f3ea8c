"""Value checks that the types cannot express, in one place; each error names the key and the
value. The allowed names of engines, tasks, datasets and models come from their registries
(``largebatch.registry``), so a registered name is accepted wherever it is checked.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from largebatch.config.io import ConfigError, get_key
from largebatch.config.sections import Config, OptimConfig, PlateauConfig, ScheduleConfig
from largebatch.registry import BY_KEY, ENGINES, TASKS

ADAPT_RULES = ("rank", "timm")  # optim.adapt_rule; param_groups implements both

#: Closed lists of values; the open ones (engine, task, dataset, model names) are registries.
_CHOICES = {
    "data.loader": ("memory", "torch"),
    "face.margin": ("arcface", "cosface", "combined"),
    "optim.name": ("sgd", "adamw", "lars", "lamb"),
    "optim.scale_rule": ("none", "linear", "sqrt"),
    "optim.adapt_rule": ADAPT_RULES,
    "schedule.name": ("constant", "cosine", "step", "poly", "plateau"),
    "schedule.plateau.mode": ("min", "max"),
    "schedule.plateau.threshold_mode": ("rel", "abs"),
    "schedule.plateau.action": ("reduce_lr", "grow_batch"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "train.nonfinite": ("stop", "skip"),
    "engine.backend": ("auto", "gloo", "nccl"),
    "log.wandb.mode": ("disabled", "offline", "online"),
    "batch.adapt": ("none", "goodput"),
}


def validate(cfg: Config) -> None:
    """Value checks that the types cannot express; each error names the key and the value."""
    ck = cfg.checkpoint
    if ck.keep < 1:
        raise ConfigError(f"checkpoint.keep={ck.keep} must be >= 1")
    if ck.every_steps < 0:
        raise ConfigError(f"checkpoint.every_steps={ck.every_steps} must be >= 0")
    if not str(ck.resume).strip():
        raise ConfigError("checkpoint.resume='' must be 'auto', 'never' or a path")
    for key, registry in BY_KEY.items():
        registry.check(get_key(cfg, key))
    for key, allowed in _CHOICES.items():
        value = get_key(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {'|'.join(allowed)}")
    _check_finite(cfg)
    _check_lr(cfg.optim.lr)
    positive = {"train.epochs": cfg.train.epochs,
                "log.every_steps": cfg.log.every_steps, "train.max_loss": cfg.train.max_loss}
    for key, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{key}={value} must be > 0")
    non_negative = {"train.max_steps": cfg.train.max_steps, "data.subset": cfg.data.subset,
                    "data.num_samples": cfg.data.num_samples,
                    "train.eval_every_samples": cfg.train.eval_every_samples,
                    "schedule.warmup_steps": cfg.schedule.warmup_steps,
                    "schedule.warmup_epochs": cfg.schedule.warmup_epochs,
                    "optim.weight_decay": cfg.optim.weight_decay,
                    "optim.grad_clip": cfg.optim.grad_clip,
                    "train.time_budget_s": cfg.train.time_budget_s,
                    "data.test_subset": cfg.data.test_subset,
                    "data.num_workers": cfg.data.num_workers,
                    "engine.expected_world_size": cfg.engine.expected_world_size}
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key}={value} must be >= 0")
    if not 0.0 <= cfg.train.target_acc <= 1.0:
        raise ConfigError(f"train.target_acc={cfg.train.target_acc} must be in [0, 1]")
    if not 0.0 <= cfg.model.dropout < 1.0:  # p = 1 zeroes every feature: nothing to learn
        raise ConfigError(f"model.dropout={cfg.model.dropout} must be in [0, 1)")
    if cfg.engine.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"engine.zero_stage={cfg.engine.zero_stage} is not one of 0|1|2|3")
    if (cfg.optim.name in ("lars", "lamb") and cfg.engine.zero_stage >= 1
            and ENGINES.trait(cfg.engine.name, "partitions_tensors", False)):
        # ZeRO flattens and partitions parameters: a per-tensor trust ratio would be computed
        # per partition, which silently changes the algorithm.
        raise ConfigError(f"optim.name={cfg.optim.name} needs whole parameter tensors; "
                          f"engine.zero_stage={cfg.engine.zero_stage} of engine.name="
                          f"{cfg.engine.name} partitions them (use 0)")
    _check_face(cfg.face)
    _check_applicable(cfg)  # first: "does not apply" says more than a range error would
    _check_batch(cfg)
    _check_optim(cfg.optim)
    check_schedule(cfg.schedule)


#: Float keys where infinity means something ("never"); NaN is refused everywhere.
_INF_ALLOWED = ("train.max_loss",)


def _check_finite(cfg: Config, obj: Any = None, prefix: str = "") -> None:
    """NaN (and, but for _INF_ALLOWED, +-inf) in any float key: every comparison with NaN is
    False, so a range check below would let it through and the run would fail much later."""
    obj = cfg if obj is None else obj
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            _check_finite(cfg, value, key + ".")
        elif isinstance(value, float) and not math.isfinite(value):
            if not (math.isinf(value) and key in _INF_ALLOWED):
                raise ConfigError(f"{key}={value} must be a finite number")


def _check_batch(cfg: Config) -> None:
    """``batch.micro_size`` is an int or 'auto'; the auto search's budget keys."""
    b = cfg.batch
    _check_adapt(cfg)
    if b.memory_budget_mb < 0:
        raise ConfigError(f"batch.memory_budget_mb={b.memory_budget_mb} must be >= 0")
    if not 0.0 < b.memory_fraction <= 1.0:
        raise ConfigError(f"batch.memory_fraction={b.memory_fraction} must be in (0, 1]")
    if not isinstance(b.micro_size, str):
        return
    if b.micro_size != "auto":
        raise ConfigError(f"batch.micro_size={b.micro_size!r} must be a positive integer or "
                          f"'auto'")
    if b.global_size is None:
        raise ConfigError("batch.micro_size=auto needs batch.global_size (the batch it keeps)")
    if b.accum_steps is not None:
        raise ConfigError(f"batch.micro_size=auto derives the accumulation; remove "
                          f"batch.accum_steps={b.accum_steps}")
    if ENGINES.trait(cfg.engine.name, "fixes_batch", False):  # fixed when it is built
        raise ConfigError(f"batch.micro_size=auto is not supported with engine.name="
                          f"{cfg.engine.name}; give batch.micro_size as a number")
    if TASKS.trait(cfg.task.name, "collective_forward", False):  # no local trial step
        raise ConfigError(f"batch.micro_size=auto is not supported with task.name="
                          f"{cfg.task.name}; give batch.micro_size as a number")


def _check_adapt(cfg: Config) -> None:
    """``batch.adapt=goodput``: its keys, and what it cannot be combined with."""
    b = cfg.batch
    if b.adapt_every_steps < 1:
        raise ConfigError(f"batch.adapt_every_steps={b.adapt_every_steps} must be >= 1")
    if b.adapt_max_micro is not None and b.adapt_max_micro < 1:
        raise ConfigError(f"batch.adapt_max_micro={b.adapt_max_micro} must be >= 1")
    if b.adapt != "goodput":
        return
    if ENGINES.trait(cfg.engine.name, "fixes_batch", False):  # fixed when it is built
        raise ConfigError(f"batch.adapt=goodput is not supported with engine.name="
                          f"{cfg.engine.name} (its batch is fixed at init and the noise scale "
                          f"is unavailable)")
    if cfg.data.drop_last:  # a re-cut epoch would count its dropped tail in the new batch
        raise ConfigError("batch.adapt=goodput is not supported with data.drop_last=true")
    if cfg.schedule.name == "plateau" and cfg.schedule.plateau.action == "grow_batch":
        raise ConfigError("batch.adapt=goodput and schedule.plateau.action=grow_batch both "
                          "change the batch; use one")
    micro = b.micro_size if isinstance(b.micro_size, int) else None
    if b.adapt_max_micro is not None and micro is not None and b.adapt_max_micro < micro:
        raise ConfigError(f"batch.adapt_max_micro={b.adapt_max_micro} is smaller than "
                          f"batch.micro_size={micro}")


def _check_face(f: Any) -> None:
    """The face head's keys, checked for every task so that ``largebatch plan`` refuses what
    ``train`` would (the synthetic data's own keys are checked with the data)."""
    if not 0.0 < f.sample_rate <= 1.0:
        raise ConfigError(f"face.sample_rate={f.sample_rate} must be in (0, 1] (the share of "
                          f"each shard's classes sampled per window)")
    for key in ("num_classes", "embedding_size"):
        if getattr(f, key) < 1:
            raise ConfigError(f"face.{key}={getattr(f, key)} must be >= 1")
    if not (f.s > 0 and f.m1 > 0):
        raise ConfigError(f"face.s={f.s} and face.m1={f.m1} must be > 0")
    if not (0.0 <= f.m2 < math.pi and f.m3 >= 0.0):
        raise ConfigError(f"face.m2={f.m2} must be in [0, pi) and face.m3={f.m3} >= 0")


def _check_lr(lr: float | str) -> None:
    """``optim.lr``: a positive number or 'auto' (the range test at run start picks it)."""
    if isinstance(lr, str):
        if lr != "auto":
            raise ConfigError(f"optim.lr: expected a number, got {lr!r} (or 'auto': the LR "
                              f"range test at run start picks the peak LR)")
    elif not lr > 0:
        raise ConfigError(f"optim.lr={lr} must be > 0 (or 'auto')")


def _check_optim(o: OptimConfig) -> None:
    """Value checks of the optim section (which keys apply to which optimizer: below)."""
    if not 0.0 <= o.momentum < 1.0:
        raise ConfigError(f"optim.momentum={o.momentum} must be in [0, 1)")
    if not 0.0 <= o.dampening <= 1.0:
        raise ConfigError(f"optim.dampening={o.dampening} must be in [0, 1]")
    if o.nesterov and (o.momentum <= 0 or o.dampening != 0):  # torch's and timm's condition
        raise ConfigError(f"optim.nesterov=true needs optim.momentum > 0 and optim.dampening=0 "
                          f"(got optim.momentum={o.momentum}, optim.dampening={o.dampening})")
    if o.dampening != 0 and o.momentum == 0:
        raise ConfigError(f"optim.dampening={o.dampening} has no effect with optim.momentum=0")
    if len(o.betas) != 2:
        raise ConfigError(f"optim.betas={o.betas} must have two values")
    if not all(0.0 <= b < 1.0 for b in o.betas):
        raise ConfigError(f"optim.betas={o.betas} must each be in [0, 1)")
    for key in ("eps", "trust_coef", "trust_eps", "max_grad_norm"):
        value = getattr(o, key)
        if value is not None and value < 0:
            raise ConfigError(f"optim.{key}={value} must be >= 0")
    if not o.max_trust > 0:
        raise ConfigError(f"optim.max_trust={o.max_trust} must be > 0")
    if o.max_trust != OptimConfig.max_trust and not o.trust_clip:
        raise ConfigError(f"optim.max_trust={o.max_trust} has no effect without "
                          f"optim.trust_clip=true")


def check_schedule(cfg: ScheduleConfig) -> None:
    """Value checks of the schedule section that the types cannot express (``LRSchedule`` runs
    them too, for sections built in code).

    Raises:
        ConfigError: naming the key and the value.
    """
    if not 0.0 <= cfg.warmup_start_factor <= 1.0:
        raise ConfigError(f"schedule.warmup_start_factor={cfg.warmup_start_factor} must be in "
                          f"[0, 1]")
    if cfg.total_steps < 0:
        raise ConfigError(f"schedule.total_steps={cfg.total_steps} must be >= 0")
    if cfg.min_lr < 0:
        raise ConfigError(f"schedule.min_lr={cfg.min_lr} must be >= 0")
    if cfg.power <= 0:
        raise ConfigError(f"schedule.power={cfg.power} must be > 0")
    if not cfg.gamma > 0:
        raise ConfigError(f"schedule.gamma={cfg.gamma} must be > 0")
    if any(m < 0 for m in cfg.milestones):
        raise ConfigError(f"schedule.milestones={cfg.milestones} must be >= 0 (optimizer steps "
                          f"after warmup)")
    if cfg.name == "step" and not cfg.milestones:
        raise ConfigError("schedule.name=step needs schedule.milestones (optimizer steps after "
                          "warmup), e.g. schedule.milestones=[1000,2000]")
    _check_plateau(cfg.plateau)


def _check_plateau(p: PlateauConfig) -> None:
    if not 0.0 < p.factor < 1.0:
        raise ConfigError(f"schedule.plateau.factor={p.factor} must be in (0, 1)")
    for key, value in (("patience", p.patience), ("cooldown", p.cooldown),
                       ("threshold", p.threshold), ("min_lr", p.min_lr), ("eps", p.eps)):
        if value < 0:
            raise ConfigError(f"schedule.plateau.{key}={value} must be >= 0")


# Which optimizer / schedule reads each key (key -> (selecting key, the names that read it)).
# Keys not listed apply to every choice. A listed key set to anything but its default under
# another choice would be silently ignored, so validate() refuses it.
_APPLIES_TO: dict[str, tuple[str, tuple[str, ...]]] = {
    "optim.momentum": ("optim.name", ("sgd", "lars")),
    "optim.dampening": ("optim.name", ("sgd", "lars")),
    "optim.nesterov": ("optim.name", ("sgd", "lars")),
    "optim.betas": ("optim.name", ("adamw", "lamb")),
    "optim.eps": ("optim.name", ("adamw", "lamb")),
    "optim.trust_coef": ("optim.name", ("lars",)),
    "optim.trust_eps": ("optim.name", ("lars",)),
    "optim.trust_clip": ("optim.name", ("lars", "lamb")),
    "optim.max_trust": ("optim.name", ("lamb",)),
    "optim.always_adapt": ("optim.name", ("lars", "lamb")),
    "optim.adapt_rule": ("optim.name", ("lars", "lamb")),
    "optim.max_grad_norm": ("optim.name", ("lamb",)),
    "optim.bias_correction": ("optim.name", ("lamb",)),
    "optim.grad_averaging": ("optim.name", ("lamb",)),
    "optim.decoupled_decay": ("optim.name", ("lamb",)),
    "optim.fused": ("optim.name", ("lars", "lamb")),
    "schedule.milestones": ("schedule.name", ("step",)),
    "schedule.gamma": ("schedule.name", ("step",)),
    "schedule.power": ("schedule.name", ("poly",)),
    "schedule.min_lr": ("schedule.name", ("cosine", "poly")),
    "schedule.total_steps": ("schedule.name", ("cosine", "poly")),
    **{f"schedule.plateau.{f.name}": ("schedule.name", ("plateau",))
       for f in dataclasses.fields(PlateauConfig)},
}


def _check_applicable(cfg: Config) -> None:
    """A key the chosen optimizer/schedule does not read must be at its default."""
    defaults = Config()
    for key, (selector, names) in _APPLIES_TO.items():
        chosen, value, default = get_key(cfg, selector), get_key(cfg, key), get_key(defaults, key)
        if chosen not in names and value != default:
            raise ConfigError(f"{key}={_show(value)} does not apply to {selector}={chosen} "
                              f"(only to {'|'.join(names)}); remove it or set it back to "
                              f"{_show(default)}")


def _show(value: Any) -> str:
    """A value as a user types it on the command line: true, null, [1, 2], timm."""
    return value if isinstance(value, str) else json.dumps(value)


def choices() -> dict[str, tuple[str, ...]]:
    """Every key with a list of allowed values: the registries' names and the closed lists
    (what ``largebatch keys`` shows)."""
    return {**{key: registry.names() for key, registry in BY_KEY.items()}, **_CHOICES}
