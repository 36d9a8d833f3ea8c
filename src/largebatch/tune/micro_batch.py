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
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from largebatch.config import ConfigError

CACHE_FILE = "micro_size_cache.json"
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_MB = 2 ** 20

#: A trial: micro size -> (fits, measured peak bytes; None after an out-of-memory error).
Trial = Callable[[int], tuple[bool, Optional[int]]]


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


# ---- candidates and the search ---------------------------------------------------------------
def candidates(global_size: Optional[int], world_size: int) -> list[int]:
    """Every micro size that keeps ``global_size`` exactly: the divisors of global / world.

    Raises:
        ConfigError: no global batch, or one that the world size does not divide.
    """
    if global_size is None:
        raise ConfigError("batch.micro_size=auto needs batch.global_size (the batch it keeps)")
    if global_size < 1 or global_size % world_size:
        raise ConfigError(f"batch.global_size={global_size} is not divisible by world_size "
                          f"{world_size}: no micro size keeps it (micro x accum x world)")
    per_rank = global_size // world_size
    return [m for m in range(1, per_rank + 1) if per_rank % m == 0]


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


# ---- saving and restoring the exact state ------------------------------------------------------
def _cpu_clone(obj: Any) -> Any:
    """A deep copy with every tensor cloned to the CPU (the backup must not take device memory)."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_clone(v) for v in obj)
    return obj


@contextlib.contextmanager
def preserved(model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Restore weights, buffers, gradients, optimizer state, train mode and RNG afterwards.

    ``load_state_dict`` copies into the existing tensors, so the optimizer keeps pointing at the
    same parameters and the values come back bit for bit (BatchNorm's running statistics too).
    """
    weights = _cpu_clone(model.state_dict())
    opt_state = _cpu_clone(optimizer.state_dict())
    grads = [None if p.grad is None else p.grad.detach().to("cpu", copy=True)
             for p in model.parameters()]
    training = model.training
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        for p, g in zip(model.parameters(), grads):
            p.grad = None if g is None else g.to(p.device)
        model.load_state_dict(weights)
        optimizer.load_state_dict(opt_state)
        model.train(training)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


# ---- one trial step -----------------------------------------------------------------------------
def _storages(tensors: Any) -> dict[int, int]:
    """data_ptr -> nbytes of the unique storages behind ``tensors``."""
    out: dict[int, int] = {}
    for t in tensors:
        if torch.is_tensor(t):
            st = t.untyped_storage()
            if st.data_ptr():
                out[st.data_ptr()] = st.nbytes()
    return out


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    for state in optimizer.state.values():
        yield from (v for v in state.values() if torch.is_tensor(v))


def step_and_measure(model: nn.Module, optimizer: torch.optim.Optimizer,
                     loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
                     x: torch.Tensor, y: torch.Tensor, precision: str = "fp32") -> int:
    """Forward + backward + optimizer step on (x, y); the bytes the step holds at its peak.

    Parameters and buffers, gradients, optimizer state, every storage autograd saves for
    backward that is none of those nor the batch, and the batch. Leaves the model stepped:
    call it inside ``preserved``.
    """
    saved: dict[int, int] = {}
    alive: list[Any] = []  # freed saved storages could be reused by gradients: same address

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.update(_storages([t]))
        alive.append(t.untyped_storage())
        return t

    dtype = _DTYPES[precision]
    cast = (torch.autocast(x.device.type, dtype=dtype) if dtype is not None
            else contextlib.nullcontext())
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), cast:
        loss = loss_fn(model, x, y)
    loss.backward()
    optimizer.step()
    params = _storages([*model.parameters(), *model.buffers()])
    grads = _storages(p.grad for p in model.parameters())
    state = _storages(_optimizer_tensors(optimizer))
    batch = _storages([x, y])
    held = {**grads, **state}
    activations = {k: v for k, v in saved.items()
                   if k not in params and k not in held and k not in batch}
    alive.clear()
    return sum(params.values()) + sum(held.values()) + sum(activations.values()) + \
        sum(batch.values())


def _tile(x: torch.Tensor, m: int) -> torch.Tensor:
    """A batch of ``m`` samples from the real ones in ``x`` (repeated) in its own storage of
    exactly ``m`` samples (a slice would keep a larger storage alive and be counted)."""
    return x[torch.arange(m, device=x.device) % len(x)]


def cpu_trial(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable,
              x: torch.Tensor, y: torch.Tensor, precision: str, limit_bytes: int,
              counter: Optional[list[int]] = None) -> Trial:
    """The CPU trial: the measured peak of one step at size m against ``limit_bytes``."""
    def trial(m: int) -> tuple[bool, Optional[int]]:
        if counter is not None:
            counter[0] += 1
        with preserved(model, optimizer):
            peak = step_and_measure(model, optimizer, loss_fn, _tile(x, m), _tile(y, m),
                                    precision)
        return peak <= limit_bytes, peak
    return trial


def cuda_trial(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable,
               x: torch.Tensor, y: torch.Tensor, precision: str, limit_bytes: int,
               counter: Optional[list[int]] = None) -> Trial:
    """The CUDA trial: a real step; an out-of-memory error means it does not fit.

    After an OOM the traceback (which holds the failed step's tensors) is dropped before the
    state is restored, gradients are cleared and the caching allocator is emptied, so the next
    trial starts from the same memory as the first.
    """
    device = x.device

    def run(m: int) -> int:
        xm, ym = _tile(x, m), _tile(y, m)
        step_and_measure(model, optimizer, loss_fn, xm, ym, precision)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)

    def trial(m: int) -> tuple[bool, Optional[int]]:
        if counter is not None:
            counter[0] += 1
        peak: Optional[int] = None
        with preserved(model, optimizer):
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            try:
                peak = run(m)
            except torch.cuda.OutOfMemoryError:
                peak = None  # the except block ends here: the failed frames are released
            except RuntimeError as exc:  # cuBLAS/cuDNN report a failed allocation their way
                if not _is_oom(exc):
                    raise
                peak = None
            optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        return peak is not None and peak <= limit_bytes, peak
    return trial


def _is_oom(exc: BaseException) -> bool:
    """An allocation failure a library reports as a plain RuntimeError."""
    text = str(exc)
    return "out of memory" in text or "ALLOC_FAILED" in text


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
    """Add ``entry`` under ``key`` (atomic rename: a killed write leaves the old file)."""
    path = Path(out_dir) / CACHE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    entries = data.get("entries", {}) if isinstance(data, dict) else {}
    entries[key] = entry
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"entries": entries}, indent=2))
    os.replace(tmp, path)


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
    cands = candidates(cfg.batch.global_size, world_size)
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
