"""``largebatch export RUN_OR_CHECKPOINT``: the trained model as files a deployment reads.

A run folder's final model (or a checkpoint set's, or a checkpoints folder's newest set) is
rebuilt from the stored config and written as a plain state_dict + JSON sidecar, ONNX (dynamic
batch), a ``torch.export`` program and TorchScript; every file is then run against the torch
model on the run's own evaluation data at two batch sizes (``largebatch.deploy``).
"""
from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # the command stays light to import: torch is loaded by run() only
    from largebatch.deploy.pipeline import ExportReport

HELP = "export a run's model: state_dict + sidecar, ONNX, torch.export, TorchScript"
EXAMPLES = """\
examples:
  largebatch export runs/face-synthetic-tiny                   # -> <that run>/export/
  largebatch export runs/face/checkpoints/step-000120 --out deploy/r50
  largebatch export runs/face/checkpoints                      # its newest complete set
  largebatch export runs/mnist-mlp --formats onnx

Writes <stem>.pt (state_dict), <stem>.json (what the model takes and gives), <stem>.onnx,
<stem>.pt2, <stem>.torchscript.pt (stem: backbone for a face run, model otherwise), and checks
each against torch with onnxruntime / torch at --batch and 1 images. Exit 1 when a file is out
of tolerance or the ONNX export fails; bad input is one line and exit 2. ONNX needs
pip install "largebatch[export]"."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the command's arguments: the source, ``--out``, ``--formats``, ``--batch``,
    ``--rtol``.

    Args:
        parser: the ``export`` sub-command's parser.
    """
    parser.add_argument("source", help="a run folder (log.out_dir), a checkpoint set "
                        "(.../checkpoints/step-NNNNNN) or a checkpoints folder (its newest set)")
    parser.add_argument("--out", default=None, help="export folder (default: <run>/export/, "
                        "<run>/export/<set>/ for a checkpoint set)")
    parser.add_argument("--formats", default="onnx,pt2,torchscript",
                        help="comma-separated optional formats (default: all of "
                        "onnx,pt2,torchscript; the state_dict and its sidecar are always "
                        "written)")
    parser.add_argument("--batch", type=int, default=8,
                        help="images in the parity check's batch (batch size 1 is checked too)")
    parser.add_argument("--rtol", type=float, default=None,
                        help="parity tolerance relative to the largest |output| (default 1e-4, "
                        "see largebatch.deploy.parity)")


def _fmt(x: float) -> str:
    return "0" if x == 0 else f"{x:.2e}"


def _print_report(report: ExportReport) -> None:
    """The export's lines: source, model, input, one line per file, one per parity check."""
    ld, spec = report.loaded, report.spec
    step = f"step {ld.step}" if ld.step is not None else "step unknown"
    ranks = f", {ld.world_size} rank(s)" if ld.world_size else ""
    print(f"export: {ld.path} ({'run folder' if ld.kind == 'run' else 'checkpoint set'}, "
          f"{step}{ranks}, engine {ld.engine}) -> {report.out}")
    print(f"model: {ld.cfg.model.name} ({ld.cfg.task.name}), input images "
          f"(batch, {', '.join(map(str, spec.shape))}) float32 NCHW {spec.channel_order}, "
          f"normalisation: {spec.normalisation}; output {spec.output}")
    for w in report.written:
        shown = f"{w.path.name} ({w.detail})" if w.path else f"skipped: {w.error}"
        print(f"  {w.format:<12} {shown}")
    sizes = " and ".join(map(str, report.sizes))
    print(f"parity vs torch on {report.sample.what}, batch {sizes}; tolerance "
          f"{report.rtol:g} x max|output| + 1e-06:")
    for c in report.checks:
        where = "onnxruntime CPU" if c.format == "onnx" else "torch"
        if c.error:
            print(f"  {c.format:<12} ({where}) FAILED: {c.error}")
            continue
        diffs = ", ".join(f"{_fmt(c.diffs[n])} <= {_fmt(c.tolerances[n])} at {n}"
                          if c.diffs[n] <= c.tolerances[n] else
                          f"{_fmt(c.diffs[n])} > {_fmt(c.tolerances[n])} at {n}"
                          for n in c.diffs)
        print(f"  {c.format:<12} ({where}) max|diff| {diffs}: {'ok' if c.ok else 'FAILED'}")
    print(f"documented in {report.sidecar}", flush=True)


def _failure(report: ExportReport) -> Optional[str]:
    """The one line an export that did not work ends with (None when it did)."""
    onnx = next((w for w in report.written if w.format == "onnx"), None)
    if onnx is not None and onnx.path is None:
        return f"ONNX export failed ({onnx.error}); the other files are in {report.out}"
    for c in report.failed:
        if c.error:
            return f"parity: {c.format} does not run ({c.error})"
        n = next(n for n in c.diffs if c.diffs[n] > c.tolerances[n])
        return (f"parity: {c.format} max|diff| {_fmt(c.diffs[n])} > tolerance "
                f"{_fmt(c.tolerances[n])} at batch {n} (see {report.sidecar})")
    return None


def run(args: argparse.Namespace) -> int:
    """Export, print what was written and measured, fail on a parity miss.

    Args:
        args: the parsed ``source``, ``out``, ``formats``, ``batch`` and ``rtol``.

    Returns:
        0 when every file was written or skipped with its reason and is within tolerance;
        1 when the ONNX export failed or a file is out of tolerance (one line on stderr).

    Raises:
        ConfigError: bad input (the caller prints it as one line, exit 2).
    """
    from largebatch.deploy.parity import RTOL
    from largebatch.deploy.pipeline import export
    formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
    report = export(args.source, args.out, formats, args.batch,
                    RTOL if args.rtol is None else args.rtol)
    _print_report(report)
    failure = _failure(report)
    if failure:
        sys.stderr.write(f"largebatch: error: {failure}\n")
        sys.stderr.flush()
        return 1
    return 0
