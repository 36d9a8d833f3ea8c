"""The batch plan as text: the lines ``largebatch plan`` and every run print first."""
from __future__ import annotations

from typing import Any, Optional


def describe_plan(plan: Any) -> str:
    """The plan's human-readable lines, printed once at start on rank 0."""
    return "\n".join([
        f"batch plan: global {plan.global_size} = micro {plan.micro_size} x accum "
        f"{plan.accum_steps} x world {plan.world_size}",
        f"  data: {plan.dataset_size} samples, {plan.shard_size} per rank, "
        f"{plan.steps_per_epoch} optimizer steps/epoch "
        f"({'drop_last' if plan.drop_last else 'last window may be short'})",
        _describe_lr(plan),
        *([_describe_auto(plan)] if plan.micro_auto else []),
        *([_describe_lr_auto(plan.lr_auto)] if plan.lr_auto else []),
    ])


def _describe_lr(plan: Any) -> str:
    """The LR line; with ``optim.lr=auto`` before the range test there is no LR to show
    yet (the plan holds a unit base LR as a placeholder), so the line says so."""
    if (plan.lr_auto or {}).get("source") == "pending":
        return (f"  lr: auto (LR range test at batch {plan.global_size} at run start), rule "
                f"{plan.scale_rule} from batch {plan.base_batch}, warmup "
                f"{plan.warmup_steps} steps unless the test suggests one")
    return (f"  lr: base {plan.base_lr:g} at batch {plan.base_batch}, rule "
            f"{plan.scale_rule}, peak {plan.peak_lr:g}, warmup {plan.warmup_steps} steps")


def _describe_auto(plan: Any) -> str:
    """The ``batch.micro_size=auto`` line: where the size came from, peak vs limit."""
    a = plan.micro_auto or {}
    if a.get("source") == "pending":
        return (f"  micro auto: searched at run start over {a.get('candidates')} "
                f"(shown: the largest)")
    peak, limit = a.get("peak_bytes"), a.get("limit_bytes")
    shown = "" if peak is None else f", peak {format_bytes(peak)}"
    shown += "" if limit is None else f" <= limit {format_bytes(limit)}"
    nxt = a.get("next_peak_bytes")
    shown += "" if nxt is None else f", next size {format_bytes(nxt)}"
    return (f"  micro auto: {plan.micro_size} ({a.get('source')}{shown}, "
            f"{a.get('trials', 0)} trial steps, {a.get('search_s', 0.0):.2f} s)")


def _describe_lr_auto(record: dict[str, Any]) -> str:
    """The ``optim.lr=auto`` line: pending, or what the range test found."""
    def fmt(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.4g}"
    if record.get("source") == "pending":
        return "  lr auto: pending (the peak LR and its warmup come from lr-find's suggestion)"
    return (f"  lr auto: peak {record['peak_lr']:.4g} from lr-find (steepest "
            f"{fmt(record.get('steepest'))}, max_stable {fmt(record.get('max_stable'))}), "
            f"warmup {record['warmup_steps']} steps ({record['warmup_from']})")


def format_bytes(n: float) -> str:
    """Bytes in the largest binary unit that keeps the value >= 1 (B, KiB, MiB, GiB)."""
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def batch_above_data(global_size: int, samples: int, data: Any, fit: int, micro_fit: int,
                     micro_batch: int) -> str:
    """The error line of a global batch above the training set, with the nearest fixes:
    ``fit`` (the largest global batch <= ``samples`` at this micro size and world; 0: none),
    else ``micro_fit`` (the micro size whose one-step batch ``micro_batch`` fits; 0: none)."""
    subset = f" (data.subset={data.subset})" if data.subset == samples else ""
    if fit:
        fixes = [f"batch.global_size={fit}"]
    elif micro_fit:
        fixes = [f"batch.global_size={micro_batch} with batch.micro_size={micro_fit}"]
    else:
        fixes = [f"at most {samples} ranks"]
    if subset:
        fixes.append(f"data.subset >= {global_size}")
    return (f"batch.global_size={global_size} is larger than the training set: {samples} "
            f"samples{subset}; no step would ever hold {global_size} samples, yet the LR is "
            f"scaled for {global_size}"
            f"{' (and data.drop_last leaves no step at all)' if data.drop_last else ''}; "
            f"nearest fix: {' or '.join(fixes)}")
