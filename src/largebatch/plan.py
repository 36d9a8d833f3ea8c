"""The batch plan: the one place where global = micro x accum x world is computed and checked.

Everything that depends on the batch derives from a ``BatchPlan``: steps per epoch, the windows
of an epoch and a rank's position in it, the planned steps, the scaled learning rate, warmup in
steps, DeepSpeed's batch fields, batch growth on plateau, resized plans (goodput, advice),
positions mapped across world sizes, the micro sizes that keep a global batch and the split of
a window for the noise scale. Nobody else multiplies micro, accumulation and world
(``tests/unit/test_plan_owns_the_arithmetic.py`` fails when someone does).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

from largebatch.config import Config, ConfigError
from largebatch.plan_text import batch_above_data


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
                              f"world_size {w}{_suggest(g, m, w)}")
        return g, m, g // (m * w)
    if g is not None and a is not None:
        if g % (a * w):
            raise ConfigError(f"batch.global_size={g} is not divisible by accum_steps {a} x "
                              f"world_size {w}{_suggest(g, None, w)}")
        return g, g // (a * w), a
    if m is not None:
        a = a or 1
        return m * a * w, m, a
    if g is not None:
        if g % w:
            raise ConfigError(f"batch.global_size={g} is not divisible by world_size {w}"
                              f"{_suggest(g, None, w)}")
        return g, g // w, 1
    raise ConfigError("batch: set at least batch.global_size or batch.micro_size")


def _suggest(g: int, m: Optional[int], w: int) -> str:
    """The nearest valid settings for a global batch ``g`` that does not divide: the global
    batches around it that micro x world divides (or world alone, without a micro size), and
    the micro sizes that keep ``g`` when the world divides it."""
    unit = m * w if m else w
    lo, hi = g // unit * unit, -(-g // unit) * unit
    batches = " or ".join(str(b) for b in (lo, hi) if b > 0)
    out = f"; nearest valid: batch.global_size={batches}"
    if m and g % w == 0:  # the batch fits this world: another micro size keeps it
        per_rank = g // w
        fits = [d for d in range(1, per_rank + 1) if per_rank % d == 0]
        near = sorted(fits, key=lambda d: (abs(d - m), d))[:2]
        out += f", or batch.micro_size={' or '.join(str(d) for d in sorted(near))}"
    return out


def scaled_lr(base_lr: float, rule: str, global_size: int, base_batch: int) -> float:
    """Peak LR from the base LR: linear (Goyal et al. 2017) or square-root scaling."""
    ratio = global_size / base_batch
    if rule == "linear":
        return base_lr * ratio
    if rule == "sqrt":
        return base_lr * math.sqrt(ratio)
    return base_lr


def rank_shard_size(dataset_size: int, world_size: int, drop_last: bool) -> int:
    """Samples each rank sees per epoch, as ``DistributedSampler`` cuts them: the split padded
    (from its start) to a multiple of the world size, or cut to one with ``drop_last``."""
    if drop_last:
        return dataset_size // world_size
    return math.ceil(dataset_size / world_size)


def micro_candidates(global_size: Optional[int], world_size: int) -> list[int]:
    """Every micro size that keeps ``global_size`` exactly: the divisors of global / world
    (ConfigError: no global batch, or one that the world size does not divide)."""
    if global_size is None:
        raise ConfigError("batch.micro_size=auto needs batch.global_size (the batch it keeps)")
    if global_size < 1 or global_size % world_size:
        raise ConfigError(f"batch.global_size={global_size} is not divisible by world_size "
                          f"{world_size}: no micro size keeps it (micro x accum x world)")
    per_rank = global_size // world_size
    return [m for m in range(1, per_rank + 1) if per_rank % m == 0]


def noise_split(global_size: int, world_size: int) -> Optional[tuple[int, int]]:
    """``(micro, accum)`` with which the live noise scale can measure a global batch (None:
    a batch of 1 on one process cannot be split). Under DDP the ranks' windows are the small
    batches (accum 1); on one process the window's micro-batches are: the fewest that divide
    the batch, global/p x p with p its smallest prime factor, so the small batch is as large as
    it can be. The study's convergence runs and ``largebatch noise-scale`` both use it."""
    if world_size > 1:
        return global_size // world_size, 1
    if global_size < 2:
        return None
    p = next((k for k in range(2, math.isqrt(global_size) + 1) if global_size % k == 0),
             global_size)
    return global_size // p, p


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
        return self.global_of(self.micro_size, self.accum_steps)

    @property
    def shard_size(self) -> int:
        """Training samples each rank sees per epoch (DistributedSampler semantics)."""
        return rank_shard_size(self.dataset_size, self.world_size, self.drop_last)

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

    @property
    def window_size(self) -> int:
        """One rank's samples in a full window (micro x accum)."""
        return self.micro_size * self.accum_steps

    @property
    def batch_unit(self) -> int:
        """The step between valid global batches at this micro size and world (micro x world)."""
        return self.micro_size * self.world_size

    @property
    def full_windows_per_epoch(self) -> int:
        """Windows of the full planned size in one epoch (an epoch's short last one left out)."""
        return min(self.micro_batches_per_epoch // self.accum_steps,
                   self.shard_size // self.window_size)

    def planned_steps(self, epochs: float, max_steps: int = 0) -> int:
        """Optimizer steps a run of ``epochs`` takes at this plan (capped by ``max_steps``)."""
        steps = math.ceil(epochs * self.steps_per_epoch)
        return min(steps, max_steps) if max_steps else steps

    def steps_for(self, samples: int) -> int:
        """Full optimizer steps that see at least ``samples`` samples."""
        return math.ceil(samples / self.global_size)

    # ---- a rank's position in an epoch ------------------------------------------------------
    def position(self, consumed: int) -> int:
        """This rank's samples into the epoch after ``consumed`` micro-batches."""
        return min(consumed * self.micro_size, self.shard_size)

    def window(self, consumed: int, position: int,
               max_micro_batches: Optional[int] = None) -> tuple[int, int]:
        """This rank's next window: ``(micro-batches, samples)`` from ``consumed`` micro-batches
        and ``position`` samples into the epoch; the epoch's last window may be short, and
        ``max_micro_batches`` may shorten it (a policy aligning a coming micro size)."""
        n_micro = min(self.accum_steps, self.micro_batches_per_epoch - consumed)
        if max_micro_batches is not None:
            n_micro = max(1, min(n_micro, max_micro_batches))
        return n_micro, min(n_micro * self.micro_size, self.shard_size - position)

    def epoch_fraction(self, consumed: int) -> float:
        """The share of an epoch ``consumed`` micro-batches are."""
        return consumed / max(1, self.micro_batches_per_epoch)

    def aligned(self, position: int, micro_size: int) -> bool:
        """Whether ``position`` samples into the epoch is a whole number of micro-batches of
        ``micro_size`` (where the epoch can go on in that micro size)."""
        return position % micro_size == 0

    def micro_batches_until_aligned(self, position: int, micro_size: int) -> int:
        """Micro-batches of this plan's size from ``position`` to the next position that is a
        whole number of ``micro_size`` micro-batches (at least 1)."""
        return max(1, (-position % micro_size) // self.micro_size)

    def global_samples(self, window_samples: int) -> int:
        """Samples of a step over all ranks when each rank's window holds ``window_samples``
        (every rank's shard is the same size, so their windows are too)."""
        return window_samples * self.world_size

    def consumed_at(self, position: int) -> int:
        """Micro-batches of this plan's size that end at ``position`` samples into the epoch."""
        return position // self.micro_size

    # ---- other plans ------------------------------------------------------------------------
    def global_of(self, micro_size: int, accum_steps: int) -> int:
        """The global batch of ``micro_size`` x ``accum_steps`` at this world size."""
        return micro_size * accum_steps * self.world_size

    def max_accum(self, micro_size: int, max_global: int) -> int:
        """The largest accumulation whose global batch at ``micro_size`` is <= ``max_global``."""
        return max_global // (micro_size * self.world_size)

    def accum_for(self, global_size: int, micro_size: int) -> int:
        """The accumulation that makes ``global_size`` from ``micro_size`` on this world
        (``global_size`` must be a multiple of micro x world)."""
        return global_size // (micro_size * self.world_size)

    def with_micro_size(self, micro_size: int,
                        micro_auto: Optional[dict[str, Any]] = None) -> "BatchPlan":
        """The same global batch in micro-batches of ``micro_size`` (the accumulation follows;
        ``micro_auto``: how ``batch.micro_size=auto`` found it)."""
        g, m, a = resolve_batch(self.global_size, micro_size, None, self.world_size)
        return dataclasses.replace(self, global_size=g, micro_size=m, accum_steps=a,
                                   micro_auto=micro_auto)

    def with_global_size(self, global_size: int) -> "BatchPlan":
        """The plan at another global batch with the same micro size, world and LR rule (the
        accumulation follows; the LR is the rule's at the plan's own base batch; warmup stays).

        Raises:
            ConfigError: ``global_size`` is not a multiple of micro x world.
        """
        g, m, a = resolve_batch(global_size, self.micro_size, None, self.world_size)
        return dataclasses.replace(self, global_size=g, micro_size=m, accum_steps=a,
                                   peak_lr=scaled_lr(self.base_lr, self.scale_rule, g,
                                                     self.base_batch))

    def continue_from(self, old: "BatchPlan", consumed: int) -> tuple["BatchPlan", int, str]:
        """Resume at this plan's world size from a set written with plan ``old``, ``consumed``
        of its micro-batches into the epoch. Returns the plan to continue with (this one, or
        ``old``'s grown global batch cut for this world), the consumed micro-batches in it (the
        same sample count, or the next window boundary when no whole new micro-batch ends
        there) and a note when it moved (else ''). ConfigError: the global batch does not
        divide into this world's micro-batches."""
        new = self
        if new.global_size != old.global_size:  # the batch grew before the save: keep it
            _, m, a = resolve_batch(old.global_size, new.micro_size, None, new.world_size)
            new = dataclasses.replace(old, micro_size=m, accum_steps=a,
                                      world_size=new.world_size,
                                      dataset_size=new.dataset_size)
        samples = consumed * old.batch_unit
        note = ""
        if samples % new.batch_unit == 0:
            consumed = samples // new.batch_unit
        else:  # no whole new micro-batch ends there: start at the next window boundary
            window = new.batch_unit * new.accum_steps
            consumed = -(-samples // window) * new.accum_steps
            note = (f"resharding: epoch position {samples} samples is not a whole number of "
                    f"micro-batches of {new.batch_unit}; continuing at "
                    f"{consumed * new.batch_unit}")
        return new, min(consumed, new.micro_batches_per_epoch), note

    def grown(self, factor: float) -> Optional["BatchPlan"]:
        """The plan with the global batch multiplied by ~1/factor through more accumulation.

        The micro batch is unchanged; growth stops at ``max_global_size``. Returns None when
        the batch cannot grow any more (the caller then falls back to lowering the LR).
        """
        mult = max(2, round(1.0 / factor))
        accum = self.accum_steps * mult
        if self.max_global_size is not None:
            accum = min(accum, self.max_accum(self.micro_size, self.max_global_size))
        if accum <= self.accum_steps:
            return None
        return dataclasses.replace(self, accum_steps=accum,
                                   global_size=self.global_of(self.micro_size, accum))

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
        """Human-readable lines, printed once at start on rank 0 (``plan_text``)."""
        from largebatch.plan_text import describe_plan
        return describe_plan(self)


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
            cands = micro_candidates(cfg.batch.global_size, world_size)
            micro_auto = {"source": "pending", "candidates": cands}
            micro = cands[-1]
        else:
            micro = int(micro_auto["micro_size"])
    g, m, a = resolve_batch(cfg.batch.global_size, micro, cfg.batch.accum_steps, world_size)
    if dataset_size < 1:
        raise ConfigError(f"dataset has {dataset_size} samples; need at least 1")
    if dataset_size < g:  # no step would hold g samples, yet the LR is scaled for g
        unit = world_size * (1 if cfg.batch.micro_size == "auto" else m)
        micro_fit = dataset_size // world_size
        raise ConfigError(batch_above_data(g, dataset_size, cfg.data, dataset_size // unit * unit,
                                           micro_fit, micro_fit * world_size))
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

