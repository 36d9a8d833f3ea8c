"""``batch.micro_size: auto``: the largest micro batch that fits, with the global batch kept.

Only micro sizes ``m`` with ``(global / world) % m == 0`` are candidates, so that
``accum = global / (m x world)`` is a whole number and the global batch stays exactly as
configured (Composer's rule, unlike accelerate's ``find_executable_batch_size`` or Lightning's
batch-size finder, which change the batch). The search grows (each try at least doubles the
size) and then bisects over those divisors, with a real trial step each time: forward,
backward and optimizer step at size ``m`` on the model itself (no copy of it), after which the
model, gradients, optimizer state and RNG are restored bit for bit, so the run starts from the
same initialisation as with the explicit micro size.

* CPU: the peak is what the step holds: parameters, gradients, optimizer state, the tensors
  autograd saves for backward (``saved_tensors_hooks``, unique storages) and the batch; it fits
  when it is at most ``batch.memory_budget_mb`` (CPU memory does not fail fast, so there is no
  out-of-memory to wait for).
* CUDA: real out-of-memory errors are caught and recovered from (gradients dropped, caches
  emptied); the peak is ``torch.cuda.max_memory_allocated`` against ``batch.memory_fraction``
  x the device's memory (and ``batch.memory_budget_mb`` when set).

Every rank then takes the minimum over ranks (one collective), and the result is cached in
``log.out_dir/micro_size_cache.json`` so that a restart does not probe again.

This module is the search and its cache; the candidates are the batch plan's
(``largebatch.plan.micro_candidates``), a trial step and its measured memory are
``largebatch.tune.step_memory``'s, and the exact-state backup around each trial is
``largebatch.tune.exact_state.preserved``.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from largebatch.config import ConfigError
from largebatch.io import write_json_atomic
from largebatch.plan import micro_candidates
from largebatch.tune.step_memory import Trial, cpu_trial, cuda_trial

__all__ = ["AutoMicro", "CACHE_FILE", "find_micro_size", "first_batch", "memory_limit",
           "run_search", "search"]

CACHE_FILE = "micro_size_cache.json"
_MB = 2 ** 20

@dataclass
class AutoMicro:
    """The outcome of the search (stored in the plan as ``micro_auto``).

    Attributes:
        micro_size: the size every rank uses (min over ranks).
        source: 'search' (probed now), 'cache' (micro_size_cache.json), 'checkpoint' (the
            resumed set's plan) or 'unlimited' (no budget on CPU: the largest candidate).
        peak_bytes: measured peak of one step at ``micro_size`` on this rank (None: unknown).
        limit_bytes: the budget it was held against (None: no limit).
        next_peak_bytes: peak of the next larger candidate (None: none, or out of memory).
        trials: trial steps this process ran (0 from the cache or the checkpoint).
        search_s: seconds the search took.
        candidates: the micro sizes that keep the global batch.
    """

    micro_size: int
    source: str
    peak_bytes: Optional[int] = None
    limit_bytes: Optional[int] = None
    next_peak_bytes: Optional[int] = None
    trials: int = 0
    search_s: float = 0.0
    candidates: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """Plain JSON (what ``plan.json`` holds under ``micro_auto``)."""
        out = asdict(self)
        out["candidates"] = list(self.candidates)
        return out


# ---- the search -----------------------------------------------------------------------------
def search(cands: list[int], fits: Callable[[int], bool]) -> Optional[int]:
    """The largest candidate that fits, assuming memory grows with the micro size.

    Grows first (each try at least doubles the last size that fitted), then bisects between
    the last fit and the first failure over the candidate list. Returns None when even the
    smallest candidate does not fit.
    """
    if not cands or not fits(cands[0]):
        return None
    good, bad = 0, len(cands)  # indices: cands[good] fits, cands[bad:] do not (or untried)
    while True:
        nxt = next((i for i in range(good + 1, len(cands)) if cands[i] >= 2 * cands[good]),
                   len(cands) - 1 if good < len(cands) - 1 else None)
        if nxt is None:
            return cands[good]
        if fits(cands[nxt]):
            good = nxt
        else:
            bad = nxt
            break
    while bad - good > 1:
        mid = (good + bad) // 2
        if fits(cands[mid]):
            good = mid
        else:
            bad = mid
    return cands[good]


def run_search(cands: list[int], trial: Trial) -> tuple[Optional[int], dict[int, Optional[int]]]:
    """``search`` with a trial; returns the size found and the peak of every size tried."""
    peaks: dict[int, Optional[int]] = {}

    def fits(m: int) -> bool:
        ok, peaks[m] = trial(m)
        return ok
    return search(cands, fits), peaks


# ---- the cache -------------------------------------------------------------------------------
def cache_key(parts: dict[str, Any]) -> str:
    """One string per (model + parameter count, device, precision, input shape, budget, ...)."""
    return json.dumps(parts, sort_keys=True)


def read_cache(out_dir: str | Path, key: str) -> Optional[dict[str, Any]]:
    """The cached entry for ``key`` (None: no file, unreadable, or no entry)."""
    path = Path(out_dir) / CACHE_FILE
    try:
        return json.loads(path.read_text()).get("entries", {}).get(key)
    except (OSError, ValueError, AttributeError):
        return None  # a broken cache only costs a new search


def write_cache(out_dir: str | Path, key: str, entry: dict[str, Any]) -> None:
    """Add ``entry`` under ``key`` (atomically: a killed write leaves the old file)."""
    path = Path(out_dir) / CACHE_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    entries = data.get("entries", {}) if isinstance(data, dict) else {}
    entries[key] = entry
    write_json_atomic(path, {"entries": entries})


# ---- the run's search ------------------------------------------------------------------------
def memory_limit(cfg: Any, device: torch.device) -> Optional[int]:
    """Bytes one step may hold: CUDA memory_fraction x the device (capped by memory_budget_mb
    when set); CPU memory_budget_mb (None when 0: no limit)."""
    budget = cfg.batch.memory_budget_mb * _MB if cfg.batch.memory_budget_mb else None
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        limit = int(cfg.batch.memory_fraction * total)
        return limit if budget is None else min(limit, int(budget))
    return None if budget is None else int(budget)


def _key(cfg: Any, model: nn.Module, device: torch.device, x: torch.Tensor,
         per_rank: int) -> str:
    """The cache key. Besides the model, device, precision, input shape and budget: the
    optimizer (its state is part of the peak) and the per-rank batch (the candidates)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return cache_key({"model": cfg.model.name, "params": sum(p.numel() for p in
                                                             model.parameters()),
                      "device": device.type, "device_name": name,
                      "precision": cfg.train.precision, "input_shape": list(x.shape[1:]),
                      "budget_mb": cfg.batch.memory_budget_mb,
                      "memory_fraction": cfg.batch.memory_fraction if device.type == "cuda"
                      else None, "optimizer": cfg.optim.name, "per_rank_batch": per_rank})


def _too_small(cfg: Any, device: torch.device, limit: Optional[int],
               peak: Optional[int]) -> ConfigError:
    """The one-line error when micro size 1 does not fit (here or on another rank)."""
    held = "ran out of memory" if peak is None else f"holds {peak / _MB:.2f} MiB"
    if device.type == "cuda":
        where = (f"batch.memory_fraction={cfg.batch.memory_fraction} "
                 f"(batch.memory_budget_mb={cfg.batch.memory_budget_mb}, limit "
                 f"{(limit or 0) / _MB:.2f} MiB of {device})")
    else:
        where = f"batch.memory_budget_mb={cfg.batch.memory_budget_mb}"
    return ConfigError(f"{where} is too small for batch.micro_size=auto: one step at micro size "
                       f"1 {held} on this rank (or micro size 1 failed on another rank); "
                       f"batch.global_size={cfg.batch.global_size}")


def find_micro_size(cfg: Any, model: nn.Module, optimizer: torch.optim.Optimizer,
                    loss_fn: Callable, sample: tuple[torch.Tensor, torch.Tensor],
                    world_size: int, reduce_min: Callable[[int], int],
                    is_main: bool = True, counter: Optional[list[int]] = None) -> AutoMicro:
    """The micro size every rank uses, from the cache or a search (collective: one min-reduce).

    Args:
        cfg: the run's config (batch, model, train.precision, optim.name, log.out_dir).
        model: the unwrapped model, on its device (trial steps run on it, then it is restored).
        optimizer: the model's optimizer (restored too).
        loss_fn: ``task.loss(model, x, y)``.
        sample: a few real training samples (x, y) on the device, tiled to each trial size.
        world_size: ranks sharing the global batch.
        reduce_min: the min over ranks of an int (every rank calls it exactly once).
        is_main: this rank writes the cache.
        counter: incremented per trial step (tests count probes).

    Raises:
        ConfigError: no candidate, or micro size 1 does not fit on some rank.
    """
    start = time.perf_counter()
    cands = micro_candidates(cfg.batch.global_size, world_size)
    x, y = sample
    device = x.device
    limit = memory_limit(cfg, device)
    key = _key(cfg, model, device, x, cands[-1])
    cached = read_cache(cfg.log.out_dir, key)
    peaks: dict[int, Optional[int]] = {}
    if cached is not None and cached.get("micro_size") in cands:
        local, source = int(cached["micro_size"]), "cache"
    elif limit is None:  # CPU without a budget: every candidate fits, nothing to probe
        local, source = cands[-1], "unlimited"
    else:
        make = cuda_trial if device.type == "cuda" else cpu_trial
        found, peaks = run_search(cands, make(model, optimizer, loss_fn, x, y,
                                              cfg.train.precision, limit, counter))
        local, source = (found or 0), "search"
    agreed = int(reduce_min(local))
    if agreed < 1:
        raise _too_small(cfg, device, limit, peaks.get(1))
    nxt = next((c for c in cands if c > agreed), None)
    if source == "cache":
        result = AutoMicro(**{**cached, "micro_size": agreed, "source": "cache", "trials": 0,
                              "candidates": tuple(cands),
                              "search_s": time.perf_counter() - start})
    else:
        result = AutoMicro(agreed, source, peaks.get(agreed), limit, peaks.get(nxt),
                           len(peaks), time.perf_counter() - start, tuple(cands))
    if is_main and source == "search":
        write_cache(cfg.log.out_dir, key, result.to_json())
    return result


def first_batch(loader: Any, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``n`` real training samples from ``loader`` (its first micro-batch)."""
    x, y = next(iter(loader))
    return x[:n], y[:n]
