"""Class shards: insightface's split, world-size-independent init, resharding, memory plan.

A shard is the contiguous class range ``[class_start, class_start + num_local)`` of one rank
(insightface's split: the first ``C % W`` ranks hold one class more). A head's state dict
carries its range, so a checkpoint written on ``W`` ranks can be cut again for any other world
size: ``reshard`` concatenates every row-shaped tensor (the weight and its optimizer state) in
class order and slices the new rank's rows.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

from largebatch.config import ConfigError

STATE_FORMAT = "largebatch.partial_fc/1"
_INIT_BLOCK = 4096  # rows drawn from one generator seed; fixes init across world sizes


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(class_start, num_local)`` of ``rank`` (insightface's split).

    Raises:
        ConfigError: when a rank would hold no class (``num_classes < world_size``).
    """
    if num_classes < world_size:
        raise ConfigError(f"face.num_classes={num_classes} must be >= world size {world_size} "
                          f"(every rank holds at least one class)")
    base, extra = divmod(num_classes, world_size)
    return base * rank + min(rank, extra), base + int(rank < extra)


def init_rows(class_start: int, num_local: int, dim: int, seed: int, std: float,
              dtype: torch.dtype = torch.float32, device: Any = None) -> torch.Tensor:
    """Rows ``class_start ..`` of the ``N(0, std^2)`` class-centre matrix for ``seed``.

    Rows are drawn in fixed blocks of global class indices, each from its own seed, so every
    world size starts from the same full matrix without anyone materialising it.
    """
    out = torch.empty(num_local, dim, dtype=dtype, device=device)
    if num_local == 0:
        return out
    end = class_start + num_local
    gen = torch.Generator(device="cpu")
    for block in range(class_start // _INIT_BLOCK, (end - 1) // _INIT_BLOCK + 1):
        lo, hi = block * _INIT_BLOCK, (block + 1) * _INIT_BLOCK
        gen.manual_seed(seed * 1_000_003 + block)
        rows = torch.randn(_INIT_BLOCK, dim, generator=gen) * std
        a, b = max(lo, class_start), min(hi, end)
        out[a - class_start: b - class_start] = rows[a - lo: b - lo].to(dtype)
    return out


def _check_cover(states: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The states sorted by class range, checked to tile ``[0, num_classes)`` exactly."""
    if not states:
        raise ValueError("reshard: no shard states given")
    metas = [s["_extra_state"] for s in states]
    for key in ("format", "num_classes", "embedding_size"):
        values = {m[key] for m in metas}
        if len(values) != 1:
            raise ValueError(f"reshard: shards disagree on {key}: {sorted(map(str, values))}")
    order = sorted(range(len(states)), key=lambda i: metas[i]["class_start"])
    nxt = 0
    for i in order:
        if metas[i]["class_start"] != nxt:
            raise ValueError(f"reshard: class ranges leave a gap or overlap at class {nxt} "
                             f"(a shard starts at {metas[i]['class_start']})")
        nxt += metas[i]["num_local"]
    if nxt != metas[0]["num_classes"]:
        raise ValueError(f"reshard: shards cover {nxt} of {metas[0]['num_classes']} classes")
    return [states[i] for i in order]


def reshard(states: Sequence[Mapping[str, Any]], new_world: int, new_rank: int
            ) -> dict[str, Any]:
    """The head state dict of ``new_rank`` of ``new_world`` from every old rank's state dict.

    Args:
        states: ``PartialFC.state_dict()`` of every old rank (any order).
        new_world: the new world size.
        new_rank: the rank whose state to build.

    Returns:
        A state dict loadable by that rank's ``PartialFC`` (weight, class range, optimizer
        rows and hyper-parameters).
    """
    states = _check_cover(states)
    metas = [s["_extra_state"] for s in states]
    start, num_local = shard_range(metas[0]["num_classes"], new_world, new_rank)
    spans = [(m["class_start"], m["num_local"]) for m in metas]

    def cut(parts: list[torch.Tensor]) -> torch.Tensor:
        """The new rank's rows, copied from the old shards that overlap them (only those)."""
        pieces = []
        for part, (s0, n0) in zip(parts, spans):
            lo, hi = max(s0, start), min(s0 + n0, start + num_local)
            if lo < hi:
                pieces.append(part[lo - s0: hi - s0])
        return torch.cat(pieces)

    opts = [m.get("optimizer") for m in metas]
    optimizer = None
    if any(o is not None for o in opts):
        if any(o is None for o in opts) or len({o["kind"] for o in opts}) != 1 or \
                len({tuple(sorted(o["rows"])) for o in opts}) != 1:
            raise ValueError("reshard: shards disagree on their optimizer state")
        optimizer = {"kind": opts[0]["kind"], "hparams": dict(opts[0]["hparams"]),
                     "rows": {k: cut([o["rows"][k] for o in opts]) for k in opts[0]["rows"]}}
    meta = {key: metas[0][key] for key in ("format", "num_classes", "embedding_size", "seed",
                                           "windows")}
    meta.update(class_start=start, num_local=num_local, optimizer=optimizer)
    return {"weight": cut([s["weight"] for s in states]), "_extra_state": meta}


def expected_positive_share(num_classes: int, global_batch: int) -> float:
    """Expected share of classes present in a uniform batch, ``1 - (1 - 1/C)^B``.

    ``sample_rate`` below this means most shards keep only positives (no negatives sampled).
    """
    return -math.expm1(global_batch * math.log1p(-1.0 / num_classes)) if num_classes > 1 else 1.0


_OPT_ROWS = {"none": 0, "sgd": 1, "adamw": 2}


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def fc_memory(num_classes: int, embedding_size: int, world_size: int, sample_rate: float = 1.0,
              dtype: torch.dtype | str = torch.float32, optimizer: str = "sgd",
              global_micro_batch: int = 0, sparse_update: bool = True) -> dict[str, float]:
    """Bytes per rank of the largest shard, and the logits of one micro-step.

    Args:
        num_classes, embedding_size, world_size, sample_rate: as for ``PartialFC``.
        dtype: storage dtype of the class centres (a torch dtype or 'fp32'/'bf16'/'fp16').
        optimizer: ``"sgd"`` (momentum), ``"adamw"`` or ``"none"``.
        global_micro_batch: samples of one micro-step over all ranks (the gathered rows).
        sparse_update: gradients live on the sampled rows only (the default head).

    Returns:
        ``num_local``, ``num_sample``, ``weight_bytes``, ``grad_bytes`` (for ``r < 1`` the
        window's sampled copy of the rows and its gradient, plus the dense step's full-shard
        gradient when ``sparse_update`` is off), ``optimizer_bytes``, ``total_bytes``,
        ``logits_elements`` and ``logits_bytes`` (one fp32 ``(B, S)`` buffer; the forward
        peaks at two of them), ``expected_positive_share``.
    """
    if optimizer not in _OPT_ROWS:
        raise ConfigError(f"face.optimizer={optimizer!r}: use one of {sorted(_OPT_ROWS)}")
    dtype = _DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"face.dtype={dtype!r}: use one of {sorted(_DTYPES)}")
    _, num_local = shard_range(num_classes, world_size, 0)  # rank 0 holds the most
    num_sample = min(num_local, math.ceil(sample_rate * num_local))
    row = embedding_size * torch.empty((), dtype=dtype).element_size()
    weight = num_local * row
    if num_sample == num_local:
        grad = weight
    else:  # sparse: the window's sampled copy and its gradient; dense: a full-shard gradient
        grad = 2 * num_sample * row + (0 if sparse_update else weight)
    opt = _OPT_ROWS[optimizer] * num_local * row + (8 * num_local if optimizer == "adamw" else 0)
    logits = global_micro_batch * num_sample
    return {"num_local": num_local, "num_sample": num_sample, "weight_bytes": weight,
            "grad_bytes": grad, "optimizer_bytes": opt, "total_bytes": weight + grad + opt,
            "logits_elements": logits, "logits_bytes": 4 * logits,
            "expected_positive_share": expected_positive_share(num_classes,
                                                               max(global_micro_batch, 1))}
