"""Typed configuration: sections (``sections``), YAML files and dotted CLI overrides (``io``),
the validation of every section in one place (``validate``), the key reference (``keys``).

Precedence is CLI > file > defaults. Unknown keys and wrong types are errors that name the
key (``ConfigError``; the CLI turns it into one line and exit code 2). Each field carries its
docstring in ``metadata["doc"]`` so ``largebatch`` can print what a key means.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from largebatch.config.io import (ConfigError, deep_merge, from_dict, get_key,
                                  merge_overrides, parse_override, read_yaml, to_dict)
from largebatch.config.keys import describe as _describe
from largebatch.config.validate import check_schedule, choices, validate
from largebatch.config.sections import (  # noqa: F401 (re-exported: import sections from here)
    doc, DataConfig, TaskConfig, FaceConfig, ModelConfig, BatchConfig, OptimConfig,
    PlateauConfig, ScheduleConfig, TrainConfig, EngineConfig, WandbConfig, LogConfig,
    CheckpointConfig, ArmConfig, StudyConfig, Config)

__all__ = ["Config", "ConfigError", "check_schedule", "choices", "describe", "from_dict",
           "get_key", "load_config", "merge_overrides", "parse_override", "read_yaml", "to_dict",
           "validate"]


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> Config:
    """Defaults, then ``base`` (raw mapping), then the YAML file, then CLI overrides."""
    data: dict = dict(base or {})
    if path is not None:
        data = deep_merge(data, read_yaml(path))
    data = merge_overrides(data, overrides or [])
    cfg = from_dict(Config, data)
    validate(cfg)
    return cfg


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(key, default, doc) for every leaf key: the reference ``largebatch keys`` prints."""
    return _describe(cls, prefix)
