"""Rank agreement at start: every rank must run the same experiment on the same data.

Ranks that start with different configs (two nodes with different copies of a file, a per-node
environment) would train with different LRs and exit 0 with diverged replicas, read
overlapping shards, or hang at the first step where their cadences differ. So before the model
is built, every rank reduces the hash of what it is about to run — its resolved config, its
batch plan and a fingerprint of its data — in one collective (min and max of the hash); when
they differ, the ranks exchange their facts (only then) and each prints the same one line
naming every key that differs with its value per rank, and exits 2.

Left out of the comparison: where things are read from on each node and how fast
(``data.root``, ``data.mirror``, ``data.download``, ``data.num_workers``, ``face.val_root``,
``train.device``) and each rank's memory budget (``batch.micro_size=auto`` agrees on the
smallest fit in its own collective): a node-local copy of the data is fine, its content is compared through the
files' sizes and a checksum of their first bytes (mtimes differ between copies).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
import torch.distributed as torch_dist

from largebatch.errors import ConfigError
from largebatch.io import json_text

#: Keys that may differ between ranks: where and how fast each node reads, not what.
LOCAL_KEYS = ("data.root", "data.mirror", "data.download", "data.num_workers",
              "face.val_root", "train.device",
              # a rank's own memory: batch.micro_size=auto agrees on the smallest fit itself
              "batch.memory_budget_mb", "batch.memory_fraction",
              # only rank 0 writes the run's files there (lr-find and noise-scale give each
              # rank its own scratch folder); the checkpoint folder every rank writes its shards
              # to is compared as ``checkpoint.folder`` (train/build.py)
              "log.out_dir")
#: Bytes of each data file that enter its checksum (with its size).
HEAD_BYTES = 1 << 16
#: Keys shown in the error line, at most (the rest are counted).
SHOWN = 4


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def file_fingerprint(path: Path) -> str:
    """``size:sha256-of-the-first-64-KiB`` of a file (``missing`` when absent)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(HEAD_BYTES)
        return f"{path.stat().st_size}:{hashlib.sha256(head).hexdigest()[:16]}"
    except OSError:
        return "missing"


def run_facts(config: dict[str, Any], plan: dict[str, Any], dataset_size: int,
              files: Iterable[Path] = ()) -> dict[str, str]:
    """What must be identical on every rank, as flat ``key -> value`` strings."""
    facts = {f"config.{k}": json.dumps(v, default=str)
             for k, v in _flat(config).items() if k not in LOCAL_KEYS}
    facts.update({f"plan.{k}": json.dumps(v, default=str) for k, v in _flat(plan).items()})
    facts["data.size"] = str(dataset_size)
    for f in files:
        facts[f"data.file.{Path(f).name}"] = file_fingerprint(Path(f))
    return facts


def _digest(facts: dict[str, str]) -> int:
    """A 62-bit hash of the facts (an int64 tensor carries it and its negation exactly)."""
    text = json_text(facts, indent=None)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 2


def check_ranks_agree(facts: dict[str, str], device: Optional[torch.device] = None) -> None:
    """Collective: raise the same one-line ``ConfigError`` on every rank when the ranks' facts
    differ (a no-op without a process group or with one rank).

    One all-reduce of ``(hash, -hash)`` with MAX gives the largest and the smallest hash; only
    when they differ are the facts gathered to name the keys.
    """
    if not torch_dist.is_initialized() or torch_dist.get_world_size() == 1:
        return
    on_nccl = torch_dist.get_backend() == "nccl"
    where = device if on_nccl and device is not None else torch.device("cpu")
    h = _digest(facts)
    t = torch.tensor([h, -h], dtype=torch.int64, device=where)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    if int(t[0]) == -int(t[1]):  # max == min: every rank has the same hash
        return
    every: list[Any] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(every, facts)
    error = ConfigError(disagreement(every))
    error.all_ranks = True  # every rank raises it: the CLI lets all print before exiting
    raise error


def disagreement(every: list[dict[str, str]]) -> str:
    """The line naming the keys whose values differ between ranks, with each rank's value."""
    keys = sorted({k for f in every for k in f if len({g.get(k) for g in every}) > 1})
    parts = []
    for key in keys[:SHOWN]:
        values = ", ".join(f"rank {r}: {f.get(key, '(absent)')}" for r, f in enumerate(every))
        parts.append(f"{key} ({values})")
    more = f" (+{len(keys) - SHOWN} more)" if len(keys) > SHOWN else ""
    return (f"the ranks disagree on what to run: {'; '.join(parts)}{more}; start every rank "
            f"with the same config, data and code")
