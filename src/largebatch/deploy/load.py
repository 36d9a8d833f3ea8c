"""Find a trained model on disk and rebuild it: a run folder, a checkpoint set or a folder of sets.

What a run leaves behind (``docs/ARCHITECTURE.md``, checkpoint layout):

* a run folder (``log.out_dir``): ``config.json`` (the whole config), ``model.pt``
  (``{"model": replicated model state_dict}``, written at the end) and ``checkpoints/``;
* a checkpoint set (``checkpoints/step-000120/``): ``manifest.json`` (step, world size, the
  config, the plan, the sha256 of every file) and ``trainer.pt``, whose ``["engine"]["model"]``
  is the full replicated model at every world size and engine (ZeRO 3 gathers it to save);
* a checkpoints folder: its newest complete set is used, corrupt ones are named and skipped.

Every tensor file is read through ``largebatch.checkpoint`` (``torch.load(weights_only=True)``,
a set's files sha256-checked first). The model is rebuilt from the STORED config by the task
(``build_task(cfg).build().model``: the backbone of a face run, the classifier otherwise), on
the meta device so that a face run's head (up to 2M classes x 512 at WebFace42M scale, gigabytes
that the export never uses) is never allocated, then filled by ``load_state_dict(strict=True)``.
Anything that is not such a folder, a corrupt set or a config this code cannot build is one
``ConfigError`` line (exit 2).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from largebatch.checkpoint import CorruptSet, list_sets, load_checkpoint, verify_set
from largebatch.checkpoint.meta import DONE, MANIFEST, TRAINER_FILE, DoneMarker, SetInfo
from largebatch.config import Config, ConfigError, load_config

CONFIG_FILE = "config.json"
MODEL_FILE = "model.pt"
SUMMARY_FILE = "summary.json"


@dataclass
class Loaded:
    """A model rebuilt from disk, in eval mode, with where it came from.

    Attributes:
        model: the task's replicated model (face backbone or classifier), weights loaded.
        state: the state_dict it was loaded from, as stored (``model.pt`` or the set's).
        cfg: the stored config, rebuilt and validated.
        kind: ``"run"`` (the run's final ``model.pt``) or ``"set"`` (a checkpoint set).
        path: the file the weights were read from.
        run_dir: the run folder the source belongs to (the default export folder's parent).
        step: the optimizer step of the weights (None when the run did not record it).
        world_size: ranks of the run that wrote them (None when unknown).
        engine: the engine that trained them (the run's resolved one, else ``engine.name``).
    """

    model: nn.Module
    state: dict[str, torch.Tensor]
    cfg: Config
    kind: str
    path: Path
    run_dir: Path
    step: Optional[int]
    world_size: Optional[int]
    engine: str


def _read_json(path: Path) -> Any:
    """A small JSON file's content, or a one-line ConfigError naming it."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is unreadable ({' '.join(str(exc).split())[:160]})") from None


def build_config(mapping: Any, where: Path) -> Config:
    """The stored config mapping as a validated ``Config`` (ConfigError naming ``where``)."""
    if not isinstance(mapping, dict) or not mapping:
        raise ConfigError(f"{where} holds no config (expected the run's whole config mapping)")
    try:
        return load_config(base=mapping)
    except ConfigError as exc:
        raise ConfigError(f"{where}: its config cannot be built by this largebatch ({exc})") \
            from None


def _weights(obj: Any, where: str) -> dict[str, torch.Tensor]:
    """``obj`` checked to be a state_dict (names -> tensors)."""
    if not isinstance(obj, dict) or not obj or \
            not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ConfigError(f"{where} holds no model state_dict (names -> tensors)")
    return obj


def newest_set(directory: Path) -> tuple[Path, SetInfo]:
    """The newest set of ``directory`` whose files all match its manifest, and its manifest.

    Raises:
        ConfigError: no set there, or none complete (naming why the newest one is not).
    """
    sets = list_sets(directory)
    reasons = []
    for found in reversed(sets):
        try:
            return found.path, verify_set(found.path)
        except CorruptSet as exc:  # OtherFormat included: not ours to read either way
            reasons.append(str(exc))
    if not sets:
        raise ConfigError(f"{directory} holds no checkpoint set (step-*/)")
    raise ConfigError(f"{directory} holds no complete checkpoint set (newest: {reasons[0]})")


def _run_of_set(set_dir: Path) -> Path:
    """The run folder a set belongs to: the parent of its checkpoints folder (``log.out_dir``
    for the default ``checkpoint.dir``)."""
    return set_dir.resolve().parent.parent


def load_set(set_dir: Path, info: Optional[SetInfo] = None) -> Loaded:
    """Rebuild the model of checkpoint set ``set_dir``; its manifest and every file are
    verified first, unless ``info`` says that was just done (``newest_set``)."""
    if info is None:
        try:
            info = verify_set(set_dir)
        except CorruptSet as exc:
            raise ConfigError(f"{set_dir} is not a usable checkpoint set ({exc})") from None
    cfg = build_config(info.config, set_dir / MANIFEST)
    shared = load_checkpoint(set_dir / TRAINER_FILE)
    engine = shared.get("engine") if isinstance(shared, dict) else None
    state = _weights(engine.get("model") if isinstance(engine, dict) else None,
                     f"{set_dir / TRAINER_FILE} ['engine']['model']")
    model = rebuild(cfg, state, set_dir / TRAINER_FILE)
    return Loaded(model, state, cfg, "set", set_dir / TRAINER_FILE, _run_of_set(set_dir),
                  info.step, info.world_size, cfg.engine.name)


def _run_facts(run_dir: Path) -> dict[str, Any]:
    """What a finished run's summary.json says of its ``model.pt`` (``steps``,
    ``world_size``, ``engine``), else the step of its done.json."""
    summary = run_dir / SUMMARY_FILE
    data = _read_json(summary) if summary.is_file() else None
    if isinstance(data, dict) and isinstance(data.get("steps"), int):
        return data
    done = DoneMarker.read(run_dir / "checkpoints")
    return {"steps": done.step} if done else {}


def load_run(run_dir: Path) -> Loaded:
    """Rebuild the final model of run folder ``run_dir``; a run without ``model.pt`` (stopped
    before its end) uses the newest complete set of its checkpoints."""
    cfg = build_config(_read_json(run_dir / CONFIG_FILE), run_dir / CONFIG_FILE)
    if not (run_dir / MODEL_FILE).is_file():
        sets = run_dir / "checkpoints"
        if cfg.checkpoint.dir and Path(cfg.checkpoint.dir).is_absolute():
            sets = Path(cfg.checkpoint.dir)
        loaded = load_set(*newest_set(sets))
        loaded.run_dir = run_dir
        return loaded
    stored = load_checkpoint(run_dir / MODEL_FILE)
    state = _weights(stored.get("model") if isinstance(stored, dict) else None,
                     f"{run_dir / MODEL_FILE} ['model']")
    facts = _run_facts(run_dir)
    world, engine = facts.get("world_size"), facts.get("engine")
    return Loaded(rebuild(cfg, state, run_dir / MODEL_FILE), state, cfg, "run",
                  run_dir / MODEL_FILE, run_dir, facts.get("steps"),
                  world if isinstance(world, int) else None,
                  engine if isinstance(engine, str) else cfg.engine.name)


def load_source(path: str | Path) -> Loaded:
    """The model of a run folder, a checkpoint set or a folder of sets (its newest).

    Raises:
        ConfigError: none of those, a corrupt set, unreadable files, or a config or weights
            this code cannot build (one line, naming the path).
    """
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path} is not a folder (give a run folder, a checkpoint set "
                          f"step-NNNNNN/ or a checkpoints folder)")
    if (path / MANIFEST).exists():
        return load_set(path)
    if (path / CONFIG_FILE).is_file():
        return load_run(path)
    if list_sets(path) or (path / DONE).is_file():
        return load_set(*newest_set(path))
    raise ConfigError(f"{path} is not a run folder (config.json + model.pt), a checkpoint set "
                      f"({MANIFEST} + {TRAINER_FILE}) or a checkpoints folder (step-*/)")


def _empty_model(cfg: Config) -> nn.Module:
    """The task's replicated model with uninitialised storage (built on the meta device: no
    random init, and the face head, built alongside and dropped, never allocated)."""
    from largebatch.tasks import build_task
    try:
        with torch.device("meta"):
            model = build_task(cfg).build().model
    except ConfigError:
        raise
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as exc:
        raise ConfigError(f"model.name={cfg.model.name!r}: cannot be built here "
                          f"({type(exc).__name__}: {' '.join(str(exc).split())[:160]})") \
            from None
    return model.to_empty(device="cpu")


def rebuild(cfg: Config, state: dict[str, torch.Tensor], where: Path) -> nn.Module:
    """The model of ``cfg`` holding ``state``, in eval mode.

    Raises:
        ConfigError: the weights do not fit the model the config builds.
    """
    model = _empty_model(cfg)
    persistent = set(model.state_dict())
    # A non-persistent buffer is in no state_dict: it would stay uninitialised. None of
    # largebatch's models has one; a user model that does is built the slow, initialised way.
    if any(name not in persistent for name, _ in model.named_buffers()):
        from largebatch.tasks import build_task
        model = build_task(cfg).build().model
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:240]
        raise ConfigError(f"{where}: the weights do not fit model.name={cfg.model.name!r} "
                          f"built from the stored config ({first})") from None
    return model.eval()
