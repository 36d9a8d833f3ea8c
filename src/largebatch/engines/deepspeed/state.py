"""DeepSpeed engine state: checkpoints, resume and the restore behind a dropped window.

Checkpoints (``replicated_state``): the full module weights for rank 0's file, and at ZeRO >= 1
or bf16 each rank's own share of DeepSpeed's state for that rank's file (``local_state``: its
fp32 partitions and their optimizer state, as plain tensors), so a resume at the same world
size is exact and everything loads with ``torch.load(weights_only=True)``.

A dropped window (``train.nonfinite=skip|stop``, ``drop_window``) reuses the same snapshot:
DeepSpeed clears its gradient buffers only inside its step, so the step runs and this rank's
state is put back from a copy taken just before.

Every function takes the ``DeepSpeedEngine`` after ``setup`` (``engine.model`` is DeepSpeed's
engine, ``engine.optimizer`` the optimizer DeepSpeed steps); typed ``Any`` here because the
engine module imports this one.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from largebatch.config import ConfigError

# DeepSpeed engine counters (its step/sample/skip bookkeeping), restored for fidelity.
_DS_COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps")
# DeepSpeed's (dynamic) loss scaler: what update_scale reads and writes.
_SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def client_steps_module(zero_stage: int, precision: str) -> bool:
    """Whether the client optimizer steps the module's own parameters.

    Only at ZeRO 0 in fp32; elsewhere it steps DeepSpeed's fp32 master copies (flat
    partitions at ZeRO 1-3, fp32 copies under DeepSpeed's bf16/fp16 optimizers), which the
    module's state misses.

    Args:
        zero_stage: DeepSpeed's ZeRO stage (0-3).
        precision: 'fp32', 'bf16' or 'fp16'.

    Returns:
        True where the module's and the client optimizer's torch state are the whole state.
    """
    return zero_stage == 0 and precision == "fp32"


def client_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The client (torch) optimizer DeepSpeed steps, with or without DeepSpeed's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def master_tensors(engine: Any) -> list[torch.Tensor]:
    """The tensors the client optimizer steps on this rank, keys of its ``state``.

    ZeRO 1/2 and the bf16/fp16 wrappers put their fp32 masters (at ZeRO 1/2 this rank's flat
    partition per group) into the client's ``param_groups``; ZeRO 3 empties those lists
    between steps and keys the state by its fp32 flat partition of each sub-group.

    Args:
        engine: the set-up DeepSpeed engine.

    Returns:
        This rank's master tensors, in a fixed order (the same on every launch of one layout).
    """
    if engine.zero_stage == 3:
        return list(engine.optimizer.fp32_partitioned_groups_flat)
    return [p for group in client_optimizer(engine.optimizer).param_groups
            for p in group["params"]]


def counters(ds_engine: Any) -> dict[str, int]:
    """DeepSpeed's step/sample/skip counters of ``ds_engine`` (its ``DeepSpeedEngine``)."""
    return {k: int(getattr(ds_engine, k)) for k in _DS_COUNTERS}


def scaler_state(optimizer: Any) -> dict[str, Any]:
    """DeepSpeed's loss-scaler numbers (dynamic at fp16; static 1.0 otherwise; {} if none)."""
    scaler = getattr(optimizer, "loss_scaler", None)
    return {} if scaler is None else {a: getattr(scaler, a) for a in _SCALER_FIELDS
                                      if isinstance(getattr(scaler, a, None), (int, float))}


def local_state(engine: Any, to_cpu: bool = True) -> dict[str, Any]:
    """This rank's share of DeepSpeed's state, as plain tensors (weights_only-loadable).

    Not DeepSpeed's ``save_checkpoint``: that pickles DeepSpeed objects (LossScaler,
    ZeroStageEnum) a weights_only load refuses. Not ``safe_set_*_optimizer_state`` either:
    before the first step of a resumed run the optimizer state does not exist yet (DeepSpeed
    creates and links it lazily in the first step), so there is nothing those helpers could
    write into. What the client optimizer steps is saved instead, exactly and partitioned: the
    fp32 masters, their optimizer state (momentum, Adam's moments and step), the param-group
    hyperparameters (the schedule's LR), and at ZeRO 3 this rank's partition of each
    (low-precision) module parameter.

    Args:
        engine: the set-up DeepSpeed engine.
        to_cpu: copy to CPU (a checkpoint); False keeps the copies on the device (a
            dropped window's snapshot).

    Returns:
        The layout (stage, world size, rank) and this rank's tensors and numbers.
    """
    def keep(t: torch.Tensor) -> torch.Tensor:
        return t.detach().cpu().clone() if to_cpu else t.detach().clone()
    client, masters = client_optimizer(engine.optimizer), master_tensors(engine)
    return {
        "zero_stage": engine.zero_stage, "world_size": engine.world_size, "rank": engine.rank,
        "masters": [keep(t) for t in masters],
        "state": [{k: keep(v) if torch.is_tensor(v) else v
                   for k, v in client.state.get(t, {}).items()} for t in masters],
        "groups": [{k: v for k, v in g.items() if k != "params"} for g in client.param_groups],
        "partitions": ([keep(p.ds_tensor) for p in engine.unwrapped().parameters()]
                       if engine.zero_stage == 3 else None),
        "scaler": scaler_state(engine.optimizer), "counters": counters(engine.model)}


def load_local_state(engine: Any, local: dict[str, Any]) -> None:
    """Restore ``local_state`` of this rank (same world size, rank and partitioning).

    Tensors are copied in place where they exist, so DeepSpeed's links from module parameters
    into its partitions and optimizer state (``safe_get_*``) stay valid.

    Args:
        engine: the set-up DeepSpeed engine.
        local: what ``local_state`` returned on this rank of a launch of the same layout.

    Raises:
        ConfigError: the saved layout (stage, world size, rank, partition shapes) is not this
            launch's.
    """
    check_layout(engine, local)
    client, masters = client_optimizer(engine.optimizer), master_tensors(engine)
    with torch.no_grad():
        for t, saved, state in zip(masters, local["masters"], local["state"]):
            t.copy_(saved)
            if state:
                restore_optimizer_state(client, t, state)
            elif client.state.pop(t, None) and hasattr(engine.optimizer,
                                                       "_hp_optimizer_states_linked"):
                # Saved before any step: fresh state again. DeepSpeed links its views of the
                # state after the first step only; the flag makes it relink.
                engine.optimizer._hp_optimizer_states_linked = False
        if local["partitions"] is not None:
            # As DeepSpeed's own ZeRO-3 load: release every gathered parameter first, and
            # afterwards re-gather the persistent ones (small parameters ZeRO 3 keeps whole
            # between steps; a collective), else they keep their stale full copy.
            engine.optimizer.checkpoint_event_prologue()
            for p, saved in zip(engine.unwrapped().parameters(), local["partitions"]):
                p.ds_tensor.copy_(saved)
            engine.optimizer.checkpoint_event_epilogue()
    for group, saved in zip(client.param_groups, local["groups"], strict=True):
        group.update(saved)
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    for k, v in local["scaler"].items():
        setattr(scaler, k, v)
    for k, v in local["counters"].items():
        setattr(engine.model, k, v)


def check_layout(engine: Any, local: dict[str, Any]) -> None:
    """Refuse a ``local_state`` of another stage, world size, rank or partitioning.

    Raises:
        ConfigError: naming the saved and this launch's layouts.
    """
    here = (engine.zero_stage, engine.world_size, engine.rank,
            [tuple(t.shape) for t in master_tensors(engine)])
    saved = (local["zero_stage"], local["world_size"], local["rank"],
             [tuple(t.shape) for t in local["masters"]])
    if here != saved:
        raise ConfigError(f"checkpoint: DeepSpeed state of ZeRO {saved[0]}, rank {saved[2]} "
                          f"of {saved[1]} (fp32 partitions {saved[3]}) cannot load on ZeRO "
                          f"{here[0]}, rank {here[2]} of {here[1]} (partitions {here[3]}): "
                          f"resume with the same engine.zero_stage, world size and model")


def restore_optimizer_state(client: torch.optim.Optimizer, key: torch.Tensor,
                            saved: dict[str, Any]) -> None:
    """Put ``saved`` into ``client.state[key]``.

    In place where a tensor of that shape exists (DeepSpeed's views into it stay valid), else
    as a new entry on the key's device (scalars such as Adam's ``step`` stay where torch keeps
    them).
    """
    current = client.state.setdefault(key, {})
    for name, value in saved.items():
        old = current.get(name)
        if torch.is_tensor(value) and torch.is_tensor(old) and old.shape == value.shape:
            old.copy_(value)
        elif torch.is_tensor(value):
            current[name] = value.to(key.device if value.dim() else value.device).clone()
        else:
            current[name] = value


# ---- checkpoints ----------------------------------------------------------------------------
def replicated_state(engine: Any) -> dict[str, Any]:
    """What rank 0's file holds: the full module weights, and at ZeRO 0 / fp32 the client
    optimizer's torch state (it steps the module itself). Elsewhere the optimizer state lives
    in every rank's own file (``local_state``: its fp32 partitions and their optimizer state),
    so no rank ever holds more than its partition. A collective at ZeRO 3 (the full weights
    are gathered): every rank must call it. Everything loads with weights_only=True."""
    steps_module = client_steps_module(engine.zero_stage, engine.precision)
    return {"model": engine.model_state_dict(),
            "optimizer": engine.optimizer.state_dict() if steps_module else None,
            "counters": counters(engine.model), "zero_stage": engine.zero_stage}


def load_replicated(engine: Any, state: dict[str, Any], local: Optional[dict[str, Any]]
                    ) -> None:
    """Restore ``replicated_state`` and this rank's ``local_state`` (``local``; None at ZeRO
    0 / fp32). Exact at the same world size and ZeRO stage.

    Raises:
        ConfigError: state written at another stage or precision.
    """
    steps_module = client_steps_module(engine.zero_stage, engine.precision)
    if engine.zero_stage < 3:  # ZeRO 3: the ranks' partitions come with local_state
        engine.unwrapped().load_state_dict(state["model"])
    if steps_module:
        if state.get("optimizer") is None:
            raise ConfigError(f"checkpoint: it holds no optimizer state for ZeRO 0 / fp32 "
                              f"(written at ZeRO {state.get('zero_stage')})")
        engine.optimizer.load_state_dict(state["optimizer"])
        for k, v in state.get("counters", {}).items():
            setattr(engine.model, k, v)
        return
    if local is None:
        raise ConfigError(f"checkpoint: it holds no per-rank DeepSpeed state for ZeRO "
                          f"{engine.zero_stage} / {engine.precision} (written at ZeRO "
                          f"{state.get('zero_stage')}, fp32)")
    load_local_state(engine, local)


def check_reshardable(engine: Any, old_world: int) -> None:
    """Only ZeRO 0 / fp32 state moves to another world size.

    Raises:
        ConfigError: ZeRO >= 1 or bf16/fp16: the fp32 partitions and their optimizer state
            are cut per rank.
    """
    if not client_steps_module(engine.zero_stage, engine.precision):
        raise ConfigError(f"checkpoint: a DeepSpeed ZeRO {engine.zero_stage} / "
                          f"{engine.precision} checkpoint of world size {old_world} cannot "
                          f"resume at world size {engine.world_size} (its fp32 partitions and "
                          f"optimizer state are cut per rank); relaunch on {old_world} ranks")


# ---- a dropped window (train.nonfinite=skip|stop) -----------------------------------------
def partition_grads_finite(engine: Any) -> bool:
    """Whether this rank's share of the window's gradients at ZeRO 1-3 is finite.

    ZeRO 1/2 hold the reduced gradients of this rank's partition (``averaged_gradients``, what
    DeepSpeed's own overflow check reads), ZeRO 3 each parameter's local gradient partition
    (``safe_get_local_grad``). No collective: a non-finite element of any rank's gradient
    reaches the reduced value, hence some rank's partition, and the trainer's per-step sum
    makes it every rank's decision.

    Args:
        engine: the set-up DeepSpeed engine, at ZeRO 1, 2 or 3.

    Returns:
        False if any element of this rank's partitions is inf or NaN.
    """
    if engine.zero_stage == 3:
        from deepspeed.utils import safe_get_local_grad
        grads = [safe_get_local_grad(p) for p in engine.parameters()]
    else:
        grads = [g for gs in engine.optimizer.averaged_gradients.values() if gs is not None
                 for g in gs if g is not None]
    grads = [g for g in grads if g is not None and g.numel()]
    if not grads:
        return True
    peaks = torch._foreach_norm(grads, float("inf"))
    return bool(torch.isfinite(torch.stack(peaks)).all())


def drop_window(engine: Any) -> None:
    """Run DeepSpeed's step for its side effects and undo its update on this rank.

    DeepSpeed keeps the window's gradients in its own buffers (reduced partitions, bucket
    state, the micro-step counter that tells the next backward to overwrite rather than add)
    and resets them only inside its ``step``. So the step runs (its collectives: every rank
    must call this), and everything it may have changed on this rank is put back from a copy
    taken just before: masters, optimizer state, module weights (ZeRO 3: partitions, in
    ``local_state``), loss scaler, counters. A copy costs one rank's state in memory, only
    for a dropped window.

    Args:
        engine: the set-up DeepSpeed engine, where DeepSpeed steps fp32 masters (not ZeRO 0 /
            fp32, whose gradients are the module's ``.grad``).
    """
    before = local_state(engine, to_cpu=False)
    weights = None if engine.zero_stage == 3 else {
        k: v.detach().clone() for k, v in engine.unwrapped().state_dict().items()}
    engine.model.set_gradient_accumulation_boundary(True)
    engine.model.step()
    with torch.no_grad():
        if weights is not None:
            engine.unwrapped().load_state_dict(weights)
        load_local_state(engine, before)
