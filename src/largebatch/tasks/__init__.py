"""Tasks: what is trained and how it is scored; each registers its ``task.name``."""
from __future__ import annotations

from largebatch.config import Config
from largebatch.registry import TASKS
from largebatch.tasks.base import Metric, Task, TaskParts

TASKS.register("classification", "largebatch.tasks.classification:ClassificationTask")
# face: the Partial FC head's forward is a collective (no single-rank trial step).
TASKS.register("face", "largebatch.tasks.face:FaceTask", collective_forward=True)


def build_task(cfg: Config) -> Task:
    """The task of ``cfg.task.name`` (ConfigError listing the registered tasks otherwise)."""
    return TASKS.get(cfg.task.name)(cfg)


__all__ = ["Metric", "Task", "TaskParts", "build_task"]
