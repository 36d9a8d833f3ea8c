"""The memory one trial step holds: a real forward, backward and optimizer step at a micro size,
measured, as the trials of the ``batch.micro_size=auto`` search (``largebatch.tune.micro_batch``).

* CPU (``cpu_trial``): what the step holds at its peak, counted from its tensors: parameters
  and buffers, gradients, optimizer state, every storage autograd saves for backward (through
  ``saved_tensors_hooks``, each storage once) and the batch. CPU memory does not fail fast, so
  the count is held against a budget instead of waiting for an out-of-memory error.
* CUDA (``cuda_trial``): ``torch.cuda.max_memory_allocated`` of a real step; an out-of-memory
  error means the size does not fit and is recovered from.

Every trial runs inside ``largebatch.tune.exact_state.preserved``: the model is left exactly as
it was.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from largebatch.tune.exact_state import preserved

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

#: A trial: micro size -> (fits, measured peak bytes; None after an out-of-memory error).
Trial = Callable[[int], tuple[bool, Optional[int]]]


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
    """The tensors of the optimizer's state (momentum buffers, Adam's moments, ...)."""
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
