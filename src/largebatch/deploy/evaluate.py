"""``largebatch eval``: a trained face model scored on insightface ``.bin`` sets, exactly as the
training evaluation scores it, plus every figure an arcface_torch user looks for.

* **The model** (``load_model``): a run folder (its ``model.pt``, else its newest complete
  checkpoint set), a checkpoint set (``step-N/``, sha256-verified), a folder of sets (the
  newest complete one), all read by ``largebatch.deploy.load`` (the backbone rebuilt from the
  stored config, loaded strictly), or a weights file (``model.pt``) with the run's
  ``config.json`` beside it.
* **The distances** (``set_distances``): each rank embeds its share of a set's pairs with the
  training evaluation's own code, ``BinPairLoader`` (same decoding, same batches of 256) and
  ``largebatch.tasks.face.pair_distances`` (image + flip, the run's autocast, the exact sum
  over ranks); so the figures equal the in-training evaluation of the same weights.
* **The figures** (``largebatch.face.report.set_report``): accuracy +- std, per-fold
  accuracies and thresholds, TAR@FAR (null below 1/FAR impostors, with a note), insightface's
  val@FAR, the ROC (CSV + PNG); rank 0 writes ``OUT/eval.json`` and one line per set.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from largebatch.checkpoint import load_checkpoint
from largebatch.config import Config, ConfigError
from largebatch.face.verification import FARS

#: What the JSON holds of the run's config, to say which model was scored.
_MODEL_KEYS = ("task.name", "model.name", "face.embedding_size", "train.precision")


@dataclass
class FaceModel:
    """A rebuilt backbone and where it came from.

    Attributes:
        model: the backbone in eval mode, on the device.
        cfg: the run's configuration.
        weights: the file the weights were read from.
        step: the optimizer step of the weights (None where the run did not record it).
    """

    model: nn.Module
    cfg: Config
    weights: str
    step: Optional[int]


def _from_file(path: Path) -> tuple[nn.Module, Config, Path, Optional[int]]:
    """A weights file with the run's ``config.json`` beside it (``load.py`` reads folders)."""
    from largebatch.deploy.load import CONFIG_FILE, MODEL_FILE, build_config, load_run, rebuild
    config = path.parent / CONFIG_FILE
    if not config.is_file():
        raise ConfigError(f"{config} not found: {path} is rebuilt from the run's "
                          f"{CONFIG_FILE}, which must lie beside it")
    if path.name == MODEL_FILE:  # the run's own final weights: its summary knows the step
        loaded = load_run(path.parent)
        return loaded.model, loaded.cfg, loaded.path, loaded.step
    try:
        mapping = json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{config} is unreadable ({' '.join(str(exc).split())[:160]})"
                          ) from None
    cfg = build_config(mapping, config)
    stored = load_checkpoint(path)
    state = stored.get("model", stored) if isinstance(stored, dict) else stored
    if not isinstance(state, dict):
        raise ConfigError(f"{path} holds no model state_dict (expected {{'model': ...}})")
    return rebuild(cfg, state, path), cfg, path, None


def load_model(source: str | Path, device: torch.device) -> FaceModel:
    """The face backbone of ``source``, weights loaded strictly, in eval mode on ``device``.

    Folders (a run, a checkpoint set, a folder of sets) are read by
    ``largebatch.deploy.load.load_source``; a weights file by ``_from_file``.

    Raises:
        ConfigError: nothing usable at ``source``, a corrupt set, weights that do not fit the
            stored config, or not a face run.
    """
    from largebatch.deploy.load import load_source
    p = Path(source)
    if p.is_file():
        model, cfg, where, step = _from_file(p)
    elif not p.exists():
        raise ConfigError(f"{p}: no such file or folder (a run folder, a checkpoint set or a "
                          f"model.pt with its config.json)")
    else:
        loaded = load_source(p)
        model, cfg, where, step = loaded.model, loaded.cfg, loaded.path, loaded.step
    if cfg.task.name != "face":
        raise ConfigError(f"{where}: a task.name={cfg.task.name} run; eval and embed need a "
                          f"face run (task.name=face)")
    return FaceModel(model.to(device).eval(), cfg, str(where), step)


def eval_engine(cfg: Config, denv: Any, device: torch.device) -> Any:
    """The engine whose ``autocast``, ``reduce_scalars`` and ``device`` the evaluation uses
    (the run's precision; ``single`` on one process, ``ddp`` under a launcher). Nothing is
    wrapped: only its collectives and its autocast are used."""
    from largebatch.engines import resolve_engine_name
    from largebatch.registry import ENGINES
    name = resolve_engine_name("auto", denv)
    return ENGINES.get(name)(denv, device, precision=cfg.train.precision)


def set_names(bins: Sequence[str | Path]) -> dict[str, Path]:
    """``{stem: path}`` of the ``--bin`` files (``lfw.bin`` -> ``lfw``), checked to exist.

    Raises:
        ConfigError: a missing file, or two files of the same name.
    """
    names: dict[str, Path] = {}
    for b in bins:
        path = Path(b)
        if not path.is_file():
            raise ConfigError(f"--bin {path}: no such file")
        if path.stem in names:
            raise ConfigError(f"--bin: {names[path.stem]} and {path} are both named "
                              f"{path.stem!r} (the set names the figures)")
        names[path.stem] = path
    return names


@torch.no_grad()
def set_distances(face: FaceModel, path: Path, engine: Any, batch_size: int = 256
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dist, same)`` of every pair of ``path`` on every rank (a collective under a
    launcher), computed as the training evaluation computes them."""
    from largebatch.data.bin_pairs import BinPairLoader
    from largebatch.tasks.face import pair_distances
    loader = BinPairLoader(path, engine.rank, engine.world_size, engine.device,
                           batch_size=batch_size)
    return pair_distances(face.model, loader, engine)


def evaluate(face: FaceModel, bins: dict[str, Path], engine: Any, out: Path,
             fars: Sequence[str] = FARS, batch_size: int = 256) -> Optional[dict[str, Any]]:
    """Score every set; rank 0 writes ``out/NAME_roc.csv|png`` and ``out/eval.json``.

    Returns:
        The JSON's content on rank 0, None elsewhere.
    """
    from largebatch.face.report import roc, set_report, write_roc
    from largebatch.io import get_dotted, write_json_atomic
    results: dict[str, Any] = {}
    for name, path in bins.items():
        dist, same = set_distances(face, path, engine, batch_size)
        if engine.rank != 0:
            continue
        report = set_report(dist, same, name, fars)
        marks = {far: report["tar_at_far"][far] for far in fars}
        out.mkdir(parents=True, exist_ok=True)
        csv_path, png_path = write_roc(out / f"{name}_roc", name, roc(dist, same), marks)
        results[name] = {"bin": str(path), **report, "roc_csv": str(csv_path),
                         "roc_png": str(png_path)}
    if engine.rank != 0:
        return None
    doc = {"model": {"weights": face.weights, "step": face.step,
                     **{k: get_dotted(face.cfg, k) for k in _MODEL_KEYS}},
           "world_size": engine.world_size, "batch_size": batch_size, "fars": list(fars),
           "sets": results}
    write_json_atomic(out / "eval.json", doc)
    return doc

