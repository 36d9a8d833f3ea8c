"""One export from start to end: load, write every format, check parity, document it all.

``export`` is what ``largebatch export`` runs; it returns an ``ExportReport`` (the files, the
parity checks, the sidecar) and leaves the printing to the command. The sidecar
(``<stem>.json`` beside the files) is the export's documentation: the state_dict's keys and
shapes, the model, the input it takes (size, channel order, normalisation, read from the data
pipeline that trained it), the output, the source and its step, every file's sha256 and the
measured parity.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

import largebatch
from largebatch.config import ConfigError
from largebatch.deploy.export import (EXAMPLE_ROWS, FORMATS, INSTALL_HINT, Written,
                                      missing_packages, write_formats, write_state_dict)
from largebatch.deploy.load import Loaded, load_source
from largebatch.deploy.parity import ATOL, RTOL, Check, check_formats
from largebatch.deploy.spec import InputSpec, Sample, sample_batch
from largebatch.io import write_json_atomic

#: What the sidecar's ``format`` field says (bumped when its fields change meaning).
SIDECAR_FORMAT = "largebatch-export/1"


@dataclass
class ExportReport:
    """What an export wrote and measured.

    Attributes:
        loaded: the source model and where it came from.
        out: the export folder.
        sample: the check batch and what it is.
        spec: the input facts.
        written: the state_dict file, then one entry per requested format.
        checks: one parity check per written format.
        sizes: the batch sizes checked.
        rtol: the parity's relative tolerance.
        sidecar: the sidecar's path.
    """

    loaded: Loaded
    out: Path
    sample: Sample
    spec: InputSpec
    written: list[Written]
    checks: list[Check]
    sizes: tuple[int, ...]
    rtol: float
    sidecar: Path

    @property
    def failed(self) -> list[Check]:
        """The checks out of tolerance or unable to run (an ONNX file that does not run)."""
        return [c for c in self.checks if not c.ok]


def default_out(loaded: Loaded) -> Path:
    """``<run>/export/`` for a run's final model, ``<run>/export/<set name>/`` for a set (two
    exports of one run never overwrite each other)."""
    base = loaded.run_dir / "export"
    return base / loaded.path.parent.name if loaded.kind == "set" else base


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _names(loaded: Loaded, spec: InputSpec) -> tuple[str, tuple[str, str]]:
    """The files' stem and the graph's (input, output) names."""
    stem = "backbone" if loaded.cfg.task.name == "face" else "model"
    return stem, ("images", spec.output)


def _model_facts(loaded: Loaded, out_shape: list[Any]) -> dict[str, Any]:
    cfg = loaded.cfg
    facts = {"name": cfg.model.name, "task": cfg.task.name, "class": type(loaded.model).__name__,
             "parameters": sum(p.numel() for p in loaded.model.parameters())}
    if cfg.task.name == "face":
        facts["embedding_size"] = cfg.face.embedding_size
    else:
        facts["outputs"] = out_shape[-1]
    return facts


def _file_entry(w: Written, out: Path) -> dict[str, Any]:
    if w.path is None:
        return {"file": None, "error": w.error}
    return {"file": str(w.path.relative_to(out)), "how": w.detail, "sha256": _sha256(w.path)}


def sidecar(report: ExportReport, tensors: dict[str, Any], out_shape: list[Any]
            ) -> dict[str, Any]:
    """The sidecar's content (see the module docstring)."""
    loaded, spec = report.loaded, report.spec
    state_file, *formats = report.written
    return {
        "format": SIDECAR_FORMAT, "largebatch_version": largebatch.__version__,
        "torch_version": torch.__version__, "created_unix": time.time(),
        "source": {"path": str(loaded.path), "kind": loaded.kind, "step": loaded.step,
                   "world_size": loaded.world_size, "engine": loaded.engine,
                   "data": loaded.cfg.data.name},
        "model": _model_facts(loaded, out_shape),
        "input": {"name": "images", "shape": ["batch", *spec.shape], "dtype": "float32",
                  "layout": "NCHW", "channel_order": spec.channel_order,
                  "normalisation": spec.normalisation, "mean": spec.mean, "std": spec.std},
        "output": {"name": spec.output, "shape": out_shape, "dtype": "float32",
                   "notes": spec.notes},
        "state_dict": {**_file_entry(state_file, report.out), "tensors": tensors},
        "files": {w.format: _file_entry(w, report.out) for w in formats},
        "parity": {"batch": report.sample.what, "sizes": list(report.sizes), "rtol": report.rtol,
                   "atol": ATOL, "reference": "the torch model (eager, float32, CPU)",
                   "results": {c.format: {"max_abs_diff": c.diffs, "tolerance": c.tolerances,
                                          "ok": c.ok, "error": c.error}
                               for c in report.checks}},
    }


def _clear(out: Path, stem: str) -> None:
    """Remove an earlier export's optional files of ``stem``: a format skipped or not asked
    for this time must not leave a file the new sidecar does not describe."""
    for name in (f"{stem}.onnx", f"{stem}.onnx.data", f"{stem}.pt2",
                 f"{stem}.torchscript.pt"):
        (out / name).unlink(missing_ok=True)


def _drop_unrunnable(written: list[Written], checks: list[Check]) -> list[Check]:
    """An optional file that does not run is no export: remove it, say why, keep its check
    out of the parity. (An ONNX file that does not run stays a failed check: exit 1.)"""
    for c in checks:
        w = next(w for w in written if w.format == c.format)
        if c.error and c.format != "onnx" and w.path is not None:
            w.path.unlink(missing_ok=True)
            w.path, w.error = None, f"written but does not run ({c.error})"
    return [c for c in checks if c.format == "onnx" or c.error is None]


def _check_options(formats: tuple[str, ...], rows: int, rtol: float) -> None:
    """One ConfigError line for a bad option or a missing ONNX package (before any loading)."""
    if not rtol >= 0:  # also refuses NaN
        raise ConfigError(f"--rtol={rtol} must be >= 0")
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ConfigError(f"--formats: {unknown[0]!r} is not one of {','.join(FORMATS)}")
    if rows < EXAMPLE_ROWS:
        raise ConfigError(f"--batch={rows} must be >= {EXAMPLE_ROWS} (1 is always checked too)")
    missing = missing_packages() if "onnx" in formats else []
    if missing:
        raise ConfigError(f"largebatch export needs {', '.join(missing)} for ONNX: "
                          f"{INSTALL_HINT} (or --formats without onnx)")


def export(source: str | Path, out: Optional[str | Path] = None,
           formats: tuple[str, ...] = FORMATS, rows: int = 8, rtol: float = RTOL
           ) -> ExportReport:
    """Export the model of ``source`` (run folder, checkpoint set or checkpoints folder).

    Args:
        source: where the model is.
        out: the export folder (default ``default_out``).
        formats: the optional formats to write (the state_dict is always written).
        rows: the check batch's size (1 is checked as well).
        rtol: the parity's relative tolerance.

    Returns:
        The report; ``report.failed`` lists the formats out of tolerance.

    Raises:
        ConfigError: bad input: not a run or set, a corrupt set, a config or weights this code
            cannot build, a missing ONNX package, a bad option.
    """
    _check_options(formats, rows, rtol)
    loaded = load_source(source)
    out = Path(out) if out is not None else default_out(loaded)
    out.mkdir(parents=True, exist_ok=True)
    sample, spec = sample_batch(loaded.cfg, rows, minimum=EXAMPLE_ROWS)
    stem, names = _names(loaded, spec)
    _clear(out, stem)
    tensors = write_state_dict(loaded.model, out / f"{stem}.pt")
    written = [Written("state_dict", out / f"{stem}.pt", "torch.save of names -> tensors")]
    written += write_formats(loaded.model, sample.images[:EXAMPLE_ROWS], out, stem, names,
                             formats)
    sizes = tuple(dict.fromkeys((len(sample.images), 1)))
    checks = _drop_unrunnable(written, check_formats(loaded.model, sample.images, sizes,
                                                     written[1:], names[0], rtol))
    with torch.no_grad():
        out_shape = ["batch", *loaded.model(sample.images[:1]).shape[1:]]
    report = ExportReport(loaded, out, sample, spec, written, checks, sizes, rtol,
                          out / f"{stem}.json")
    write_json_atomic(report.sidecar, sidecar(report, tensors, out_shape))
    return report
