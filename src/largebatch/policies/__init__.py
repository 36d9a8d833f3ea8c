"""Batch policies: what may change the batch plan during a run (plateau growth, goodput)."""
