"""Tasks: what is trained and how it is scored; ``build_task`` picks one from the config."""
from __future__ import annotations

from largebatch.config import Config
from largebatch.tasks.base import Metric, Task, TaskParts


def build_task(cfg: Config) -> Task:
    """The task of ``cfg.task.name`` (validated by the config already)."""
    if cfg.task.name == "classification":
        from largebatch.tasks.classification import ClassificationTask
        return ClassificationTask(cfg)
    from largebatch.tasks.face import FaceTask
    return FaceTask(cfg)


__all__ = ["Metric", "Task", "TaskParts", "build_task"]
