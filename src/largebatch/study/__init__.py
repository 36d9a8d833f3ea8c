"""The batch-size study (MNIST, or faces: ``face_*``): ``largebatch study CONFIG [key=value...]``.

``sweep`` says what the study runs, ``configs`` builds every run's config and plan, ``runner``
trains every arm (recipe) over the batch-size sweep and ``measure`` turns each run's records
into a report row; ``report`` writes the rows as CSV/JSON, the PNG ``figures`` and ``study.md``
with the claims judged from the numbers (``verdicts``). A face study (``task.name=face``)
adds ``face_measure``'s columns and writes ``face_report``'s study.md with ``face_verdicts``.
"""
from __future__ import annotations

from typing import Any

__all__ = ["run_study"]


def run_study(*args: Any, **kwargs: Any) -> list[dict]:
    """Run the study (see ``largebatch.study.runner.run_study``); imports torch lazily."""
    from largebatch.study.runner import run_study as _run_study
    return _run_study(*args, **kwargs)
