"""Training: the loop (``trainer``), its counters and snapshots (``state``), and the glue that
builds a run from a config (``build``)."""
from largebatch.train.build import Run, build_run, finish_run, plan_for, train

__all__ = ["Run", "build_run", "finish_run", "plan_for", "train"]
