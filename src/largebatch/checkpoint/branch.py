"""What a run may change when it starts from another run's set (``checkpoint.resume=PATH``).

Branching compares the set's configuration (its manifest's ``config``) with the run's, key by
key (dotted), and sorts every difference into one of two kinds:

* **structural** (``STRUCTURAL``, ``STRUCTURAL_PREFIXES`` and the conditional rules of
  ``_structural``): the restored state would not fit the run, or the set's state would
  silently replace what the run's config asks for (the batch plan, the data order, the
  parameter groups). Refused in one line naming the key and both values.
* **safe**: everything else. The run's value takes effect: the LR and the schedule's length
  and shape through ``LRSchedule``, the optimizers' hyper-parameters (momentum, weight decay,
  ...) through the engine, the rest because the run reads it from its own config. Safe
  differences are printed in one line (``describe``).

The checkpointer knows nothing of trainers or optimizers: this module only compares and
describes; ``train.build`` applies the safe changes through the owners' methods.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from largebatch.errors import ConfigError

#: Differences that make a set's state unfit for the run (or that the set would overrule).
STRUCTURAL = frozenset({
    "task.name", "optim.name", "optim.exclude_1d",
    "face.num_classes", "face.embedding_size", "face.samples_per_class", "face.long_tail",
    "face.min_samples_per_class", "face.latent_dim", "face.image_size",
    "data.name", "data.subset", "data.num_samples", "data.drop_last", "data.loader",
    "batch.global_size", "batch.max_global_size", "batch.adapt",
    "train.seed", "engine.zero_stage", "engine.deepspeed_config"})
STRUCTURAL_PREFIXES = ("model.",)
#: Structural unless the resume reshards (another world size cuts the set's batch again).
RESHARD_ONLY = frozenset({"batch.micro_size", "batch.accum_steps"})
#: Keys that set the LR: the run's peak and warmup replace the set's.
LR_KEYS = frozenset({"optim.lr", "optim.scale_rule", "optim.base_batch",
                     "schedule.warmup_steps", "schedule.warmup_epochs",
                     "schedule.warmup_start_factor"})
#: Keys that set the schedule's length (cosine and poly decay over it).
LENGTH_KEYS = frozenset({"train.epochs", "train.max_steps", "schedule.total_steps"})
#: Not a difference of the experiment: how the run was told to start.
IGNORED = frozenset({"checkpoint.resume"})


@dataclass(frozen=True)
class Change:
    """One configuration key that differs between a set and the run."""

    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key} {_fmt(self.old)} -> {_fmt(self.new)}"


def _fmt(value: Any) -> str:
    """A value as the line shows it: strings (paths, names) whole, others as JSON, cut."""
    if isinstance(value, str):
        return value
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def flat(d: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys (``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}``)."""
    out: dict[str, Any] = {}
    stack = [(d, prefix)]
    while stack:
        node, where = stack.pop()
        for k, v in node.items():
            if isinstance(v, dict) and v:
                stack.append((v, f"{where}{k}."))
            else:
                out[where + str(k)] = v
    return out


def changes(saved: dict[str, Any], current: dict[str, Any]) -> list[Change]:
    """Every key both configs hold whose values differ (compared as JSON: tuples equal
    lists), sorted; keys only one side knows (added or removed by a code update) are not
    compared, ``checkpoint.resume`` never."""
    a = flat(json.loads(json.dumps(saved, default=str)))
    b = flat(json.loads(json.dumps(current, default=str)))
    return [Change(k, a[k], b[k]) for k in sorted(set(a) & set(b))
            if a[k] != b[k] and k not in IGNORED]


def _structural(change: Change, reshards: bool) -> bool:
    """Whether ``change`` is refused (see the module's docstring)."""
    key = change.key
    if key in STRUCTURAL or key.startswith(STRUCTURAL_PREFIXES):
        return True
    if key in RESHARD_ONLY:
        return not reshards
    if key == "engine.name":  # single <-> ddp <-> auto keep one state layout; ZeRO does not
        from largebatch.registry import ENGINES
        return any(ENGINES.trait(str(v), "partitions_tensors", False)
                   for v in (change.old, change.new))
    if key == "train.precision":  # fp16 carries a grad scaler's state, the others none
        return "fp16" in (change.old, change.new)
    return False


def check_branch(saved: dict[str, Any], current: dict[str, Any], where: Path,
                 reshards: bool) -> list[Change]:
    """The safe changes of branching from set ``where``; refuses structural ones.

    Args:
        saved: the set's config (its manifest's).
        current: the run's config.
        where: the set (named in messages).
        reshards: whether the run has another world size than the set.

    Raises:
        ConfigError: one line naming every structural difference (up to three) with both
            values.
    """
    found = changes(saved, current)
    refused = [c for c in found if _structural(c, reshards)]
    if refused:
        shown = ", ".join(str(c) for c in refused[:3])
        more = f" (+{len(refused) - 3} more)" if len(refused) > 3 else ""
        raise ConfigError(f"checkpoint.resume={where}: cannot branch: {shown}{more} (the "
                          f"set's model, optimizer, data order or batch would not fit this "
                          f"run); start a fresh run, or branch with the set's values")
    return [c for c in found if not _structural(c, reshards)]


def describe(where: Path, safe: list[Change], schedule_note: str) -> str:
    """The one line a branch prints: ``branching from SET: key old -> new, ... (schedule:
    ...)``."""
    shown = ", ".join(str(c) for c in safe) or "no configuration changes"
    note = f" (schedule: {schedule_note})" if schedule_note else ""
    return f"branching from {where}: {shown}{note}"
