"""One metrics path fanned out to sinks: JSONL file, wandb, progress bar (rank 0 only)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional

from largebatch.config import ConfigError, LogConfig


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as strings so the file stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temp file then rename it into place (never a half-written file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


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


class MetricsLogger:
    """Writes ``metrics.jsonl`` and mirrors each record to wandb; a no-op off rank 0."""

    def __init__(self, cfg: LogConfig, enabled: bool, run_config: dict[str, Any],
                 append: bool = False) -> None:
        self.enabled = enabled
        self.out_dir = Path(cfg.out_dir)
        self._file = None
        self._wandb = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # A resumed run appends: what the pre-empted run wrote is kept.
        # Line-buffered: a pre-empted or killed run keeps every record up to its last step.
        self._file = open(self.out_dir / "metrics.jsonl", "a" if append else "w", buffering=1)
        if cfg.wandb.mode != "disabled":
            import wandb  # imported only when asked for: it is slow to import
            self._wandb = wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity,
                                     name=cfg.wandb.name, mode=cfg.wandb.mode,
                                     dir=str(self.out_dir), config=run_config,
                                     resume="allow" if append else None)

    def log(self, record: dict[str, Any]) -> None:
        """One JSON object per line; wandb gets the numeric fields at the record's step."""
        if not self.enabled:
            return
        self._file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        if self._wandb is not None:
            numbers = {k: v for k, v in record.items()
                       if isinstance(v, (int, float)) and k != "step"}
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
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
        self._file = open(path, "a", buffering=1)
        return dropped

    def write_json(self, name: str, obj: Any) -> None:
        """A JSON file in the output directory, written atomically."""
        if self.enabled:
            write_json_atomic(self.out_dir / name, obj)

    def close(self, summary: Optional[dict[str, Any]] = None) -> None:
        """Flush everything; wandb gets the summary and finishes."""
        if not self.enabled:
            return
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            if summary:
                for k, v in summary.items():
                    if isinstance(v, (int, float, bool, str)):
                        self._wandb.summary[k] = v
            self._wandb.finish()
            self._wandb = None
