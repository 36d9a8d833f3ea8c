"""Typed configuration: one dataclass per section, YAML files, dotted CLI overrides.

Precedence is CLI > file > defaults. Unknown keys and wrong types are errors that name the
key (``ConfigError``; the CLI turns it into one line and exit code 2). Each field carries its
docstring in ``metadata["doc"]`` so ``largebatch`` can print what a key means.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from largebatch.config_io import (ConfigError, deep_merge, from_dict, get_key,
                                  merge_overrides, parse_override, read_yaml, to_dict)
from largebatch.config_io import describe as _describe

__all__ = ["Config", "ConfigError", "describe", "from_dict", "get_key", "load_config",
           "merge_overrides", "parse_override", "read_yaml", "to_dict", "validate"]


def doc(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its documentation attached (the per-field docstring)."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


@dataclass
class DataConfig:
    """Where the data comes from and how it is cut into batches."""

    name: str = doc("Dataset name: 'mnist'.", "mnist")
    root: str = doc("Dataset root in torchvision layout (MNIST/raw/...).", "data")
    download: bool = doc("Download with torchvision when the files are missing.", True)
    loader: str = doc("'memory' (whole split as one tensor, sliced by index) or 'torch' "
                      "(DataLoader + ToTensor + Normalize, the original study's path).", "memory")
    subset: int = doc("Use only the first N training samples (0 = all).", 0)
    test_subset: int = doc("Use only the first N test samples (0 = all).", 0)
    drop_last: bool = doc("Drop the tail that does not fill a whole per-rank shard/micro-batch "
                          "instead of padding the shard (DistributedSampler semantics).", False)
    num_workers: int = doc("DataLoader workers for loader='torch'.", 0)
    on_device: bool = doc("Keep the in-memory split on the training device (GPU).", True)


@dataclass
class ModelConfig:
    """Which network to train."""

    name: str = doc("'seed_cnn' (the classic PyTorch MNIST net) or 'mlp' (no dropout).", "seed_cnn")
    hidden: int = doc("Hidden width of the 'mlp' model.", 64)


@dataclass
class BatchConfig:
    """The batch arithmetic: global = micro x accum x world. Give any two of the three."""

    global_size: Optional[int] = doc("Samples per optimizer step, over all ranks.", None)
    micro_size: Optional[int] = doc("Samples per forward/backward on one rank.", None)
    accum_steps: Optional[int] = doc("Micro-batches accumulated per optimizer step.", None)
    max_global_size: Optional[int] = doc("Upper bound for batch growth on plateau.", None)


@dataclass
class OptimConfig:
    """Optimizer and learning-rate scaling."""

    name: str = doc("'sgd', 'adamw', 'lars' or 'lamb'.", "sgd")
    lr: float = doc("Learning rate at optim.base_batch (the unscaled base LR).", 0.02)
    momentum: float = doc("Momentum (SGD, LARS).", 0.0)
    nesterov: bool = doc("Nesterov momentum (SGD).", False)
    weight_decay: float = doc("Weight decay (decoupled for AdamW/LAMB, L2 for SGD/LARS).", 0.0)
    betas: list[float] = doc("Adam betas (AdamW, LAMB).", factory=lambda: [0.9, 0.999])
    eps: float = doc("Adam epsilon (AdamW, LAMB).", 1e-8)
    scale_rule: str = doc("'none', 'linear' (Goyal et al. 2017) or 'sqrt'.", "none")
    base_batch: Optional[int] = doc("Global batch at which optim.lr holds (default: the global batch).",
                                    None)
    trust_coef: float = doc("LARS eta, the trust coefficient.", 0.001)
    trust_eps: float = doc("Epsilon in the LARS/LAMB trust ratio denominator.", 1e-8)
    trust_clip: bool = doc("Clip the trust ratio (LARC: ratio/lr <= 1; LAMB: ratio <= 10).", False)
    always_adapt: bool = doc("LARS: adapt even the parameters excluded from weight decay.", False)
    exclude_1d: bool = doc("1-D params (biases, norms) get no weight decay nor adaptation.", True)
    grad_clip: float = doc("Clip the global gradient norm to this value (0 = off).", 0.0)
    fused: bool = doc("LARS/LAMB: compile the step with torch.compile (fast on CPU).", False)


@dataclass
class PlateauConfig:
    """ReduceLROnPlateau semantics (torch's), stepped once per evaluation."""

    mode: str = doc("'min' or 'max'.", "min")
    metric: str = doc("'val_loss' or 'val_acc'.", "val_loss")
    factor: float = doc("Multiply the LR by this on a plateau.", 0.1)
    patience: int = doc("Evaluations without improvement before acting.", 10)
    threshold: float = doc("Improvement threshold.", 1e-4)
    threshold_mode: str = doc("'rel' or 'abs'.", "rel")
    cooldown: int = doc("Evaluations to wait after acting.", 0)
    min_lr: float = doc("Lower bound on the LR.", 0.0)
    eps: float = doc("LR changes smaller than this are ignored.", 1e-8)
    action: str = doc("'reduce_lr' or 'grow_batch' (Smith et al. 2018).", "reduce_lr")


@dataclass
class ScheduleConfig:
    """Warmup plus the main schedule, stepped once per optimizer step."""

    name: str = doc("'constant', 'cosine', 'step', 'poly' or 'plateau'.", "constant")
    warmup_steps: int = doc("Linear warmup length in optimizer steps.", 0)
    warmup_epochs: float = doc("Warmup length in epochs (converted with the batch plan).", 0.0)
    warmup_start_factor: float = doc("Warmup starts at this fraction of the peak LR.", 0.0)
    milestones: list[int] = doc("'step': optimizer steps (after warmup) at which to decay.",
                                factory=list)
    gamma: float = doc("'step': decay factor at each milestone.", 0.1)
    power: float = doc("'poly': exponent of (1 - t/T).", 2.0)
    min_lr: float = doc("Floor of cosine/poly decay.", 0.0)
    total_steps: int = doc("Length of cosine/poly decay incl. warmup (0 = from train.epochs).", 0)
    plateau: PlateauConfig = doc("ReduceLROnPlateau settings.", factory=PlateauConfig)


@dataclass
class TrainConfig:
    """How long to train and when to evaluate."""

    epochs: float = doc("Epochs to train (fractions allowed).", 1.0)
    max_steps: int = doc("Stop after this many optimizer steps (0 = no limit).", 0)
    seed: int = doc("Seed for init, data order and dropout (per-rank offset for dropout).", 1)
    target_acc: float = doc("Test accuracy target (0 = none).", 0.0)
    stop_at_target: bool = doc("Stop once train.target_acc is reached.", False)
    eval_every_samples: int = doc("Evaluate every N training samples (0 = each epoch end).", 0)
    time_budget_s: float = doc("Stop when training time exceeds this (0 = none).", 0.0)
    device: str = doc("'auto', 'cpu' or 'cuda'.", "auto")
    precision: str = doc("'fp32', 'bf16' or 'fp16' (autocast).", "fp32")
    max_loss: float = doc("A training loss above this (or non-finite) counts as divergence.", 1e4)


@dataclass
class EngineConfig:
    """Which distributed engine runs the model."""

    name: str = doc("'auto' (ddp when launched with several ranks), 'single', 'ddp', 'deepspeed'.",
                    "auto")
    backend: str = doc("Process-group backend: 'auto' (nccl on CUDA, gloo on CPU), 'gloo', 'nccl'.",
                       "auto")
    zero_stage: int = doc("DeepSpeed ZeRO stage (0-3).", 0)
    deepspeed_config: Optional[str] = doc("A DeepSpeed JSON merged into the generated one.", None)
    expected_world_size: int = doc("Fail unless the launch has this many ranks (0 = any).", 0)


@dataclass
class WandbConfig:
    """Weights & Biases logging."""

    mode: str = doc("'disabled', 'offline' or 'online'.", "disabled")
    project: str = doc("wandb project.", "largebatch")
    entity: Optional[str] = doc("wandb entity (team).", None)
    name: Optional[str] = doc("Run name.", None)


@dataclass
class LogConfig:
    """Where results go."""

    out_dir: str = doc("Output directory (metrics.jsonl, summary.json, plan.json).", "runs/latest")
    every_steps: int = doc("Log the training loss every N optimizer steps.", 1)
    progress: bool = doc("Show a tqdm progress bar on rank 0.", True)
    wandb: WandbConfig = doc("Weights & Biases settings.", factory=WandbConfig)


@dataclass
class CheckpointConfig:
    """Checkpoints (atomic writes, weights_only loads)."""

    dir: Optional[str] = doc("Checkpoint directory (default: log.out_dir/checkpoints).", None)
    every_steps: int = doc("Save every N optimizer steps (0 = only at the end / on signal).", 0)
    resume: bool = doc("Resume from the latest checkpoint in checkpoint.dir if present.", False)


@dataclass
class ArmConfig:
    """One recipe of the study: a config file and/or overrides applied over the study config."""

    name: str = doc("Arm name shown in the report.", "seed")
    config: Optional[str] = doc("Config file for this arm (relative to the study config).", None)
    overrides: list[str] = doc("key=value overrides for this arm.", factory=list)


@dataclass
class StudyConfig:
    """The batch-size study sweep."""

    batch_sizes: list[int] = doc("Global batch sizes to sweep.", factory=lambda: [1, 6, 60, 600, 6000])
    arms: list[ArmConfig] = doc("Recipes to run over the sweep.", factory=lambda: [ArmConfig()])
    loaders: list[str] = doc("Loaders whose epoch time is measured.",
                             factory=lambda: ["torch", "memory"])
    max_epochs: float = doc("Epoch cap per (arm, batch size).", 20.0)
    budget_s: float = doc("Training-time cap per (arm, batch size).", 300.0)
    loss_iters: int = doc("Iterations of per-step loss kept for the oscillation figure.", 1000)
    quick: bool = doc("A small, fast study (data subset, fewer batch sizes, few epochs).", False)


@dataclass
class Config:
    """The whole run configuration."""

    data: DataConfig = doc("Data.", factory=DataConfig)
    model: ModelConfig = doc("Model.", factory=ModelConfig)
    batch: BatchConfig = doc("Batch plan inputs.", factory=BatchConfig)
    optim: OptimConfig = doc("Optimizer.", factory=OptimConfig)
    schedule: ScheduleConfig = doc("LR schedule.", factory=ScheduleConfig)
    train: TrainConfig = doc("Training.", factory=TrainConfig)
    engine: EngineConfig = doc("Engine.", factory=EngineConfig)
    log: LogConfig = doc("Logging.", factory=LogConfig)
    checkpoint: CheckpointConfig = doc("Checkpointing.", factory=CheckpointConfig)
    study: StudyConfig = doc("Study sweep.", factory=StudyConfig)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> Config:
    """Defaults, then ``base`` (raw mapping), then the YAML file, then CLI overrides."""
    data: dict = dict(base or {})
    if path is not None:
        data = deep_merge(data, read_yaml(path))
    data = merge_overrides(data, overrides or [])
    cfg = from_dict(Config, data)
    validate(cfg)
    return cfg


_CHOICES = {
    "data.name": ("mnist",),
    "data.loader": ("memory", "torch"),
    "model.name": ("seed_cnn", "mlp"),
    "optim.name": ("sgd", "adamw", "lars", "lamb"),
    "optim.scale_rule": ("none", "linear", "sqrt"),
    "schedule.name": ("constant", "cosine", "step", "poly", "plateau"),
    "schedule.plateau.mode": ("min", "max"),
    "schedule.plateau.metric": ("val_loss", "val_acc"),
    "schedule.plateau.threshold_mode": ("rel", "abs"),
    "schedule.plateau.action": ("reduce_lr", "grow_batch"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "engine.name": ("auto", "single", "ddp", "deepspeed"),
    "engine.backend": ("auto", "gloo", "nccl"),
    "log.wandb.mode": ("disabled", "offline", "online"),
}


def validate(cfg: Config) -> None:
    """Value checks that the types cannot express; each error names the key and the value."""
    for key, choices in _CHOICES.items():
        value = get_key(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {'|'.join(choices)}")
    positive = {"optim.lr": cfg.optim.lr, "train.epochs": cfg.train.epochs,
                "log.every_steps": cfg.log.every_steps}
    for key, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{key}={value} must be > 0")
    non_negative = {"train.max_steps": cfg.train.max_steps, "data.subset": cfg.data.subset,
                    "train.eval_every_samples": cfg.train.eval_every_samples,
                    "schedule.warmup_steps": cfg.schedule.warmup_steps,
                    "schedule.warmup_epochs": cfg.schedule.warmup_epochs,
                    "optim.weight_decay": cfg.optim.weight_decay,
                    "optim.grad_clip": cfg.optim.grad_clip,
                    "train.time_budget_s": cfg.train.time_budget_s}
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key}={value} must be >= 0")
    if not 0.0 <= cfg.train.target_acc <= 1.0:
        raise ConfigError(f"train.target_acc={cfg.train.target_acc} must be in [0, 1]")
    if not 0.0 <= cfg.optim.momentum < 1.0:
        raise ConfigError(f"optim.momentum={cfg.optim.momentum} must be in [0, 1)")
    if not 0.0 < cfg.schedule.plateau.factor < 1.0:
        raise ConfigError(f"schedule.plateau.factor={cfg.schedule.plateau.factor} must be in (0, 1)")
    if cfg.engine.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"engine.zero_stage={cfg.engine.zero_stage} is not one of 0|1|2|3")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas={cfg.optim.betas} must have two values")
    if (cfg.optim.name in ("lars", "lamb") and cfg.engine.name == "deepspeed"
            and cfg.engine.zero_stage >= 1):
        # ZeRO flattens and partitions parameters: a per-tensor trust ratio would be computed
        # per partition, which silently changes the algorithm.
        raise ConfigError(f"optim.name={cfg.optim.name} needs whole parameter tensors; "
                          f"engine.zero_stage={cfg.engine.zero_stage} partitions them (use 0)")
    from largebatch.optim.schedules import check_schedule  # local: schedules imports config
    check_schedule(cfg.schedule)


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(key, default, doc) for every leaf key: the reference ``largebatch keys`` prints."""
    return _describe(cls, prefix)
