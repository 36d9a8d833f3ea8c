"""The batch plan: the one place where global = micro x accum x world is computed and checked.

Everything that depends on the batch — steps per epoch, the scaled learning rate, warmup in
steps, DeepSpeed's batch fields, batch growth on plateau — derives from a ``BatchPlan``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

from largebatch.config import Config, ConfigError


def resolve_batch(global_size: Optional[int], micro_size: Optional[int],
                  accum_steps: Optional[int], world_size: int) -> tuple[int, int, int]:
    """Complete (global, micro, accum) from any two of them and the world size.

    Raises:
        ConfigError: a value is not positive, does not divide, or three values disagree.
    """
    if world_size < 1:
        raise ConfigError(f"world_size={world_size} must be >= 1")
    for key, value in (("batch.global_size", global_size), ("batch.micro_size", micro_size),
                       ("batch.accum_steps", accum_steps)):
        if value is not None and value < 1:
            raise ConfigError(f"{key}={value} must be a positive integer")
    g, m, a, w = global_size, micro_size, accum_steps, world_size
    if g is not None and m is not None and a is not None:
        if g != m * a * w:
            raise ConfigError(f"batch.global_size={g} != micro_size {m} x accum_steps {a} x "
                              f"world_size {w} (= {m * a * w}); give two of the three")
        return g, m, a
    if g is not None and m is not None:
        if g % (m * w):
            raise ConfigError(f"batch.global_size={g} is not divisible by micro_size {m} x "
                              f"world_size {w}")
        return g, m, g // (m * w)
    if g is not None and a is not None:
        if g % (a * w):
            raise ConfigError(f"batch.global_size={g} is not divisible by accum_steps {a} x "
                              f"world_size {w}")
        return g, g // (a * w), a
    if m is not None:
        a = a or 1
        return m * a * w, m, a
    if g is not None:
        if g % w:
            raise ConfigError(f"batch.global_size={g} is not divisible by world_size {w}")
        return g, g // w, 1
    raise ConfigError("batch: set at least batch.global_size or batch.micro_size")


def scaled_lr(base_lr: float, rule: str, global_size: int, base_batch: int) -> float:
    """Peak LR from the base LR: linear (Goyal et al. 2017) or square-root scaling."""
    ratio = global_size / base_batch
    if rule == "linear":
        return base_lr * ratio
    if rule == "sqrt":
        return base_lr * math.sqrt(ratio)
    return base_lr


@dataclass(frozen=True)
class BatchPlan:
    """Validated batch arithmetic for one run (identical on every rank)."""

    global_size: int
    micro_size: int
    accum_steps: int
    world_size: int
    dataset_size: int
    drop_last: bool
    base_lr: float
    scale_rule: str
    base_batch: int
    peak_lr: float
    warmup_steps: int
    max_global_size: Optional[int] = None
    #: batch.micro_size=auto: how the micro size was found (``largebatch.tune.micro_batch``
    #: ``AutoMicro.to_json``: source, peak and limit bytes, trials, candidates); None otherwise.
    micro_auto: Optional[dict[str, Any]] = None
    #: optim.lr=auto: what the range test found (``largebatch.tune.lr_auto``); before it the
    #: plan holds a unit base LR (peak_lr = the scaling rule's factor), marked pending.
    lr_auto: Optional[dict[str, Any]] = None

    @property
    def samples_per_step(self) -> int:
        """Samples per full optimizer step over all ranks (= global_size)."""
        return self.micro_size * self.accum_steps * self.world_size

    @property
    def shard_size(self) -> int:
        """Training samples each rank sees per epoch (DistributedSampler semantics)."""
        if self.drop_last:
            return self.dataset_size // self.world_size
        return math.ceil(self.dataset_size / self.world_size)

    @property
    def micro_batches_per_epoch(self) -> int:
        """Micro-batches per rank per epoch (the last one may be short unless drop_last)."""
        if self.drop_last:
            return (self.dataset_size // self.global_size) * self.accum_steps
        return math.ceil(self.shard_size / self.micro_size)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch; without drop_last the last window may be short."""
        if self.drop_last:
            return self.dataset_size // self.global_size
        return math.ceil(self.micro_batches_per_epoch / self.accum_steps)

    def grown(self, factor: float) -> Optional["BatchPlan"]:
        """The plan with the global batch multiplied by ~1/factor through more accumulation.

        The micro batch is unchanged; growth stops at ``max_global_size``. Returns None when
        the batch cannot grow any more (the caller then falls back to lowering the LR).
        """
        mult = max(2, round(1.0 / factor))
        accum = self.accum_steps * mult
        if self.max_global_size is not None:
            accum = min(accum, self.max_global_size // (self.micro_size * self.world_size))
        if accum <= self.accum_steps:
            return None
        return dataclasses.replace(self, accum_steps=accum,
                                   global_size=self.micro_size * accum * self.world_size)

    def resized(self, micro_size: int, accum_steps: int) -> "BatchPlan":
        """The plan at another micro size and accumulation (``batch.adapt=goodput``), with the
        peak LR the scaling rule gives at the new global batch (warmup steps unchanged).

        Raises:
            ConfigError: a value is not positive, or the batch exceeds ``max_global_size``.
        """
        g, m, a = resolve_batch(None, micro_size, accum_steps, self.world_size)
        if self.max_global_size is not None and g > self.max_global_size:
            raise ConfigError(f"global batch {g} = {m} x {a} x {self.world_size} exceeds "
                              f"batch.max_global_size={self.max_global_size}")
        return dataclasses.replace(self, global_size=g, micro_size=m, accum_steps=a,
                                   peak_lr=scaled_lr(self.base_lr, self.scale_rule, g,
                                                     self.base_batch))

    def deepspeed_fields(self) -> dict[str, int]:
        """DeepSpeed's three batch fields, derived from this plan."""
        return {"train_batch_size": self.global_size,
                "train_micro_batch_size_per_gpu": self.micro_size,
                "gradient_accumulation_steps": self.accum_steps}

    def to_json(self) -> dict[str, Any]:
        """The plan as one JSON object (what ``largebatch plan --json`` prints)."""
        out = dataclasses.asdict(self)
        out.update(samples_per_step=self.samples_per_step, shard_size=self.shard_size,
                   micro_batches_per_epoch=self.micro_batches_per_epoch,
                   steps_per_epoch=self.steps_per_epoch)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "BatchPlan":
        """Rebuild a plan from ``to_json`` (derived fields are recomputed, not trusted)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def describe(self) -> str:
        """Human-readable lines, printed once at start on rank 0."""
        return "\n".join([
            f"batch plan: global {self.global_size} = micro {self.micro_size} x accum "
            f"{self.accum_steps} x world {self.world_size}",
            f"  data: {self.dataset_size} samples, {self.shard_size} per rank, "
            f"{self.steps_per_epoch} optimizer steps/epoch "
            f"({'drop_last' if self.drop_last else 'last window may be short'})",
            self._describe_lr(),
            *([self._describe_auto()] if self.micro_auto else []),
            *([_describe_lr_auto(self.lr_auto)] if self.lr_auto else []),
        ])

    def _describe_lr(self) -> str:
        """The LR line; with ``optim.lr=auto`` before the range test there is no LR to show
        yet (the plan holds a unit base LR as a placeholder), so the line says so."""
        if (self.lr_auto or {}).get("source") == "pending":
            return (f"  lr: auto (LR range test at batch {self.global_size} at run start), rule "
                    f"{self.scale_rule} from batch {self.base_batch}, warmup "
                    f"{self.warmup_steps} steps unless the test suggests one")
        return (f"  lr: base {self.base_lr:g} at batch {self.base_batch}, rule "
                f"{self.scale_rule}, peak {self.peak_lr:g}, warmup {self.warmup_steps} steps")

    def _describe_auto(self) -> str:
        """The ``batch.micro_size=auto`` line: where the size came from, peak vs limit."""
        a = self.micro_auto or {}
        if a.get("source") == "pending":
            return (f"  micro auto: searched at run start over {a.get('candidates')} "
                    f"(shown: the largest)")
        peak, limit = a.get("peak_bytes"), a.get("limit_bytes")
        shown = "" if peak is None else f", peak {_mib(peak)}"
        shown += "" if limit is None else f" <= limit {_mib(limit)}"
        nxt = a.get("next_peak_bytes")
        shown += "" if nxt is None else f", next size {_mib(nxt)}"
        return (f"  micro auto: {self.micro_size} ({a.get('source')}{shown}, "
                f"{a.get('trials', 0)} trial steps, {a.get('search_s', 0.0):.2f} s)")


def make_plan(cfg: Config, world_size: int, dataset_size: int,
              micro_auto: Optional[dict[str, Any]] = None) -> BatchPlan:
    """Build and validate the plan from the config, the launch's world size and the data.

    Args:
        micro_auto: with ``batch.micro_size=auto``, the search's outcome (its ``micro_size``
            is the plan's); None before the search: the largest candidate, marked pending.
    """
    micro = cfg.batch.micro_size
    if micro == "auto":
        if micro_auto is None:
            from largebatch.tune.micro_batch import candidates
            cands = candidates(cfg.batch.global_size, world_size)
            micro_auto = {"source": "pending", "candidates": cands}
            micro = cands[-1]
        else:
            micro = int(micro_auto["micro_size"])
    g, m, a = resolve_batch(cfg.batch.global_size, micro, cfg.batch.accum_steps, world_size)
    if dataset_size < 1:
        raise ConfigError(f"dataset has {dataset_size} samples; need at least 1")
    if cfg.data.drop_last and dataset_size < g:
        raise ConfigError(f"data.drop_last with {dataset_size} samples < batch.global_size={g} "
                          f"leaves no step per epoch")
    if cfg.batch.max_global_size is not None and cfg.batch.max_global_size < g:
        raise ConfigError(f"batch.max_global_size={cfg.batch.max_global_size} is smaller than "
                          f"batch.global_size={g}")
    base_batch = cfg.optim.base_batch if cfg.optim.base_batch is not None else g
    if base_batch < 1:
        raise ConfigError(f"optim.base_batch={base_batch} must be a positive integer")
    auto_lr = cfg.optim.lr == "auto"  # a unit base LR until the range test sets the peak
    base_lr, lr_auto = (1.0, {"source": "pending"}) if auto_lr else (cfg.optim.lr, None)
    plan = BatchPlan(global_size=g, micro_size=m, accum_steps=a, world_size=world_size,
                     dataset_size=dataset_size, drop_last=cfg.data.drop_last,
                     base_lr=base_lr, scale_rule=cfg.optim.scale_rule, base_batch=base_batch,
                     peak_lr=scaled_lr(base_lr, cfg.optim.scale_rule, g, base_batch),
                     warmup_steps=0, max_global_size=cfg.batch.max_global_size,
                     micro_auto=micro_auto, lr_auto=lr_auto)
    warmup = cfg.schedule.warmup_steps
    if cfg.schedule.warmup_epochs > 0:
        if warmup:
            raise ConfigError(f"schedule.warmup_steps={warmup} and schedule.warmup_epochs="
                              f"{cfg.schedule.warmup_epochs} are both set; give one")
        warmup = round(cfg.schedule.warmup_epochs * plan.steps_per_epoch)
    return dataclasses.replace(plan, warmup_steps=warmup)


def _describe_lr_auto(record: dict[str, Any]) -> str:
    """The ``optim.lr=auto`` line: pending, or what the range test found."""
    def fmt(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.4g}"
    if record.get("source") == "pending":
        return "  lr auto: pending (the peak LR and its warmup come from lr-find's suggestion)"
    return (f"  lr auto: peak {record['peak_lr']:.4g} from lr-find (steepest "
            f"{fmt(record.get('steepest'))}, max_stable {fmt(record.get('max_stable'))}), "
            f"warmup {record['warmup_steps']} steps ({record['warmup_from']})")


def _mib(n: float) -> str:
    """Bytes in the largest binary unit that keeps the value >= 1 (B, KiB, MiB, GiB)."""
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def face_head_plan(cfg: Config, plan: BatchPlan) -> dict[str, Any]:
    """The Partial FC head's memory per rank and logits per micro-step for ``cfg.face``.

    Weights + gradient + optimizer state of the largest shard (``largebatch.face.fc_memory``;
    SGD momentum for sgd/lars when optim.momentum > 0, AdamW moments for adamw/lamb), the
    ``(global micro-batch x sampled classes)`` logits, and the expected share of classes
    present in one global batch (a sample_rate below it keeps mostly positives).
    """
    from largebatch.face import expected_positive_share, fc_memory
    f = cfg.face
    if cfg.optim.name in ("adamw", "lamb"):
        optimizer = "adamw"
    else:
        optimizer = "sgd" if cfg.optim.momentum > 0 else "none"
    dtype = "fp32"  # the head keeps fp32 class centres; autocast only casts the logits' inputs
    mem = fc_memory(f.num_classes, f.embedding_size, plan.world_size, f.sample_rate,
                    dtype=dtype, optimizer=optimizer,
                    global_micro_batch=plan.micro_size * plan.world_size,
                    sparse_update=f.sparse_update)
    mem["expected_positive_share"] = expected_positive_share(f.num_classes, plan.global_size)
    mem["optimizer"] = optimizer
    return mem


def describe_face_head(cfg: Config, plan: BatchPlan) -> str:
    """``largebatch plan`` lines for a face config: FC memory, logits, a sample_rate warning."""
    m = face_head_plan(cfg, plan)
    f = cfg.face
    lines = [
        f"  face head: {f.num_classes} classes x d={f.embedding_size}, {m['num_local']} per rank "
        f"(largest shard), sample_rate {f.sample_rate:g} -> {m['num_sample']} rows per window",
        f"  fc memory per rank: weights {_mib(m['weight_bytes'])} + gradient "
        f"{_mib(m['grad_bytes'])} + optimizer ({m['optimizer']}) {_mib(m['optimizer_bytes'])} "
        f"= {_mib(m['total_bytes'])}",
        f"  logits per micro-step: {plan.micro_size * plan.world_size} x {m['num_sample']} = "
        f"{m['logits_elements']} elements ({_mib(m['logits_bytes'])} fp32 per rank)",
    ]
    share = m["expected_positive_share"]
    if f.sample_rate < share:
        lines.append(f"  warning: face.sample_rate={f.sample_rate:g} is below the expected share "
                     f"of classes present in one global batch of {plan.global_size} "
                     f"({share:.3f}): most windows keep only positives, no negatives are sampled")
    return "\n".join(lines)
