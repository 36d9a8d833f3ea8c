"""Check every exported file against the torch model it came from, on the same inputs.

Each format runs the check batch at two batch sizes (the batch the user asked for, and 1: a
size other than the graphs' capture size, so a batch a graph baked in shows up, and the one a
single-face deployment runs at), and its largest absolute difference from the eager torch
model is compared with the tolerance below.

The tolerance. Two correct float32 implementations of one network differ only by the order
of their operations: onnxruntime's MLAS convolutions and GEMMs block and sum their dot
products differently from torch's oneDNN/MKL kernels. fp32's unit roundoff is
u = 2^-24 = 6e-8; a dot product of K terms summed in another order moves by about
sqrt(K) u relative (rounding errors add like a random walk), i.e. 4e-6 for IResNet's widest
convolution (K = 3 x 3 x 512 = 4608) and 1e-5 for its FC (K = 512 x 7 x 7 = 25088); through
L layers in sequence such relative errors add roughly in quadrature, sqrt(L) ~ 7 for r50's
~50 layers and 14 for r200's ~200: about 3e-5 for r50 and 6e-5 for r200. Measured (relative
to the largest output): 5e-6 to 7e-6 for an r50, ~1e-7 for the tiny CPU models. So the
check allows ``RTOL = 1e-4`` of the output's largest magnitude (above the estimate for every
depth largebatch builds, 15x the measured r50), plus ``ATOL = 1e-6`` for outputs near zero.
A real export bug (a lost normalisation, an op in the wrong mode, a baked batch size, a
half-precision cast) is off by 1e-3 relative or much more. ``largebatch export --rtol``
changes it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from largebatch.deploy.export import Written, quiet, reason

RTOL = 1e-4
ATOL = 1e-6

Runner = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Check:
    """One format's parity: max |diff| and tolerance per batch size, or why it could not run.

    Attributes:
        format: the format checked.
        diffs: rows -> max |output - torch output|.
        tolerances: rows -> the allowed max |diff| (``ATOL + rtol x max |torch output|``).
        error: why the file could not be loaded or run (None when it ran).
    """

    format: str
    diffs: dict[int, float] = field(default_factory=dict)
    tolerances: dict[int, float] = field(default_factory=dict)
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        """Ran, and within tolerance at every batch size."""
        return self.error is None and all(self.diffs[n] <= self.tolerances[n]
                                          for n in self.diffs)


def _onnx_runner(written: Written, input_name: str) -> Runner:
    """onnxruntime's CPU provider on the ONNX file."""
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings are not the command's output
    session = onnxruntime.InferenceSession(str(written.path), options,
                                           providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {input_name: x.numpy()})[0])


def runner(written: Written, input_name: str) -> Runner:
    """A function running ``written``'s file on a batch (loaded as a user would load it)."""
    if written.format == "onnx":
        return _onnx_runner(written, input_name)
    if written.format == "pt2":
        return torch.export.load(str(written.path)).module()
    if written.format == "torchscript":
        return torch.jit.load(str(written.path))
    raise ValueError(f"no runner for format {written.format!r}")


def _max_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| in float64 (shapes must agree)."""
    if tuple(out.shape) != tuple(ref.shape):
        raise ValueError(f"output shape {tuple(out.shape)}, torch gives {tuple(ref.shape)}")
    return float((out.double() - ref.double()).abs().max())


def check_formats(model: nn.Module, images: torch.Tensor, sizes: tuple[int, ...],
                  written: list[Written], input_name: str, rtol: float = RTOL) -> list[Check]:
    """Run every written file and the torch model on the first ``n`` images, each ``n`` of
    ``sizes``.

    Args:
        model: the torch model in eval mode (the reference).
        images: the check batch (at least ``max(sizes)`` rows).
        sizes: the batch sizes to run.
        written: the files to check (those with a path).
        input_name: the ONNX input's name.
        rtol: the relative tolerance (of the largest |torch output|).

    Returns:
        One ``Check`` per written file, in ``written``'s order.
    """
    checks = []
    with torch.no_grad():
        refs = {n: model(images[:n]) for n in sizes}
        for w in (w for w in written if w.path is not None):
            check = Check(w.format)
            try:
                with quiet():
                    run = runner(w, input_name)
                    for n, ref in refs.items():
                        check.diffs[n] = _max_diff(run(images[:n].contiguous()), ref)
                        check.tolerances[n] = ATOL + rtol * float(ref.abs().max())
            except Exception as exc:  # noqa: BLE001 - reported as the format's reason
                check.error = reason(exc)
            checks.append(check)
    return checks
