"""One metrics path fanned out to sinks (rank 0 only): ``metrics.jsonl``, the console,
TensorBoard, wandb. The trainer writes a record once; every sink shows the same numbers."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from largebatch.config import ConfigError, LogConfig
from largebatch.console import Console
from largebatch.io import json_safe, write_bytes_atomic, write_json_atomic


def check_wandb_online(mode: str, env: Optional[dict] = None) -> None:
    """An online run without credentials fails in one line before training starts."""
    if mode != "online":
        return
    env = os.environ if env is None else env
    if env.get("WANDB_API_KEY"):
        return
    netrc = Path(env.get("NETRC", Path.home() / ".netrc"))
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return
    raise ConfigError("log.wandb.mode=online but no wandb API key is configured "
                      "(set WANDB_API_KEY or run `wandb login`, or use log.wandb.mode=offline)")


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    """The record's numeric fields but its step (what wandb and TensorBoard plot)."""
    return {k: v for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


class MetricsLogger:
    """Writes ``metrics.jsonl`` and mirrors each record to the console, TensorBoard and wandb;
    a no-op off rank 0.

    Args:
        cfg: the log section.
        enabled: rank 0.
        run_config: the run's config (wandb's run config).
        append: a resumed run appends to the records of the run it continues.
        console: show lines and a bar (``log.progress`` and not a quiet caller).
    """

    def __init__(self, cfg: LogConfig, enabled: bool, run_config: dict[str, Any],
                 append: bool = False, console: bool = True) -> None:
        self.enabled = enabled
        self.out_dir = Path(cfg.out_dir)
        self.console = Console(enabled and console and cfg.progress)
        self._file = None
        self._wandb = None
        self._tensorboard = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # A resumed run appends: what the pre-empted run wrote is kept.
        # Line-buffered: a pre-empted or killed run keeps every record up to its last step.
        self._file = open(self.out_dir / "metrics.jsonl", "a" if append else "w", buffering=1)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
            self._tensorboard = SummaryWriter(str(self.out_dir / "tensorboard"))
        if cfg.wandb.mode != "disabled":
            import wandb  # imported only when asked for: it is slow to import
            self._wandb = wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity,
                                     name=cfg.wandb.name, mode=cfg.wandb.mode,
                                     dir=str(self.out_dir), config=run_config,
                                     resume="allow" if append else None)

    def begin(self, step: int, total: int, time_s: float = 0.0) -> None:
        """Training starts (or resumes) at ``step`` of ``total`` planned steps."""
        self.console.begin(step, total, time_s)

    def log(self, record: dict[str, Any]) -> None:
        """One JSON object per line (a non-finite number as null beside its ``KEY_nonfinite``,
        ``io.json_safe``); the other sinks get the numeric fields at the record's step."""
        if not self.enabled:
            return
        self._file.write(json.dumps(json_safe(record)) + "\n")
        self.console.record(record)
        numbers = _numbers(record)
        if self._tensorboard is not None and "step" in record:
            for key, value in numbers.items():
                self._tensorboard.add_scalar(f"{record.get('kind', 'run')}/{key}", value,
                                             global_step=int(record["step"]))
        if self._wandb is not None:
            self._wandb.log(numbers, step=record.get("step"))

    def drop_after(self, step: int) -> int:
        """Remove records past ``step`` (a resumed run redoes them), atomically; returns how many.

        A SIGKILLed run logged steps after its last checkpoint set; without this the resumed
        run would log them again and metrics.jsonl would hold those steps twice.
        """
        if not self.enabled or self._file is None:
            return 0
        path = self.out_dir / "metrics.jsonl"
        self._file.close()
        kept, dropped = [], 0
        for line in path.read_text().splitlines():
            try:
                late = int(json.loads(line).get("step", 0)) > step
            except (ValueError, TypeError, AttributeError):
                late = True  # a line cut by the kill
            dropped += late
            if not late:
                kept.append(line + "\n")
        write_bytes_atomic(path, "".join(kept).encode())
        self._file = open(path, "a", buffering=1)
        return dropped

    def write_json(self, name: str, obj: Any) -> None:
        """A JSON file in the output directory, written atomically (strict JSON)."""
        if self.enabled:
            write_json_atomic(self.out_dir / name, obj)

    def close(self, summary: Optional[dict[str, Any]] = None) -> None:
        """Flush everything; wandb gets the summary and finishes."""
        if not self.enabled:
            return
        self.console.close()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            if summary:
                for k, v in summary.items():
                    if isinstance(v, (int, float, bool, str)):
                        self._wandb.summary[k] = v
            self._wandb.finish()
            self._wandb = None
