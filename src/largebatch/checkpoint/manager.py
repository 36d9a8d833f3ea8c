"""Checkpoint sets that survive any kill: one directory per step, published by one rename.

The run registers its stateful parts by name (torchtitan's habit): the trainer's counters and
plan, the schedule, the engine (its replicated half and each rank's own), the noise-scale
estimate, the policies. A set holds what each part's ``state_dict`` returned; resuming hands
each part back its own. The checkpointer never looks inside a part.

Layout of ``checkpoint.dir``::

    step-000120/          a complete set (only ever created by renaming a finished temp dir)
        trainer.pt        rank 0: {part name: state_dict()} of every replicated part
        rank-00000.pt     one per rank: its RNG streams and {name: rank_state_dict()}
        manifest.json     written last: step, world size, config, plan, sha256 of every file
    step-000120.1/        a second set of the same step (e.g. the final set after a
                          pre-emption at the last step); sets are ordered by (step, suffix)
    .step-000130.tmp/     a set being written: never read, removed by the next launch
    done.json             the run finished: its final set, step and summary

A set is written as: every rank writes and fsyncs its file into the temp dir; barrier; rank 0
hashes every file, writes the manifest, fsyncs files and directory, renames the temp dir to its
final name, fsyncs the parent, prunes to ``keep`` sets; barrier. A kill at any point leaves
the previous sets untouched and at most a temp dir behind. The barriers are max-reduces of
"did a write fail here": a failed write on any rank (a full disk, a folder gone read-only)
stops every rank with one line (``StorageError``, exit 74), the temp dir removed and the
previous sets untouched (``checkpoint.publish``). Every load is
``torch.load(weights_only=True)`` of bytes whose sha256 matches the manifest, and every
manifest is read against its schema (``checkpoint.meta``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from largebatch.checkpoint.branch import Change, check_branch
from largebatch.checkpoint.meta import (DONE, MANIFEST, TRAINER_FILE, CorruptSet, DoneMarker,
                                        SetInfo, rank_file)
from largebatch.checkpoint.publish import prune_sets, publish_set, save_failed
from largebatch.checkpoint.store import (CheckpointSet, _SET_NAME, _load_part, _remove, _warn,
                                         check_fresh, check_payload, check_same_run,
                                         newest_valid, quarantine, read_set_file, verify_set)
from largebatch.config import ConfigError
from largebatch.dist import rank_seed, seed_everything
from largebatch.errors import StorageError
from largebatch.io import rng_state, set_rng_state, torch_bytes, write_durable, write_json_atomic


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
        seed: ``train.seed`` (a resharded resume reseeds each rank's RNG streams from it).
        verbose: rank 0 prints one line when it resumes or finds the run finished.
    """

    def __init__(self, directory: str | Path, rank: int, world_size: int,
                 barrier: Callable[[], None],
                 agree: Optional[Callable[[list[float]], list[float]]] = None, keep: int = 2,
                 config: Optional[dict[str, Any]] = None, seed: int = 0,
                 verbose: bool = True) -> None:
        self.directory = Path(directory)
        self.rank, self.world_size, self.barrier = rank, world_size, barrier
        self.agree, self.keep, self.seed = agree, keep, seed
        self.config = config or {}
        self.verbose = verbose
        self.loaded: Optional[CheckpointSet] = None  # the set this run resumed from
        #: A branch (checkpoint.resume=PATH into this directory): the set's config keys
        #: that differ and are safe (``branch.check_branch``); None when not branching.
        self.branch_changes: Optional[list[Change]] = None
        self._last_step: Optional[int] = None  # step of the newest set saved or loaded
        self._last_name: Optional[str] = None  # its directory name (rank 0)
        self._parts: dict[str, Any] = {}  # name -> part whose state every rank holds alike
        self._rank_parts: dict[str, Any] = {}  # name -> part with a per-rank half
        self._reshardable: set[str] = set()

    # ---- the run's parts ------------------------------------------------------------------
    def register(self, name: str, part: Any, reshardable: bool = False) -> None:
        """Save and restore ``part`` (``state_dict``/``load_state_dict``) under ``name``; with
        ``reshardable`` it also has ``load_resharded(state, old_world)`` for a set of another
        world size (else it loads as saved)."""
        self._check_name(name)
        self._parts[name] = part
        if reshardable:
            self._reshardable.add(name)

    def register_per_rank(self, name: str, part: Any) -> None:
        """A part with a replicated half (``state_dict``, rank 0's file) and this rank's own
        (``rank_state_dict``, its file), restored by ``load_state_dict(state, rank_state)``
        or, from another world size, ``load_resharded(state, every old rank's half)``."""
        self._check_name(name)
        self._rank_parts[name] = part

    def _check_name(self, name: str) -> None:
        if name in self._parts or name in self._rank_parts or name in ("step", "rank", "rng"):
            raise ValueError(f"checkpoint part {name!r} is registered twice or reserved")

    # ---- writing --------------------------------------------------------------------------
    def has_set(self, step: int) -> bool:
        """Whether the newest set saved or loaded is of ``step``."""
        return self._last_step == step

    def save(self, step: int, facts: dict[str, Any]) -> None:
        """Write one set of every part at ``step`` (every rank, the same step). ``facts``:
        what the manifest says of the run's position (epoch, consumed, plan)."""
        # Every rank, before anything is written: gathering sharded state can be collective.
        shared = {name: part.state_dict() for name, part in self._parts.items()}
        shared.update({name: part.state_dict() for name, part in self._rank_parts.items()})
        own = {name: part.rank_state_dict() for name, part in self._rank_parts.items()}
        tmp, failed = self.directory / f".step-{step:06d}.tmp", None
        if self.rank == 0:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                _remove(tmp)  # a leftover of a launch killed while writing this step
                tmp.mkdir()
            except OSError as exc:
                failed = exc
        self._all_wrote(failed, tmp, step)
        files = {rank_file(self.rank): {"step": step, "rank": self.rank, "rng": rng_state(),
                                        **own}}
        if self.rank == 0:
            files[TRAINER_FILE] = shared
        try:
            for name, obj in files.items():
                write_durable(tmp / name, torch_bytes(obj))
        except OSError as exc:  # a full disk, a folder gone read-only, a file size limit
            failed = exc
        self._all_wrote(failed, tmp, step)  # every rank's file is complete and fsynced
        if self.rank == 0:
            try:
                self._last_name = publish_set(tmp, self.directory, step, self.world_size,
                                              self.config, facts).name
                prune_sets(self.directory, self.keep)
            except (OSError, ConfigError) as exc:  # (not agreed, the other ranks would hang)
                failed = exc
        self._all_wrote(failed, tmp, step)  # no rank moves on before the set is published
        self._last_step = step

    def _all_wrote(self, error: Optional[BaseException], tmp: Path, step: int) -> None:
        """In place of a barrier: every rank learns whether a write of this set failed on
        any rank (one max-reduce), and then all stop with one line: the temp set is removed
        (its space given back), every earlier complete set is left as it was.

        Raises:
            StorageError: on every rank, when a write failed on any.
        """
        failed = [float(error is not None)]
        if self.world_size > 1 and self.agree is not None:
            failed = self.agree(failed)
        else:
            self.barrier()
        if failed[0]:
            raise save_failed(self.directory, tmp, step, self.rank, error)

    def mark_done(self, step: int, facts: dict[str, Any], summary: dict[str, Any]) -> None:
        """The run has finished: its final set (the state after the last step, before the
        closing evaluation, so that a longer re-run continues exactly) and ``done.json``
        naming it with the summary (rank 0 writes it once the set is complete)."""
        if self._last_step != step:  # the loop saves the last step; this is only a fallback
            self.save(step, facts)
        if self.rank == 0:
            try:
                write_json_atomic(self.directory / DONE, {
                    "step": step, "set": self._last_name,
                    "stop_reason": summary.get("stop_reason"), "summary": summary})
            except OSError as exc:  # the run is not marked finished: status says resumable
                raise StorageError(f"checkpoint.dir={self.directory}: writing {DONE} failed "
                                   f"({exc.strerror or exc}); the final set {self._last_name} "
                                   f"is complete (a relaunch finishes the run)") from None

    # ---- choosing a set to resume from ----------------------------------------------------
    def find(self, resume: str) -> Optional[CheckpointSet]:
        """The set to resume from for ``checkpoint.resume`` (collective; rank 0 decides); a
        branch (PATH) also sets ``branch_changes``.

        Raises:
            ConfigError: another config (auto), a structural difference (PATH), a bad PATH,
                or an earlier run's sets with ``never`` (on every rank).
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
            found = CheckpointSet(path, step, suffix, verify_set(path))
        except CorruptSet as exc:
            raise ConfigError(f"checkpoint.resume: {exc}") from None
        # Another world size is allowed (a re-launch on fewer or more GPUs): ``load`` reshards.
        if origin == 0:
            check_same_run(found.info.config, self.config, path)
            self.branch_changes = None
        else:
            self.branch_changes = check_branch(found.info.config, self.config, path,
                                               found.info.world_size != self.world_size)
        return found

    def _choose(self, resume: str) -> tuple[int, Optional[CheckpointSet]]:
        """Rank 0: (origin, set) with origin 0 = checkpoint.dir, 1 = PATH is a set,
        2 = PATH is a directory of sets."""
        for leftover in self.directory.glob(".step-*"):  # temp/trash dirs of killed launches
            _remove(leftover)
        if resume == "never":
            check_fresh(self.directory)
            return 0, None
        own = newest_valid(self.directory, move=True)
        if own is not None or resume == "auto":
            return 0, own  # PATH only seeds a fresh checkpoint.dir; a requeue continues here
        p = Path(resume)
        if (p / MANIFEST).exists() or _SET_NAME.match(p.name):
            try:
                info = verify_set(p)
            except CorruptSet as exc:
                raise ConfigError(f"checkpoint.resume={resume}: {exc}") from None
            return 1, CheckpointSet(p, info.step, 0, info)
        if p.is_dir():
            found = newest_valid(p, move=False)
            if found is None:
                raise ConfigError(f"checkpoint.resume={resume}: no complete checkpoint set there")
            return 2, found
        raise ConfigError(f"checkpoint.resume={resume}: no such checkpoint set or directory "
                          f"(expected 'auto', 'never' or a path)")

    # ---- loading --------------------------------------------------------------------------
    def load(self, found: CheckpointSet) -> SetInfo:
        """Restore every registered part and this rank's RNG streams from set ``found``
        (collective: every rank says whether its files loaded).

        A set written at another world size is resharded: every rank reads ALL old rank files
        (sha256-checked, weights_only); per-rank parts cut their state again for this layout,
        reshardable parts map what depends on the world (the trainer: its epoch position).
        Per-rank RNG streams cannot map between world sizes: each rank is reseeded from
        (train.seed, rank, step), so a resharded resume is exact for the weights at load time
        but not bit-identical afterwards to an uninterrupted run at either world size.

        A set whose files hold a part of the wrong type, a part missing, a rank file of
        another rank or step, or state that a part's ``load_state_dict`` rejects is corrupt:
        in this run's own directory it is moved aside (one line naming the file and the part)
        and the previous complete set is loaded instead, every part again; a branch's set
        (``checkpoint.resume=PATH``) is refused in one line.

        Returns:
            The manifest of the set loaded (``self.loaded``).

        Raises:
            ConfigError: a hostile file, state that cannot move to this world size, a
                branch's set that does not load, or no complete set left to fall back on.
        """
        while True:
            problem, refused = self._try_load(found)
            verdict = [float(bool(problem)), float(refused is not None)]
            if self.world_size > 1 and self.agree is not None:
                verdict = self.agree(verdict)
            if refused is not None:
                raise refused
            if verdict[1]:
                raise ConfigError(f"checkpoint {found.path}: another rank refused it (its "
                                  f"error message says why)")
            if not verdict[0]:
                break
            found = self._after_bad(found, problem)
        self.loaded = found
        if found.path.parent.resolve() == self.directory.resolve():
            self._last_step, self._last_name = found.step, found.name
        # else a branch from another run's set: this directory has no set of that step yet
        # (the final one, if the run stops at once, is written here).
        if self.rank == 0 and self.verbose and not self._loaded_final():
            print(f"resumed from {found.path} at step {found.step}", flush=True)
        return found.info

    def _try_load(self, found: CheckpointSet) -> tuple[str, Optional[ConfigError]]:
        """Load ``found`` into the parts: ('', None), or why it is corrupt, or a refusal."""
        try:
            self._load_parts(found)
            return "", None
        except CorruptSet as exc:
            return str(exc), None
        except ConfigError as exc:
            return "", exc

    def _load_parts(self, found: CheckpointSet) -> None:
        info, names = found.info, [*self._parts, *self._rank_parts]
        trainer_path = found.path / TRAINER_FILE
        shared = check_payload(read_set_file(found, TRAINER_FILE), trainer_path, names,
                               found.step)
        if info.world_size == self.world_size:
            own_path = found.path / rank_file(self.rank)
            own = check_payload(read_set_file(found, own_path.name), own_path, self._rank_parts,
                                found.step, self.rank)
            for name, part in self._parts.items():
                _load_part(trainer_path, name, part.load_state_dict, shared[name])
            for name, part in self._rank_parts.items():
                _load_part(own_path, name, part.load_state_dict, shared[name], own.get(name))
            _load_part(own_path, "rng", set_rng_state, own["rng"])
            return
        if self.rank == 0 and self.verbose:
            print(f"resharding checkpoint from world {info.world_size} to "
                  f"{self.world_size}", flush=True)
        olds = [check_payload(read_set_file(found, rank_file(r)), found.path / rank_file(r),
                              self._rank_parts, found.step, r) for r in range(info.world_size)]
        for name, part in self._parts.items():
            if name in self._reshardable:
                _load_part(trainer_path, name, part.load_resharded, shared[name],
                           info.world_size, reshard=True)
            else:
                _load_part(trainer_path, name, part.load_state_dict, shared[name])
        for name, part in self._rank_parts.items():
            _load_part(trainer_path, name, part.load_resharded, shared[name],
                       [o.get(name) for o in olds], reshard=True)
        seed_everything(rank_seed(self.seed, self.rank) ^ int(found.step))

    def _after_bad(self, found: CheckpointSet, problem: str) -> CheckpointSet:
        """A set that did not load on some rank: refuse a branch's; move our own aside and
        return the previous complete set (collective, like ``find``)."""
        what = problem or "another rank's file does not load"
        if found.path.parent.resolve() != self.directory.resolve():
            raise ConfigError(f"checkpoint.resume: {what}")
        moved = f", moved to {quarantine(found.path).name}" if self.rank == 0 else ""
        previous = self.find("auto")
        if previous is None:
            raise ConfigError(f"checkpoint set {found.path} is unusable and no earlier "
                              f"complete set is left (a relaunch starts fresh){moved}: {what}")
        if problem or self.rank == 0:
            _warn(f"checkpoint set {found.path} is unusable ({what}){moved}; using the "
                  f"previous set {previous.name}")
        return previous

    # ---- the finished run -----------------------------------------------------------------
    def done(self) -> Optional[DoneMarker]:
        """The done marker (final set, step, summary), or None."""
        return DoneMarker.read(self.directory)

    def _loaded_final(self) -> bool:
        done = self.done()
        return done is not None and self.loaded is not None and done.set == self.loaded.name

    def finished(self, stop_reason: str) -> Optional[dict[str, Any]]:
        """Before the first step: the stored summary if this run is already over, else None.

        Over = resumed from the set the done marker names, and the stop condition
        (``stop_reason``, evaluated on the restored state) still holds. A run that trains on
        (e.g. a larger train.max_steps) drops the now stale marker.
        """
        final, done = self._loaded_final(), self.done()
        if final and stop_reason:
            if self.rank == 0 and self.verbose:
                print(f"largebatch: run already finished at step {done.step} "
                      f"({done.stop_reason}, {self.directory / DONE}); nothing to do",
                      flush=True)
            return done.summary
        if self.rank == 0 and (self.directory / DONE).exists():
            (self.directory / DONE).unlink(missing_ok=True)
            if final and self.verbose:
                print(f"resumed from {self.loaded.path} at step {self.loaded.step} "
                      f"(finished before; training on to the new limit)", flush=True)
        return None

