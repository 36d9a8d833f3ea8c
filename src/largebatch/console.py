"""What a person watching a run reads (rank 0 only): one line per logged step and per evaluation.

On a terminal, a progress bar (tqdm) with the lines above it; anywhere else (a Slurm log, a pipe,
``nohup``), plain lines and no carriage return, so the log reads top to bottom. A resumed run's
bar continues from its step. The lines are made from the records ``metrics.jsonl`` gets, so the
console never says anything the record does not.

A train line: ``step 120/1000 (12%) | epoch 1.23 | loss 2.3456 | lr 0.1 | grad 1.23 |
1234 samples/s | eta 5m12s`` (and ``mem 1.21 GiB``, the peak allocated, on CUDA). Samples per
second and the ETA use training time only (the records' ``time_s``: evaluation excluded).
"""
from __future__ import annotations

import math
import sys
from typing import Any, Optional, TextIO

import torch

#: Record fields that say where a record is, not what it measured.
POSITION = ("kind", "step", "epoch", "samples", "time_s")


def duration(seconds: float) -> str:
    """``3h04m``, ``5m12s`` or ``42s``."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def number(value: Any) -> str:
    """A metric as a short number (``0.9123``, ``2.3e-05``, ``1234``); None as ``-``."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"


class Console:
    """The run's console output.

    Args:
        enabled: print anything at all (rank 0 and ``log.progress``).
        stream: where to write (stdout).
        tty: whether ``stream`` is a terminal (None: ask it).
    """

    def __init__(self, enabled: bool, stream: Optional[TextIO] = None,
                 tty: Optional[bool] = None) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.tty = bool(tty if tty is not None else getattr(self.stream, "isatty", bool)())
        self.total = 0
        self._bar: Any = None
        self._start = (0, 0.0)  # (step, training seconds) where this process started
        self._last: Optional[tuple[int, float]] = None   # (samples, time_s) of the last line

    def begin(self, step: int, total: int, time_s: float = 0.0) -> None:
        """The run starts (or resumes) at ``step`` of ``total`` planned optimizer steps, after
        ``time_s`` seconds of training."""
        self.total, self._start = total, (step, time_s)
        if self.enabled and self.tty:
            from tqdm import tqdm
            self._bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True,
                             mininterval=1.0, leave=False, file=self.stream)

    def record(self, r: dict[str, Any]) -> None:
        """Show a record: a train line, an evaluation line, a skipped step."""
        if not self.enabled:
            return
        kind = r.get("kind")
        if kind == "train":
            self._train(r)
        elif kind == "eval":
            fields = [f"{k} {number(v)}" for k, v in r.items()
                      if k not in POSITION and not k.endswith("_note")]  # (notes: the JSONL)
            self._say(f"eval step {r.get('step')} | epoch {number(r.get('epoch'))} | "
                      + " | ".join(fields))
        elif kind == "skip":
            self._say(f"step {r.get('step')}: update skipped ({r.get('reason')}), "
                      f"{r.get('skipped_steps')} so far")

    def _train(self, r: dict[str, Any]) -> None:
        step, samples, t = int(r.get("step", 0)), int(r.get("samples", 0)), r.get("time_s", 0.0)
        rate = "-"
        if self._last is not None and t > self._last[1]:
            rate = f"{(samples - self._last[0]) / (t - self._last[1]):.0f}"
        self._last = (samples, t)
        done = step - self._start[0]
        eta = (self.total - step) * (t - self._start[1]) / done if done > 0 else math.nan
        share = f" ({100 * step / self.total:.0f}%)" if self.total else ""
        parts = [f"step {step}/{self.total}{share}", f"epoch {number(r.get('epoch'))}",
                 f"loss {number(r.get('loss'))}", f"lr {number(r.get('lr'))}"]
        if r.get("grad_norm") is not None:
            parts.append(f"grad {number(r['grad_norm'])}")
        parts += [f"{rate} samples/s", f"eta {duration(eta)}"]
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            parts.append(f"mem {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB")
        if self._bar is not None:
            self._bar.update(max(0, step - self._bar.n))
            self._bar.set_postfix(loss=number(r.get("loss")), refresh=False)
        self._say(" | ".join(parts))

    def _say(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        """Take the bar down (the lines stay)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
