"""Checkpoint sets that survive any kill: one directory per step, published by one rename.

Layout of ``checkpoint.dir``::

    step-000120/          a complete set (only ever created by renaming a finished temp dir)
        trainer.pt        rank 0: trainer.state_dict() (model, optimizer, grad scaler, schedule,
                          current batch plan, step/epoch/position in the epoch)
        rank-00000.pt     one per rank: that rank's RNG streams (+ any per-rank state)
        manifest.json     written last: step, world size, config, plan, sha256 of every file
    step-000120.1/        a second set of the same step (e.g. the final set after a
                          pre-emption at the last step); sets are ordered by (step, suffix)
    .step-000130.tmp/     a set being written: never read, removed by the next launch
    done.json             the run finished: its final set, step and summary

A set is written as: every rank writes and fsyncs its file into the temp dir; barrier; rank 0
hashes every file, writes the manifest, fsyncs files and directory, renames the temp dir to its
final name, fsyncs the parent, prunes to ``keep`` sets; barrier. A kill at any point leaves
the previous sets untouched and at most a temp dir behind. Every load is
``torch.load(weights_only=True)`` of bytes whose sha256 matches the manifest.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from largebatch.config import ConfigError
from largebatch.checkpoint.store import (  # noqa: F401 (re-exported)
    _flat, _load_bytes, _remove, _SET_NAME, _sha256_file, _torch_bytes, _warn, _write_durable,
    check_fresh, check_same_run, CheckpointSet, CorruptSet, DONE, FORMAT, fsync_dir, list_sets,
    load_checkpoint, MANIFEST, rank_file, read_manifest, RESUMABLE_CHANGES, rng_state,
    run_status, save_checkpoint, set_rng_state, TRAINER_FILE, verify_set, write_json_durable)


class Checkpointer:
    """Writes and resumes the checkpoint sets of one run; every rank calls every method.

    Args:
        directory: ``checkpoint.dir``; one filesystem that every rank sees.
        rank: this process's rank.
        world_size: ranks in the job (a set of another world size is resharded on load).
        barrier: waits for every rank (the engine's).
        agree: max-all-reduce of a few floats (the engine's ``reduce_scalars``), by which every
            rank adopts rank 0's choice of set; not called for one process.
        keep: complete sets kept; older ones are removed once a newer set is complete.
        config: the run's config as a dict (stored in each manifest, compared on resume).
        verbose: rank 0 prints one line when it resumes or finds the run finished.
    """

    def __init__(self, directory: str | Path, rank: int, world_size: int,
                 barrier: Callable[[], None],
                 agree: Optional[Callable[[list[float]], list[float]]] = None, keep: int = 2,
                 config: Optional[dict[str, Any]] = None, verbose: bool = True) -> None:
        self.directory = Path(directory)
        self.rank, self.world_size, self.barrier = rank, world_size, barrier
        self.agree, self.keep = agree, keep
        self.config = config or {}
        self.verbose = verbose
        self.loaded: Optional[CheckpointSet] = None  # the set this run resumed from
        self._last_step: Optional[int] = None  # step of the newest set saved or loaded
        self._last_name: Optional[str] = None  # its directory name (rank 0)

    # ---- writing --------------------------------------------------------------------------
    def __call__(self, trainer: Any) -> None:
        """Write a set of ``trainer``'s current step (the trainer's hook)."""
        self.save(trainer)

    def save(self, trainer: Any) -> None:
        """Write one set of ``trainer.state_dict()`` (every rank, the same step).

        An entry ``per_rank`` of the state dict, if any, goes into each rank's own file.
        """
        state = trainer.state_dict()  # every rank: gathering sharded state can be collective
        per_rank = state.pop("per_rank", None)
        step = int(state["run"]["step"])
        tmp = self.directory / f".step-{step:06d}.tmp"
        if self.rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            _remove(tmp)  # a leftover of a launch killed while writing this step
            tmp.mkdir()
        self.barrier()
        files = {rank_file(self.rank): {"step": step, "rank": self.rank, "rng": rng_state(),
                                        "per_rank": per_rank}}
        if self.rank == 0:
            files[TRAINER_FILE] = state
        for name, obj in files.items():
            _write_durable(tmp / name, _torch_bytes(obj))
        self.barrier()  # every rank's file is complete and fsynced
        if self.rank == 0:
            self._last_name = self._publish(tmp, step, state).name
            self._prune()
        self._last_step = step
        self.barrier()  # no rank moves on (or exits) before the set is published

    def mark_done(self, trainer: Any, summary: dict[str, Any]) -> None:
        """The run has finished: its final set (the state after the last step, before the
        closing evaluation, so that a longer re-run continues exactly) and ``done.json``
        naming it with the summary (rank 0 writes it once the set is complete)."""
        step = int(trainer.state.step)
        if self._last_step != step:  # the loop saves the last step; this is only a fallback
            self.save(trainer)
        if self.rank == 0:
            write_json_durable(self.directory / DONE, {
                "step": step, "set": self._last_name,
                "stop_reason": summary.get("stop_reason"), "summary": summary})

    def _publish(self, tmp: Path, step: int, state: dict[str, Any]) -> Path:
        """Rank 0: manifest with every file's sha256, then one rename makes the set visible."""
        files = {}
        for name in (TRAINER_FILE, *(rank_file(r) for r in range(self.world_size))):
            f = tmp / name
            if not f.is_file():  # every rank passed the barrier: it wrote elsewhere
                raise ConfigError(f"checkpoint: {f} is missing after its rank wrote it; "
                                  f"checkpoint.dir={self.directory} must be one filesystem "
                                  f"that every rank sees (a shared path across nodes)")
            files[name] = {"sha256": _sha256_file(f), "bytes": f.stat().st_size}
        run = state["run"]
        manifest = {"format": FORMAT, "step": step, "epoch": run.get("epoch"),
                    "consumed": run.get("consumed"), "world_size": self.world_size,
                    "created_unix": time.time(), "torch": torch.__version__,
                    "files": files, "config": self.config, "plan": state.get("plan")}
        _write_durable(tmp / MANIFEST, json.dumps(manifest, indent=2, default=str).encode())
        fsync_dir(tmp)
        target = self.directory / f"step-{step:06d}"
        suffix = 0
        while target.exists():  # the same step saved again: never overwrite a complete set
            suffix += 1
            target = self.directory / f"step-{step:06d}.{suffix}"
        os.rename(tmp, target)
        fsync_dir(self.directory)
        return target

    def _prune(self) -> None:
        """Rank 0, after a set is complete: keep the newest ``keep`` sets."""
        for old in list_sets(self.directory)[:-self.keep]:
            trash = self.directory / f".{old.name}.trash"
            os.rename(old.path, trash)  # out of the set namespace first: a kill mid-delete
            shutil.rmtree(trash, ignore_errors=True)  # leaves no half set to resume from
        fsync_dir(self.directory)

    # ---- choosing a set to resume from ----------------------------------------------------
    def find(self, resume: str) -> Optional[CheckpointSet]:
        """The set to resume from for ``checkpoint.resume`` (collective; rank 0 decides).

        Raises:
            ConfigError: another world size or config, a bad PATH, or an earlier run's sets
                with ``never`` (on every rank).
        """
        choice, error = [-1.0, -1.0, -1.0, -1.0], None  # status, origin, step, suffix
        if self.rank == 0:
            try:
                origin, found = self._choose(resume)
                choice = [0.0, 0.0, 0.0, 0.0] if found is None else \
                    [1.0, float(origin), float(found.step), float(found.suffix)]
            except ConfigError as exc:
                choice, error = [2.0, 0.0, 0.0, 0.0], exc
        if self.world_size > 1 and self.agree is not None:
            choice = self.agree(choice)
        if error is not None:
            raise error
        status, origin, step, suffix = (int(v) for v in choice)
        if status == 2:
            raise ConfigError("checkpoint.resume: rank 0 refused the checkpoint (its error "
                              "message says why)")
        if status == 0:
            return None
        base = {0: self.directory, 1: Path(resume), 2: Path(resume)}[origin]
        path = base if origin == 1 else base / (f"step-{step:06d}" + (f".{suffix}" if suffix
                                                                      else ""))
        try:
            found = CheckpointSet(path, step, suffix, read_manifest(path))
        except CorruptSet as exc:
            raise ConfigError(f"checkpoint.resume: {exc}") from None
        # Another world size is allowed (a re-launch on fewer or more GPUs): ``load`` reshards.
        if origin == 0:
            check_same_run(found.manifest.get("config", {}), self.config, path)
        return found

    def _choose(self, resume: str) -> tuple[int, Optional[CheckpointSet]]:
        """Rank 0: (origin, set) with origin 0 = checkpoint.dir, 1 = PATH is a set,
        2 = PATH is a directory of sets."""
        for leftover in self.directory.glob(".step-*"):  # temp/trash dirs of killed launches
            _remove(leftover)
        if resume == "never":
            check_fresh(self.directory)
            return 0, None
        own = self._newest_valid(self.directory, quarantine=True)
        if own is not None or resume == "auto":
            return 0, own  # PATH only seeds a fresh checkpoint.dir; a requeue continues here
        p = Path(resume)
        if (p / MANIFEST).exists() or _SET_NAME.match(p.name):
            try:
                manifest = verify_set(p)
            except CorruptSet as exc:
                raise ConfigError(f"checkpoint.resume={resume}: {exc}") from None
            return 1, CheckpointSet(p, int(manifest["step"]), 0, manifest)
        if p.is_dir():
            found = self._newest_valid(p, quarantine=False)
            if found is None:
                raise ConfigError(f"checkpoint.resume={resume}: no complete checkpoint set there")
            return 2, found
        raise ConfigError(f"checkpoint.resume={resume}: no such checkpoint set or directory "
                          f"(expected 'auto', 'never' or a path)")

    def _newest_valid(self, directory: Path, quarantine: bool) -> Optional[CheckpointSet]:
        """Newest set whose files all match the manifest; each bad one is named on stderr
        and (in our own directory) renamed out of the way, never deleted."""
        for s in reversed(list_sets(directory)):
            try:
                s.manifest = verify_set(s.path)
                return s
            except CorruptSet as exc:
                moved = ""
                if quarantine:
                    bad = s.path.with_name(f"{s.name}.corrupt")
                    n = 0
                    while bad.exists():
                        n += 1
                        bad = s.path.with_name(f"{s.name}.corrupt{n}")
                    os.rename(s.path, bad)
                    moved = f", moved to {bad.name}"
                _warn(f"checkpoint set {s.path} is unusable ({exc}){moved}; trying the "
                      f"previous set")
        return None

    # ---- loading --------------------------------------------------------------------------
    def _read(self, found: CheckpointSet, name: str) -> Any:
        path = found.path / name
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"checkpoint file {path} is unreadable ({exc.strerror})") from None
        if hashlib.sha256(data).hexdigest() != found.manifest["files"][name]["sha256"]:
            raise ConfigError(f"checkpoint file {path} does not match its sha256 in the manifest")
        return _load_bytes(data, path)

    def load(self, trainer: Any, found: CheckpointSet) -> None:
        """Restore ``trainer`` and this rank's RNG streams from set ``found``.

        A set written at another world size is resharded (``_load_resharded``).
        """
        state = self._read(found, TRAINER_FILE)
        old_world = int(found.manifest["world_size"])
        if old_world != self.world_size:
            self._load_resharded(trainer, found, state, old_world)
        else:
            mine = self._read(found, rank_file(self.rank))
            if mine.get("per_rank") is not None:
                state["per_rank"] = mine["per_rank"]
            trainer.load_state_dict(state)
            set_rng_state(mine["rng"])
        self.loaded = found
        self._last_step, self._last_name = found.step, found.name
        if self.rank == 0 and self.verbose and not self._loaded_final():
            print(f"resumed from {found.path} at step {found.step}", flush=True)

    def _load_resharded(self, trainer: Any, found: CheckpointSet, state: dict[str, Any],
                        old_world: int) -> None:
        """Resume a set written at ``old_world`` ranks on this launch's world size.

        The replicated state (model, optimizer, schedule, counters) loads as usual; every rank
        reads ALL old rank files (sha256-checked, weights_only) and its sharded modules (head
        shards and their optimizer rows) are cut again for the new layout; the trainer maps
        the data position and rebuilds the batch plan for the new world. Per-rank RNG streams
        cannot map between world sizes: each rank is reseeded from (train.seed, rank, step).
        So a resharded resume is exact for the weights at load time, but not bit-identical
        afterwards to an uninterrupted run at either world size.
        """
        from largebatch.dist import rank_seed, seed_everything
        if self.rank == 0 and self.verbose:
            print(f"resharding checkpoint from world {old_world} to {self.world_size}",
                  flush=True)
        olds = [self._read(found, rank_file(r)) for r in range(old_world)]
        per_rank = [o.get("per_rank") for o in olds]
        state["per_rank"] = None
        state["per_rank_all"] = None if any(p is None for p in per_rank) else per_rank
        state["resharded_from"] = old_world
        trainer.load_state_dict(state)
        seed = int(self.config.get("train", {}).get("seed", 0))
        seed_everything(rank_seed(seed, self.rank) ^ int(found.step))

    # ---- the finished run -----------------------------------------------------------------
    def done(self) -> Optional[dict[str, Any]]:
        """The done marker (final set, step, summary), or None."""
        try:
            return json.loads((self.directory / DONE).read_text())
        except (OSError, ValueError):
            return None

    def _loaded_final(self) -> bool:
        done = self.done()
        return bool(done) and self.loaded is not None and done.get("set") == self.loaded.name

    def finished(self, stop_reason: str) -> Optional[dict[str, Any]]:
        """Before the first step: the stored summary if this run is already over, else None.

        Over = resumed from the set the done marker names, and the stop condition
        (``stop_reason``, evaluated on the restored state) still holds. A run that trains on
        (e.g. a larger train.max_steps) drops the now stale marker.
        """
        final = self._loaded_final()
        done = self.done()
        if final and stop_reason:
            if self.rank == 0 and self.verbose:
                print(f"largebatch: run already finished at step {done['step']} "
                      f"({done.get('stop_reason')}, {self.directory / DONE}); nothing to do",
                      flush=True)
            return done["summary"]
        if self.rank == 0 and done is not None:
            (self.directory / DONE).unlink(missing_ok=True)
            if final and self.verbose:
                print(f"resumed from {self.loaded.path} at step {self.loaded.step} "
                      f"(finished before; training on to the new limit)", flush=True)
        return None
