"""Write a rebuilt model in the formats a deployment reads.

* the plain ``state_dict`` (``torch.save`` of names -> tensors: loads with
  ``weights_only=True`` into the same ``model.name`` built by largebatch or arcface_torch);
* ONNX with a dynamic batch axis, through torch's ``torch.export``-based exporter (the default
  of ``torch.onnx.export`` since torch 2.9; the TorchScript-based one is deprecated), which
  translates with ``onnxscript``'s torchlib;
* a ``torch.export`` program (``.pt2``: ``torch.export.load(path).module()``), the ONNX's own
  source graph (exported once, used for both);
* TorchScript by tracing (``torch.jit.load``; deprecated by torch in favour of ``torch.export``
  but still what many C++ and mobile deployments load).

The last three are optional per model: a failure is a ``Written`` with its reason (the first
line of the exception), never a traceback, and the exporters' own progress lines and warnings
are kept out of the command's output.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn

from largebatch.checkpoint import save_checkpoint

#: ONNX opset 18: the opset torch's exporter writes natively (``onnxscript``'s torchlib is
#: implemented at 18, so no version conversion runs: a lower opset is converted after the fact
#: and may fail, a higher one gains nothing for convolutions, BatchNorm, PReLU and Gemm).
#: onnxruntime runs opset 18 on its CPU and CUDA providers since 1.14 (TensorRT 8.6+ too);
#: with the IR version 10 files torch writes, onnxruntime >= 1.18 is needed (the ``export``
#: extra asks for it).
ONNX_OPSET = 18
#: What the ONNX export and its check import; the command names the extra when one is missing.
ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")
INSTALL_HINT = 'pip install "largebatch[export]" (onnx, onnxruntime, onnxscript)'
#: The optional formats, in the order they are written.
FORMATS = ("onnx", "pt2", "torchscript")
#: Example batch the graphs are captured at: 2, not 1, because torch.export specialises a
#: dimension of size 0 or 1 to a constant (the batch axis must stay symbolic).
EXAMPLE_ROWS = 2


@dataclass
class Written:
    """One format's outcome: its file, or why there is none.

    Attributes:
        format: ``state_dict``, ``onnx``, ``pt2`` or ``torchscript``.
        path: the file written (None when it failed).
        detail: how it was made (opset, trace, ...).
        error: the failure's one-line reason (None when written).
    """

    format: str
    path: Optional[Path]
    detail: str = ""
    error: Optional[str] = None


def missing_packages() -> list[str]:
    """The packages of ``ONNX_PACKAGES`` that are not installed."""
    return [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]


def reason(exc: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:240]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the exporters: progress lines, TracerWarnings, deprecation notices. The command
    prints one line per format; what went wrong is the exception's reason."""
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), \
            contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        yield


def write_state_dict(model: nn.Module, path: Path) -> dict[str, dict[str, Any]]:
    """Save ``model``'s state_dict as a plain file; returns ``{name: {shape, dtype}}``."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_checkpoint(path, state)
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
            for k, v in state.items()}


def export_program(model: nn.Module, example: torch.Tensor) -> Any:
    """``torch.export`` of ``model`` at ``example`` with a symbolic batch axis (>= 1)."""
    batch = torch.export.Dim("batch", min=1)
    with quiet(), torch.no_grad():
        return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))


def write_pt2(program: Any, path: Path) -> Written:
    """Save the exported program (``torch.export.save``)."""
    try:
        with quiet():
            torch.export.save(program, path)
    except Exception as exc:  # noqa: BLE001 - optional format: its reason, never a traceback
        return Written("pt2", None, error=reason(exc))
    return Written("pt2", path, "torch.export, dynamic batch")


def write_onnx(source: Any, example: torch.Tensor, path: Path, input_name: str,
               output_name: str) -> Written:
    """ONNX of ``source`` (the exported program, or the module when ``torch.export`` failed
    there: the exporter then tries its own capture strategies), batch axis named ``batch``.

    Files over 2 GB (protobuf's limit) keep their weights in ``<name>.data`` beside them.
    """
    try:
        with quiet(), torch.no_grad():
            program = torch.onnx.export(
                source, (example,), dynamo=True, opset_version=ONNX_OPSET,
                input_names=[input_name], output_names=[output_name],
                dynamic_shapes=({0: "batch"},), optimize=True, verbose=False)
            program.save(str(path))
    except Exception as exc:  # noqa: BLE001 - reported as the format's one-line reason
        return Written("onnx", None, error=reason(exc))
    return Written("onnx", path, f"opset {ONNX_OPSET}, dynamic batch axis 'batch'")


def write_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> Written:
    """TorchScript by tracing at ``example`` (the parity check runs it at other batch sizes,
    which is what catches a size a trace may have baked in)."""
    try:
        with quiet(), torch.no_grad():
            traced = torch.jit.trace(model, example, check_trace=False)
            torch.jit.save(traced, str(path))
    except Exception as exc:  # noqa: BLE001 - optional format: its reason, never a traceback
        return Written("torchscript", None, error=reason(exc))
    return Written("torchscript", path, "torch.jit.trace")


def write_formats(model: nn.Module, example: torch.Tensor, out: Path, stem: str,
                  names: tuple[str, str], formats: tuple[str, ...]) -> list[Written]:
    """Write each of ``formats`` (a subset of ``FORMATS``) for ``model`` into ``out``.

    Args:
        model: the model in eval mode.
        example: a real input batch of ``EXAMPLE_ROWS`` rows (captures the graphs).
        out: the export folder.
        stem: the files' name (``backbone``, ``model``).
        names: the ONNX input and output names.
        formats: which formats to write.

    Returns:
        One ``Written`` per format, in ``FORMATS`` order.
    """
    results: list[Written] = []
    program, program_error = None, None
    if "pt2" in formats or "onnx" in formats:
        try:
            program = export_program(model, example)
        except Exception as exc:  # noqa: BLE001 - the formats that need it say why
            program_error = reason(exc)
    if "onnx" in formats:
        source = program if program is not None else model
        results.append(write_onnx(source, example, out / f"{stem}.onnx", *names))
    if "pt2" in formats:
        results.append(write_pt2(program, out / f"{stem}.pt2") if program is not None
                       else Written("pt2", None, error=program_error))
    if "torchscript" in formats:
        results.append(write_torchscript(model, example, out / f"{stem}.torchscript.pt"))
    return results
