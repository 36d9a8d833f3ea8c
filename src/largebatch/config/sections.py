"""The config sections: one dataclass per section, each field with its documentation.

``largebatch.config`` loads, merges and validates them (and re-exports every section). Each
field carries its docstring in ``metadata["doc"]`` so ``largebatch keys`` can print what a key
means; defaults that read the environment are resolved when a config is built.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional


def doc(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its documentation attached (the per-field docstring)."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


@dataclass
class DataConfig:
    """Where the data comes from and how it is cut into batches."""

    name: str = doc("Dataset name: 'mnist'; face (task.name=face): 'synthetic_faces' (generated), "
                    "'recordio' (insightface train.rec + train.idx in data.root) or "
                    "'imagefolder' (data.root/<identity>/<image>).", "mnist")
    # Read when the config is built (not at import), so a launcher or CI job that exports the
    # variable reaches every config that does not name a root itself.
    root: str = doc("Dataset root in torchvision layout (MNIST/raw/...), relative to the working "
                    "directory. Default: $LARGEBATCH_DATA_ROOT when set, else 'data'.",
                    factory=lambda: os.environ.get("LARGEBATCH_DATA_ROOT") or "data")
    download: bool = doc("Download with torchvision when the files are missing. In a launched "
                         "job one process writes: rank 0, then the local rank 0 of any node "
                         "that still lacks the files; the other ranks wait for it.", True)
    mirror: str = doc("Base URL of an MNIST mirror holding the four .gz files (e.g. an offline or "
                      "in-house HTTP server), tried instead of torchvision's mirrors. Default: "
                      "$LARGEBATCH_MNIST_MIRROR when set, else '' (torchvision's).",
                      factory=lambda: os.environ.get("LARGEBATCH_MNIST_MIRROR", ""))
    loader: str = doc("'memory' (whole split as one tensor, sliced by index) or 'torch' "
                      "(DataLoader + ToTensor + Normalize, the original study's path).", "memory")
    num_samples: int = doc("recordio/imagefolder: the training set's image count, so that "
                           "`largebatch plan` works without the files (0 = count them; when "
                           "the files are there they must agree).", 0)
    subset: int = doc("Use only the first N training samples (0 = all).", 0)
    test_subset: int = doc("Use only the first N test samples (0 = all).", 0)
    drop_last: bool = doc("true: every optimizer step is a full global batch; an epoch is "
                          "N // batch.global_size steps and the remaining samples (others each "
                          "epoch, the order is reshuffled) are not used. false: each rank's shard "
                          "is padded to ceil(N / world) by repeating samples (DistributedSampler) "
                          "and the last step of an epoch may be a short, exactly weighted window.",
                          False)
    num_workers: int = doc("DataLoader workers for loader='torch'.", 0)
    on_device: bool = doc("Keep the in-memory split on the training device (GPU).", True)


@dataclass
class TaskConfig:
    """What is trained and how it is scored (the trainer itself knows neither)."""

    name: str = doc("'classification' (log-softmax net + NLL; metrics val_acc, val_loss).",
                    "classification")


@dataclass
class FaceConfig:
    """Face recognition (task.name=face): the Partial FC head and the synthetic identities."""

    num_classes: int = doc("Identities C the head classifies (sharded by class over ranks).", 300)
    embedding_size: int = doc("Embedding dimension d of the backbone and the class centres "
                              "(insightface's 512).", 512)
    sample_rate: float = doc("Partial FC: share r of each shard's classes used per window "
                             "(0 < r <= 1; every class present in the window is kept).", 1.0)
    margin: str = doc("'arcface' (m2), 'cosface' (m3) or 'combined' (m1, m2, m3).", "arcface")
    s: float = doc("Logit scale of the margin softmax.", 64.0)
    m1: float = doc("Multiplicative angular margin (combined only; 1 = none).", 1.0)
    m2: float = doc("Additive angular margin (arcface, combined).", 0.5)
    m3: float = doc("Additive cosine margin (cosface, combined).", 0.4)
    sparse_update: bool = doc("Momentum and weight decay touch only the window's sampled rows.",
                              True)
    val_targets: list[str] = doc("Verification sets evaluated at the task's cadence, each "
                                 "'{face.val_root}/{name}.bin' in insightface's format (e.g. "
                                 "lfw, cfp_fp, agedb_30).", factory=list)
    val_root: str = doc("Folder of the .bin verification sets ('' = data.root).", "")
    samples_per_class: int = doc("synthetic_faces: training samples of identity 0 (of every "
                                 "identity when face.long_tail=0).", 20)
    long_tail: float = doc("synthetic_faces: identity c has max(face.min_samples_per_class, "
                           "round(samples_per_class * (c+1)^-long_tail)) samples (0 = uniform).",
                           0.0)
    min_samples_per_class: int = doc("synthetic_faces: floor of the long-tailed class sizes "
                                     "(unused when face.long_tail=0).", 1)
    latent_dim: int = doc("synthetic_faces: dimension of each identity's latent code.", 16)
    eval_identities: int = doc("synthetic_faces: held-out identities of the verification set.",
                               100)
    eval_pairs: int = doc("synthetic_faces: verification pairs (half of the same identity).", 600)
    noise: float = doc("synthetic_faces: std of the per-sample pixel noise.", 0.5)
    shift: int = doc("synthetic_faces: random shifts of up to +-shift pixels (edge replicated).",
                     1)
    jitter: float = doc("synthetic_faces: colour jitter, per-channel gain 1+-jitter and bias "
                        "+-jitter (uniform).", 0.1)
    flip: bool = doc("synthetic_faces: random horizontal flips (probability 1/2).", True)
    image_size: int = doc("synthetic_faces: images are 3 x image_size x image_size.", 16)


@dataclass
class ModelConfig:
    """Which network to train."""

    name: str = doc("'seed_cnn' (the classic PyTorch MNIST net), 'mlp' (no dropout); face "
                    "backbones (task.name=face): 'tiny_face' (CPU tests) or 'iresnet18|34|50|100|"
                    "200' (arcface's IResNet, 112x112 input).", "seed_cnn")
    hidden: int = doc("Hidden width of the 'mlp' model (tiny_face: 4 x its channels).", 64)
    dropout: float = doc("Face backbones: dropout before the embedding FC (arcface: 0; 0.4 "
                         "for small datasets).", 0.0)
    channels_last: bool = doc("Face backbones: run the convolutions in channels-last memory "
                              "format (faster with bf16/fp16 on tensor cores).", False)
    sync_bn: bool = doc("Face backbones: convert BatchNorm to SyncBatchNorm under DDP (CUDA "
                        "only: torch has no CPU SyncBatchNorm).", False)


@dataclass
class BatchConfig:
    """The batch arithmetic: global = micro x accum x world. Give any two of the three."""

    global_size: Optional[int] = doc("Samples per optimizer step, over all ranks.", None)
    micro_size: Optional[int | str] = doc("Samples per forward/backward on one rank, or 'auto': "
                                          "the largest divisor of global_size / world that "
                                          "fits the device (trial steps at run start; cached "
                                          "in log.out_dir/micro_size_cache.json).", None)
    accum_steps: Optional[int] = doc("Micro-batches accumulated per optimizer step.", None)
    max_global_size: Optional[int] = doc("Upper bound for batch growth on plateau.", None)
    memory_budget_mb: float = doc("micro_size=auto: MiB one step may hold (parameters, "
                                  "gradients, optimizer state, saved activations, batch). "
                                  "The limit on CPU (0 = none: the largest candidate); on "
                                  "CUDA an extra cap (0 = only memory_fraction).", 0.0)
    memory_fraction: float = doc("micro_size=auto on CUDA: the share of the device's memory "
                                 "a trial step's peak may reach (safety margin).", 0.9)
    adapt: str = doc("'none' or 'goodput': every batch.adapt_every_steps steps, choose the "
                     "global batch that maximises throughput x statistical efficiency from the "
                     "live noise scale (largebatch.policies.goodput); the LR follows "
                     "optim.scale_rule.", "none")
    adapt_every_steps: int = doc("batch.adapt=goodput: optimizer steps between decisions (and "
                                 "at every epoch start).", 50)
    adapt_max_micro: Optional[int] = doc("batch.adapt=goodput: the largest micro batch it may "
                                         "choose (the user's statement of what fits; null = "
                                         "keep the configured micro size, adapt through "
                                         "accumulation only). Needs a loader that can re-cut "
                                         "its micro-batches (data.loader=memory).", None)


@dataclass
class OptimConfig:
    """Optimizer and learning-rate scaling.

    Each optimizer reads only some keys (``_APPLIES_TO`` below): a key another optimizer reads,
    set to anything but its default, is an error. LARS/LAMB keys have timm's meaning and
    default (``timm.optim.Lars``/``Lamb``), except ``optim.adapt_rule`` (largebatch's rule).
    """

    name: str = doc("'sgd', 'adamw', 'lars' or 'lamb'.", "sgd")
    lr: float | str = doc("Learning rate at optim.base_batch (the unscaled base LR), or 'auto': "
                          "an LR range test at the planned global batch picks the peak LR "
                          "(and, when no warmup is set, the warmup) at run start "
                          "(largebatch.tune.lr_auto; a resumed run keeps the LR it found).",
                          0.02)
    momentum: float = doc("Momentum (SGD, LARS).", 0.0)
    dampening: float = doc("Momentum dampening (SGD, LARS; torch's and timm's meaning): after a "
                           "tensor's first step buf = momentum * buf + (1 - dampening) * d.", 0.0)
    nesterov: bool = doc("Nesterov momentum (SGD, LARS): step along d + momentum * buf; needs "
                         "optim.momentum > 0 and optim.dampening = 0.", False)
    weight_decay: float = doc("Weight decay: L2 added to the gradient for SGD/LARS, decoupled for "
                              "AdamW; LAMB adds wd * w to the Adam direction before the trust "
                              "ratio (timm's default, see optim.decoupled_decay).", 0.0)
    betas: list[float] = doc("Adam betas (AdamW, LAMB).", factory=lambda: [0.9, 0.999])
    eps: Optional[float] = doc("Adam epsilon (AdamW, LAMB), added to sqrt(v_hat); null = the "
                               "optimizer's own default: 1e-8 for AdamW (torch's), 1e-6 for "
                               "LAMB (timm's).", None)
    scale_rule: str = doc("'none', 'linear' (Goyal et al. 2017) or 'sqrt'.", "none")
    base_batch: Optional[int] = doc("Global batch at which optim.lr holds (default: the global batch).",
                                    None)
    trust_coef: float = doc("LARS eta, the trust coefficient (timm's trust_coeff).", 0.001)
    trust_eps: float = doc("LARS: epsilon in the trust ratio's denominator (timm's Lars eps); "
                           "LAMB's ratio has none.", 1e-8)
    trust_clip: bool = doc("Clip the trust ratio (timm's trust_clip). LARS: LARC, "
                           "min(ratio / lr, 1), so a tensor's LR never exceeds optim.lr's; "
                           "LAMB: LAMBC, min(ratio, optim.max_trust) = min(ratio, 1).", False)
    max_trust: float = doc("LAMB: the trust ratio's bound under optim.trust_clip (1.0: timm's "
                           "LAMBC; NVIDIA's BERT recipe uses 10).", 1.0)
    always_adapt: bool = doc("LARS, LAMB: apply the trust ratio to every tensor, also those "
                             "optim.adapt_rule leaves out (timm's always_adapt).", False)
    adapt_rule: str = doc("LARS, LAMB: which tensors get the trust ratio. 'rank' (largebatch): "
                          "all but the ones excluded from decay (1-D with optim.exclude_1d, "
                          "names the model lists), whatever optim.weight_decay is; 'timm': "
                          "only tensors whose group has weight decay != 0 (timm's rule: with "
                          "optim.weight_decay=0 nothing is adapted, LARS/LAMB become "
                          "SGD/Adam).", "rank")
    exclude_1d: bool = doc("1-D params (biases, norms) get no weight decay nor adaptation.", True)
    max_grad_norm: float = doc("LAMB: divide all gradients by max(1, ||g|| / max_grad_norm), the "
                               "global L2 norm over all parameters, before the moments; .grad is "
                               "untouched (timm's max_grad_norm, default 1.0; 0 = off). "
                               "Separate from optim.grad_clip (the engine's).", 1.0)
    bias_correction: bool = doc("LAMB: divide the moments by 1 - beta**t (timm's "
                                "bias_correction).", True)
    grad_averaging: bool = doc("LAMB: m = b1 * m + (1 - b1) * g; false: m = b1 * m + g (timm's "
                               "grad_averaging).", True)
    decoupled_decay: bool = doc("LAMB: shrink the weights by lr * weight_decay directly, outside "
                                "the trust ratio, instead of adding wd * w to the direction it "
                                "scales (timm's decoupled_decay).", False)
    grad_clip: float = doc("Clip the global gradient norm to this value (0 = off).", 0.0)
    fused: bool = doc("LARS/LAMB: compile the step with torch.compile (fast on CPU).", False)


@dataclass
class PlateauConfig:
    """ReduceLROnPlateau semantics (torch's), stepped once per evaluation."""

    mode: str = doc("'min' or 'max'.", "min")
    metric: str = doc("A metric of the task (classification: 'val_loss' or 'val_acc'); "
                      "schedule.plateau.mode must be its direction.", "val_loss")
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
    seed: int = doc("Seed for init, data order and dropout (each rank's dropout stream is "
                    "derived from (seed, rank)).", 1)
    target_acc: float = doc("Target value of train.target_metric (0 = none): reached when the "
                            "metric is at least this (or at most, for a metric where smaller is "
                            "better).", 0.0)
    target_metric: str = doc("Metric the target follows ('' = the task's primary metric: "
                             "val_acc for classification).", "")
    stop_at_target: bool = doc("Stop once train.target_acc is reached.", False)
    eval_every_samples: int = doc("Evaluate every N training samples (0 = each epoch end).", 0)
    time_budget_s: float = doc("Stop when training time exceeds this (0 = none).", 0.0)
    device: str = doc("'auto', 'cpu' or 'cuda'.", "auto")
    precision: str = doc("'fp32', 'bf16' or 'fp16' (autocast).", "fp32")
    max_loss: float = doc("A training loss above this counts as divergence.", 1e4)
    nonfinite: str = doc("A non-finite loss or gradient on any rank: 'stop' (end with a set of "
                         "the last good step) or 'skip' (drop the update on every rank, count "
                         "it in skipped_steps).", "stop")
    noise_scale: bool = doc("Measure the gradient noise scale B_simple = tr(Sigma)/|G|^2 "
                            "(McCandlish et al. 2018) live from each rank's pre-reduction and "
                            "the global gradient (one process: the window's micro-batches); "
                            "logs noise_scale, grad_sq_norm, grad_trace_cov and critical_batch "
                            "(EMA estimates) per step in the train records, their last values "
                            "in summary.json. Needs accumulation on one process; unavailable "
                            "with DeepSpeed.", False)


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
    grad_norm: bool = doc("Measure the global gradient norm every step when not clipping "
                          "(always measured when optim.grad_clip > 0).", True)
    progress: bool = doc("Rank 0 shows the run: a line every log.every_steps and one per "
                         "evaluation (a progress bar above them on a terminal; plain lines, no "
                         "carriage returns, in a log file).", True)
    tensorboard: bool = doc("Also write TensorBoard scalars to log.out_dir/tensorboard (every "
                            "numeric field of the train, eval and plan records).", False)
    wandb: WandbConfig = doc("Weights & Biases settings.", factory=WandbConfig)


@dataclass
class CheckpointConfig:
    """Checkpoint sets: one directory per step, published atomically, sha256-verified."""

    dir: Optional[str] = doc("Directory of the checkpoint sets (default: log.out_dir/checkpoints). "
                             "Every rank writes into it: across nodes it must be a shared "
                             "filesystem.", None)
    every_steps: int = doc("Also write a set every N optimizer steps (0 = only on SIGTERM/"
                           "SIGUSR1 and the final set at the end).", 0)
    keep: int = doc("Complete sets kept; older ones are removed only once a newer set is "
                    "complete.", 2)
    resume: str = doc(
        "'auto' (default): continue from the newest complete set in checkpoint.dir, if any (a "
        "corrupt newest set is named on stderr and the previous one used); a finished run "
        "exits 0 at once; a set written with another config (beyond paths, logging, "
        "train.epochs/max_steps/time_budget_s) is refused. 'never': start from scratch; "
        "refused while checkpoint.dir holds an earlier run's sets; with neither checkpoint.dir "
        "nor every_steps set it also writes nothing (SIGTERM/SIGUSR1 then simply end the "
        "process). PATH: a set directory, or a directory of sets (its newest), to start from "
        "while checkpoint.dir has no set of its own; after that 'auto' applies (a requeued job "
        "continues its own sets).", "auto")


@dataclass
class ArmConfig:
    """One recipe of the study: a config file and/or overrides applied over the study config."""

    name: str = doc("Arm name shown in the report.", "seed")
    config: Optional[str] = doc("Config file for this arm (relative to the study config).", None)
    overrides: list[str] = doc("key=value overrides for this arm.", factory=list)
    sizes: str = doc("Batch sizes of the sweep this arm runs: 'all', 'smallest' (e.g. an "
                     "adaptive batch started there) or 'largest' (e.g. a head variant).", "all")


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
    noise_scale: bool = doc("Measure B_simple (train.noise_scale) in the convergence runs; on "
                            "one process batch B >= 2 then runs as micro B/p x accum p (p: "
                            "the smallest prime factor of B; the global batch unchanged). The "
                            "timing passes stay micro B x accum 1.", True)
    quick: bool = doc("A small, fast study (data subset, fewer batch sizes, few epochs).", False)
    quick_overrides: list[str] = doc("key=value overrides applied under study.quick=true, "
                                     "over the study file and under the command line (e.g. "
                                     "fewer identities for the face study).", factory=list)
    stop_at_target: bool = doc("Stop a convergence run when it reaches train.target_acc; "
                               "false: every run trains its whole epoch budget (same epochs "
                               "per arm) and the target is only recorded.", True)
    max_micro: Optional[int] = doc("Largest micro batch of a run (null: the whole batch); a "
                                   "larger batch accumulates micro-batches of at most this "
                                   "size, as the plan's micro sizes allow.", None)


@dataclass
class Config:
    """The whole run configuration."""

    task: TaskConfig = doc("Task.", factory=TaskConfig)
    face: FaceConfig = doc("Face recognition (task.name=face).", factory=FaceConfig)
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
