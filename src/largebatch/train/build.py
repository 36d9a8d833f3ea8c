"""Build a run from a config and train it: the composition root.

The flow is one-way: config -> launch and device -> batch plan -> task parts and engine ->
schedule, loaders, policies, noise scale -> trainer; the checkpointer receives every stateful
part by name, resumes them, and the optional tools (``batch.micro_size=auto``,
``optim.lr=auto``) resolve what the config left open through the parts' public methods.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from largebatch.checkpoint import Checkpointer, branch, check_fresh, list_sets, save_checkpoint
from largebatch.config import Config, ConfigError, to_dict
from largebatch.data.loaders import Resizable
from largebatch.data.registry import build_loaders, dataset, dataset_size
from largebatch.dist import (DistEnv, check_launch, detect_launch, init_process_group,
                             pick_device, rank_seed, seed_everything)
from largebatch.engines import Engine, build_engine
from largebatch.errors import StorageError
from largebatch.metrics import MetricsLogger, check_wandb_online
from largebatch.noise.scale import NoiseScaleMonitor
from largebatch.optim import build_optimizer
from largebatch.optim.schedules import LRSchedule, build_schedule
from largebatch.plan import BatchPlan, make_plan, scaled_lr
from largebatch.policies.base import Policies
from largebatch.policies.goodput import build_goodput
from largebatch.policies.plateau import build_plateau
from largebatch.signals import release_early
from largebatch.tasks import Task, build_task
from largebatch.train.agreement import check_ranks_agree, run_facts
from largebatch.train.preemption import watch_preemption
from largebatch.train.storage import check_storage, claim_output, needed_bytes, param_bytes
from largebatch.train.trainer import Trainer


def plan_for(cfg: Config, world_size: int) -> BatchPlan:
    """The batch plan for ``cfg`` at ``world_size`` (no data is read)."""
    return make_plan(cfg, world_size, dataset_size(cfg, train=True))


def check_world_size(cfg: Config, denv: DistEnv) -> None:
    """Stop when the launch has another world size than asked for (e.g. accelerate's --cpu)."""
    expected = cfg.engine.expected_world_size
    if expected and expected != denv.world_size:
        raise ConfigError(f"engine.expected_world_size={expected} but the launcher started "
                          f"world_size {denv.world_size} (launcher: {denv.launcher}); for "
                          f"accelerate on CPU use ACCELERATE_USE_CPU=1 accelerate launch "
                          f"--multi_gpu --num_processes {expected}")


def setup_runtime(cfg: Config, denv: Optional[DistEnv] = None) -> tuple[DistEnv, torch.device]:
    """Detect the launch, pick the device and create the process group (idempotent)."""
    if denv is None:
        denv = detect_launch()
        check_launch(denv)  # e.g. `accelerate launch --cpu --num_processes 2` started 1 process
    check_world_size(cfg, denv)
    device = pick_device(cfg.train.device, denv.local_rank)
    init_process_group(denv, device, cfg.engine.backend)
    return denv, device


@dataclass
class Run:
    """Everything one training run is made of, built but not yet trained."""

    cfg: Config
    denv: DistEnv
    plan: BatchPlan
    engine: Engine
    trainer: Trainer
    logger: MetricsLogger
    policies: Policies
    checkpointer: Optional[Checkpointer] = None


def build_run(cfg: Config, denv: Optional[DistEnv] = None, quiet: bool = False) -> Run:
    """Launch, plan, model, engine, schedule, loaders, policies, logger, trainer; resumed
    from a checkpoint set when there is one."""
    denv, device = setup_runtime(cfg, denv)
    dataset(cfg.data.name).prepare(cfg.data, denv)  # rank 0 downloads, the others wait
    plan = plan_for(cfg, denv.world_size)  # micro_size=auto: provisional until the search
    # Every rank must run the same experiment on the same data: one collective, before any
    # model is built (a mismatch is one line on every rank, naming the keys, exit 2).
    facts = run_facts(to_dict(cfg), plan.to_json(), plan.dataset_size,
                      dataset(cfg.data.name).data_files(cfg))
    if writes_sets(cfg):  # every rank writes its shards there: one folder for all
        facts["checkpoint.folder"] = str(checkpoint_dir(cfg))
    check_ranks_agree(facts, device)
    check_wandb_online(cfg.log.wandb.mode)  # on every rank: no rank may wait for a failed one
    # Same seed on every rank for the model init (DDP would broadcast anyway), then a per-rank
    # stream so dropout masks differ across ranks like they would across samples.
    seed_everything(cfg.train.seed)
    task = build_task(cfg)
    engine = _build_engine(cfg, denv, device, plan, task)
    checkpointer = make_checkpointer(cfg, denv, engine, quiet)
    # Before anything is written: the folders made, written to and measured (one line on
    # every rank, exit 2, instead of a traceback at the first save after the compute is spent).
    check_storage(storage_needs(cfg, engine, denv, checkpointer is not None), denv.is_main,
                  device)
    source = None if checkpointer is None else checkpointer.find(cfg.checkpoint.resume)
    if cfg.batch.micro_size == "auto":  # before the schedule and loaders, which need the size
        plan = auto_micro_plan(cfg, denv, device, engine, task, plan, source)
    if denv.is_main and not quiet:
        print(plan.describe(), flush=True)
    seed_everything(rank_seed(cfg.train.seed, denv.rank))
    schedule = build_schedule(
        engine.optimizers, cfg.schedule, plan,
        cfg.schedule.total_steps or plan.planned_steps(cfg.train.epochs, cfg.train.max_steps),
        reduce_mean=lambda x: engine.reduce_scalars([x], op="mean")[0])
    train_loader, eval_loader = build_loaders(cfg, plan.micro_size, denv, cfg.train.seed,
                                              device)
    policies = _build_policies(cfg, task, schedule, plan, train_loader, engine)
    noise = NoiseScaleMonitor(engine, cfg.train.noise_scale or policies.needs_noise_scale,
                              plan.accum_steps, engine.describe())
    logger = MetricsLogger(cfg.log, denv.is_main, to_dict(cfg), append=source is not None,
                           console=not quiet)
    logger.write_json("plan.json", plan.to_json())
    logger.write_json("config.json", to_dict(cfg))
    trainer = Trainer(cfg, task, engine, schedule, plan, train_loader, eval_loader, logger,
                      noise, policies, checkpointer)
    if checkpointer is not None:
        # Every stateful part, by name: what a set holds and what a resume restores.
        checkpointer.register("trainer", trainer, reshardable=True)
        checkpointer.register("schedule", schedule)
        checkpointer.register_per_rank("engine", engine)
        checkpointer.register("noise_scale", noise)
        checkpointer.register("policies", policies, reshardable=True)
        if source is not None:
            built = engine.optimizer_hparams()  # what this run's config asks for
            checkpointer.load(source)  # rank 0 prints "resumed from SET at step N"
            source = checkpointer.loaded  # an earlier set if that one was corrupt
            adopt_config(cfg, checkpointer, trainer, engine, built, denv.is_main and not quiet)
        watch_preemption(trainer)
    else:  # no set to stop with: a stop signal ends the process, as it always did
        release_early()
    if cfg.optim.lr == "auto":  # the range test picks the peak LR; a resumed run keeps its own
        from largebatch.tune.lr_auto import resolve_lr
        plan = resolve_lr(cfg, trainer, denv.is_main, source, quiet)
    return Run(cfg, denv, plan, engine, trainer, logger, policies, checkpointer)


def adopt_config(cfg: Config, checkpointer: Checkpointer, trainer: Trainer, engine: Engine,
                 built: list[list[dict[str, Any]]], announce: bool) -> None:
    """After a resume: the run's config wherever it may differ from the set's.

    A branch (``checkpoint.resume=PATH``; ``Checkpointer.find`` refused its structural
    differences) takes the run's optimizer hyper-parameters (``built``: every optimizer the
    schedule drives, the sharded head's too), its LR (peak and warmup of the run's plan at the
    global batch in force) and its schedule length and shape; one line says what differs and
    where the LR jumps. A resume in the run's own directory differs at most in
    ``RESUMABLE_CHANGES``: a changed length is applied, and said when it moves the LR.

    Raises:
        ConfigError: the set's optimizers have another layout of param groups.
    """
    info, schedule = checkpointer.loaded.info, trainer.schedule
    safe = checkpointer.branch_changes
    if safe is None:
        safe = [c for c in branch.changes(info.config, to_dict(cfg))
                if c.key in branch.LENGTH_KEYS]
        if not safe:
            return
    keys, before = {c.key for c in safe}, schedule.lr
    if checkpointer.branch_changes is not None:
        try:
            engine.set_optimizer_hparams(built)
        except ValueError as exc:
            raise ConfigError(f"checkpoint.resume={checkpointer.loaded.path}: its optimizer "
                              f"state does not fit this run ({exc})") from None
        if keys & branch.LR_KEYS and cfg.optim.lr != "auto":
            initial, now = trainer.initial_plan, trainer.plan
            trainer.use_lr_plan(initial, dataclasses.replace(
                now, base_lr=initial.base_lr, scale_rule=initial.scale_rule,
                base_batch=initial.base_batch, warmup_steps=initial.warmup_steps,
                lr_auto=initial.lr_auto, peak_lr=scaled_lr(
                    initial.base_lr, initial.scale_rule, now.global_size, initial.base_batch)),
                cfg.schedule.warmup_start_factor)
    old_total = _schedule_length(info.config, trainer.initial_plan)
    schedule.set_length(_schedule_length(to_dict(cfg), trainer.initial_plan) or
                        schedule.total_steps)
    parts = []
    if cfg.schedule.name in ("cosine", "poly") and old_total not in (None,
                                                                     schedule.total_steps):
        parts.append(f"{cfg.schedule.name} over {old_total} -> {schedule.total_steps} steps")
    if not math.isclose(before, schedule.lr, rel_tol=1e-12):
        parts.append(f"LR of step {info.step + 1} {before:.6g} -> {schedule.lr:.6g}")
    if not announce:
        return
    if checkpointer.branch_changes is not None:
        print(branch.describe(checkpointer.loaded.path, safe, "; ".join(parts)), flush=True)
    elif parts:
        print(f"resumed with {', '.join(map(str, safe))} (schedule: {'; '.join(parts)})",
              flush=True)


def _schedule_length(config: dict[str, Any], plan: BatchPlan) -> Optional[int]:
    """The decay length a config gives (``schedule.total_steps``, else the planned steps of
    its ``train.epochs``/``train.max_steps`` at ``plan``), or None when it does not say."""
    sched, run = config.get("schedule"), config.get("train")
    if not isinstance(sched, dict) or not isinstance(run, dict):
        return None
    total, epochs, steps = sched.get("total_steps"), run.get("epochs"), run.get("max_steps")
    if isinstance(total, int) and not isinstance(total, bool) and total > 0:
        return total
    if isinstance(epochs, (int, float)) and isinstance(steps, int) and \
            0 <= epochs < 1e9 and steps >= 0:
        return plan.planned_steps(float(epochs), steps)
    return None


def _build_engine(cfg: Config, denv: DistEnv, device: torch.device, plan: BatchPlan,
                  task: Task) -> Engine:
    """The task's parts placed on the engine: the replicated model with its optimizer, each
    sharded module (never wrapped) with its own, at the same LR and boundary."""
    parts = task.build()
    engine = build_engine(cfg, denv, device, plan)
    engine.setup(parts.model, build_optimizer(cfg.optim, parts.model, lr=plan.peak_lr))
    for module in parts.sharded:
        engine.setup_sharded(module, task.sharded_optimizer(module, lr=plan.peak_lr))
    return engine


def _build_policies(cfg: Config, task: Task, schedule: LRSchedule, plan: BatchPlan,
                    train_loader: Any, engine: Engine) -> Policies:
    """What may change the plan during the run (plateau growth, goodput), in that order."""
    return Policies([*build_plateau(cfg, task, schedule),
                     *build_goodput(cfg, plan, isinstance(train_loader, Resizable), engine,
                                    task.loss)])


def auto_micro_plan(cfg: Config, denv: DistEnv, device: torch.device, engine: Engine,
                    task: Task, plan: BatchPlan, source: Any) -> BatchPlan:
    """``plan`` with ``batch.micro_size=auto`` resolved (collective: one min-reduce).

    A resumed run at the same world size keeps the micro size of its checkpoint's plan (the
    device may differ, the trajectory must not); otherwise the cache or a search decides, on
    the unwrapped model (DDP's hooks and buffer broadcasts stay out of the trial steps).
    """
    from largebatch.tune.micro_batch import AutoMicro, find_micro_size, first_batch
    saved = None if source is None else source.info.plan
    if saved and saved.get("world_size") == denv.world_size:
        old = BatchPlan.from_json(saved)
        auto = AutoMicro(old.micro_size, "checkpoint",
                         candidates=tuple((old.micro_auto or {}).get("candidates", ())))
        return plan.with_micro_size(auto.micro_size, auto.to_json())
    loader, _ = build_loaders(cfg, min(plan.window_size, 64), denv, cfg.train.seed, device)
    sample = first_batch(loader, 64)
    sample = (sample[0].to(device), sample[1].to(device))
    del loader
    auto = find_micro_size(cfg, engine.unwrapped(), engine.optimizer, task.loss, sample,
                           denv.world_size,
                           lambda m: int(engine.reduce_scalars([float(m)], op="min")[0]),
                           is_main=denv.is_main)
    return plan.with_micro_size(auto.micro_size, auto.to_json())


def checkpoint_dir(cfg: Config) -> Path:
    """Where the run's checkpoint sets live (checkpoint.dir, else log.out_dir/checkpoints)."""
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(cfg.log.out_dir) / "checkpoints"


def storage_needs(cfg: Config, engine: Engine, denv: DistEnv,
                  writes_sets: bool) -> dict[str, tuple[Path, int]]:
    """``{field: (folder, bytes the run writes there at most at once)}``: ``log.out_dir``
    (``model.pt``) and, for a run that writes sets, the checkpoint folder (``storage``)."""
    sharded = [p for m in engine.sharded.modules for p in m.parameters()]
    params = param_bytes(engine.unwrapped().parameters(), sharded, denv.world_size)
    needs = {"log.out_dir": (Path(cfg.log.out_dir), params)}
    if writes_sets:
        directory = checkpoint_dir(cfg)
        present = len(list_sets(directory)) if denv.is_main else 0
        needs["checkpoint.dir"] = (directory, needed_bytes(params, cfg.checkpoint.keep,
                                                           present))
    return needs


def writes_sets(cfg: Config) -> bool:
    """Whether the run has a checkpointer (see ``make_checkpointer``)."""
    ck = cfg.checkpoint
    return not (ck.resume == "never" and ck.dir is None and not ck.every_steps)


def make_checkpointer(cfg: Config, denv: DistEnv, engine: Engine,
                      quiet: bool = False) -> Optional[Checkpointer]:
    """The run's checkpointer, in checkpoint.dir (default: log.out_dir/checkpoints).

    Every run has one (so SIGTERM/SIGUSR1 always end in a checkpoint and a finished run is
    recognised when requeued), except ``checkpoint.resume=never`` with neither
    ``checkpoint.dir`` nor ``checkpoint.every_steps`` set: such a run writes no sets at all
    (the study's runs), and may not start over an earlier run's sets, which would go stale.
    """
    ck = cfg.checkpoint
    directory = checkpoint_dir(cfg)
    if not writes_sets(cfg):
        check_fresh(directory)
        return None
    return Checkpointer(directory, denv.rank, denv.world_size, engine.barrier,
                        agree=lambda values: engine.reduce_scalars(values, op="max"),
                        keep=ck.keep, config=to_dict(cfg), seed=cfg.train.seed,
                        verbose=not quiet)


def finish_run(run: Run, summary: dict[str, Any], quiet: bool = False) -> dict[str, Any]:
    """Write summary.json and the final weights (rank 0), close the metrics sinks."""
    summary["engine"] = run.engine.name
    summary["world_size"] = run.denv.world_size
    state = run.engine.state_dict()  # may be a collective (ZeRO): every rank calls it
    if run.denv.is_main:
        try:
            run.logger.write_json("summary.json", summary)
            save_checkpoint(Path(run.cfg.log.out_dir) / "model.pt", {"model": state["model"]})
        except OSError as exc:  # the final set is complete; status says resumable
            # An earlier run's model.pt (this one trained on from it) must not pass for this
            # run's: without it status says resumable, and a relaunch writes the weights.
            (Path(run.cfg.log.out_dir) / "model.pt").unlink(missing_ok=True)
            raise StorageError(f"log.out_dir={run.cfg.log.out_dir}: writing the final "
                               f"weights failed ({exc.strerror or exc}: {exc.filename}); the "
                               f"final checkpoint set is complete (a relaunch writes them)") \
                from None
    run.logger.close(summary)
    if run.denv.is_main and not quiet:
        finals = tuple(f"final_{m.name}" for m in run.trainer.task.metrics)
        keys = ("steps", "epochs_run", *finals, "reached_target", "time_to_target_s",
                "stop_reason")
        print("summary: " + json.dumps({k: summary[k] for k in keys}), flush=True)
    return summary


def train(cfg: Config, denv: Optional[DistEnv] = None, quiet: bool = False) -> dict[str, Any]:
    """Train one run described by ``cfg``; returns the summary (also written to summary.json).

    Rank 0 holds the lock on ``log.out_dir`` from before anything is built until the run
    returns (``storage.claim_output``): a second run into the folder stops in one line.
    """
    denv, device = setup_runtime(cfg, denv)
    lock = claim_output(Path(cfg.log.out_dir), denv.is_main, device)
    try:
        run = build_run(cfg, denv, quiet)
        return finish_run(run, run.trainer.fit(), quiet)
    finally:
        lock.release()
