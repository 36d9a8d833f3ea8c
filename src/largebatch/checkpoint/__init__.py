"""Checkpoints: sets on disk that survive any kill (``store``) and the run's checkpointer
(``manager``), which saves and restores the run's registered stateful parts by name."""
from largebatch.checkpoint.manager import Checkpointer
from largebatch.checkpoint.store import (CheckpointSet, CorruptSet, check_fresh, list_sets,
                                         load_checkpoint, rank_file, run_status, save_checkpoint,
                                         verify_set)

__all__ = ["CheckpointSet", "Checkpointer", "CorruptSet", "check_fresh", "list_sets",
           "load_checkpoint", "rank_file", "run_status", "save_checkpoint", "verify_set"]
