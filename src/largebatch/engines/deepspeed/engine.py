"""DeepSpeed behind the ``Engine`` interface: ZeRO 0-3 with largebatch's optimizer and schedule.

What DeepSpeed owns: gradient reduction (all-reduce at ZeRO 0/1, reduce-scatter at ZeRO 2,
parameter partitioning at ZeRO 3), mixed precision (its bf16/fp16 optimizers), clipping and the
optimizer step. What largebatch keeps: the batch plan (DeepSpeed's batch fields are generated
from it), the optimizer (handed over as DeepSpeed's *client* optimizer) and the LR schedule
(which writes ``param_group['lr']`` on ``engine.optimizer`` every step).

Accumulation follows the trainer's windows, not DeepSpeed's counter: a window can be short at an
epoch's end and grows when the batch grows on a plateau, while DeepSpeed's
``gradient_accumulation_steps`` is fixed at start. So every micro-batch states whether it ends
the window (``set_gradient_accumulation_boundary``), the loss arrives already weighted by its
share of the window (``backward(..., scale_wrt_gas=False)``: no second division by the
accumulation steps), and DeepSpeed's ``step()`` is called once per window, on the boundary.

Checkpoints, resume and the restore behind a dropped window live in ``ds_state`` (each rank's
fp32 partitions, optimizer state, ZeRO-3 shares, counters and loss-scaler numbers).
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import types
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.distributed as torch_dist
from torch import nn

from largebatch.config import Config, ConfigError
from largebatch.dist import DistEnv
from largebatch.engines.deepspeed import state as ds_state
from largebatch.engines.base import Engine, total_grad_norm
from largebatch.engines.deepspeed.config import build_ds_config
from largebatch.plan import BatchPlan


def _skip_shm_comm_build(deepspeed: Any) -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory comm op on CPU.

    DeepSpeed's comm backend builds ``deepspeed_shm_comm`` (g++, ~3 min the first time, then
    cached under TORCH_EXTENSIONS_DIR) whenever the op is "compatible", yet only its
    ``inference_all_reduce`` uses it; training collectives go through torch.distributed either
    way. Marking the op incompatible (DeepSpeed caches this dict for the process) removes the
    need for a compiler on the client-optimizer path.
    """
    compatible = deepspeed.ops.__compatible_ops__
    compatible["deepspeed_shm_comm"] = False


def _batchnorm_forward_fp32_affine(self: nn.modules.batchnorm._BatchNorm,
                                   x: torch.Tensor) -> torch.Tensor:
    """The module's own forward with its affine parameters upcast to the running stats'
    dtype (fp32): a "mixed" batch norm (low-precision input, fp32 parameters and stats).

    The cast is differentiable, so the gradients still reach the low-precision parameters
    DeepSpeed reduces (and its fp32 masters). The swap goes through ``_parameters`` since a
    plain tensor cannot be assigned to a parameter's name; ``finally`` puts them back.
    """
    saved = {n: p for n, p in self._parameters.items() if n in ("weight", "bias") and p is not None}
    try:
        for n, p in saved.items():
            self._parameters[n] = p.to(self.running_mean.dtype)
        return type(self).forward(self, x)
    finally:
        self._parameters.update(saved)


def _batchnorm_in_mixed_precision(module: nn.Module) -> int:
    """Let every BatchNorm whose parameters DeepSpeed cast to bf16/fp16 run with its fp32
    running stats; returns how many modules were changed.

    DeepSpeed's bf16/fp16 mode casts parameters only and keeps buffers in their dtype on
    purpose (``_cast_module_mixed_precision``), so BN's running_mean/var stay fp32 beside
    bf16 weights: CUDA's batch norm accepts that mix, CPU's refuses it ("expected scalar type
    BFloat16 but found Float"). Casting the stats to bf16 instead would make them imprecise
    where they matter (eval, verification): with an 8-bit mantissa a momentum-0.1 update of
    a batch statistic within ~2-4% of the running value rounds away, so they stall off the
    true value. Whole fp32 BN modules are not possible: ZeRO flattens every parameter into
    its bf16 buffers. fp32 weight/bias with a bf16 input is torch's mixed batch norm (what
    autocast gives), supported and accumulated in fp32 on CPU and CUDA alike.
    """
    changed = 0
    for m in module.modules():
        if (isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
                and any(p is not None and p.dtype != m.running_mean.dtype
                        for p in (m.weight, m.bias))):
            m.forward = types.MethodType(_batchnorm_forward_fp32_affine, m)
            changed += 1
    return changed


class DeepSpeedEngine(Engine):
    """Wraps the model with ``deepspeed.initialize``; the trainer sees the usual interface.

    The DeepSpeed config is built (and a user JSON checked against the batch plan) in the
    constructor, so a contradiction stops the run before DeepSpeed is even imported.

    Args:
        denv: where this process sits in the job.
        device: the device this rank trains on.
        cfg: the run configuration (engine.*, train.precision, optim.grad_clip, batch.*).
        plan: the run's batch plan; DeepSpeed's batch fields are generated from it (the
            engine never redoes the batch arithmetic).
        precision: 'fp32', 'bf16' or 'fp16'; must equal cfg.train.precision (the DeepSpeed
            config is generated from ``cfg``).
        grad_clip: max global gradient norm, applied by DeepSpeed (0 = off); must equal
            cfg.optim.grad_clip.
    """

    name = "deepspeed"

    def __init__(self, denv: DistEnv, device: torch.device, cfg: Config, plan: BatchPlan,
                 precision: str = "fp32", grad_clip: float = 0.0) -> None:
        super().__init__(denv, device, precision=precision, grad_clip=grad_clip)
        if (precision, grad_clip) != (cfg.train.precision, cfg.optim.grad_clip):
            raise ValueError(f"precision={precision!r}, grad_clip={grad_clip} disagree with the "
                             f"config's {cfg.train.precision!r}, {cfg.optim.grad_clip}")
        if precision == "fp16" and device.type == "cpu":
            # DeepSpeed's CPU accelerator has no fp16 ("Type fp16 is not supported on your
            # device", raised only inside deepspeed.initialize).
            raise ConfigError("train.precision=fp16 with engine.name=deepspeed needs a GPU; "
                              "DeepSpeed on CPU supports bf16 or fp32")
        self.cfg = cfg
        if plan.world_size != denv.world_size:
            raise ValueError(f"the batch plan is for world_size {plan.world_size}, the launch "
                             f"has {denv.world_size}")
        self.plan = plan
        self.ds_config: dict[str, Any] = build_ds_config(cfg, self.plan)
        self.zero_stage: int = self.ds_config["zero_optimization"]["stage"]

    # ---- set-up ---------------------------------------------------------------------------
    def _ensure_process_group(self) -> None:
        """DeepSpeed needs a process group and LOCAL_RANK even for a single process."""
        # deepspeed's engine reads os.environ['LOCAL_RANK'], which srun and a bare process lack.
        os.environ.setdefault("LOCAL_RANK", str(self.denv.local_rank))
        if not torch_dist.is_initialized():
            if self.denv.is_distributed:
                raise RuntimeError("engine.name=deepspeed with several ranks needs the process "
                                   "group from largebatch.dist.init_process_group first")
            # A one-rank gloo group in memory: no port, no rendezvous, nothing to clean up.
            torch_dist.init_process_group("gloo", store=torch_dist.HashStore(), rank=0,
                                          world_size=1)

    def describe(self) -> str:
        """``deepspeed (ZeRO stage N)``: what the engine can measure depends on the stage."""
        return f"deepspeed (ZeRO stage {self.zero_stage})"

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        """``deepspeed.initialize`` with ``optimizer`` as the client optimizer.

        Afterwards ``self.model`` is DeepSpeed's engine (call it for the forward pass) and
        ``self.optimizer`` is the optimizer DeepSpeed steps: the client optimizer itself at
        ZeRO 0 / fp32, else DeepSpeed's wrapper, whose ``param_groups`` *are* the client's
        (the same list), so the schedule's LR writes reach the step either way.
        """
        import deepspeed  # slow to import: only when this engine is really used

        from largebatch.models import sync_batchnorm

        _skip_shm_comm_build(deepspeed)
        self._ensure_process_group()
        model = sync_batchnorm(model, self.device)  # model.sync_bn: before ZeRO sees it
        ds_engine, ds_optimizer, _, _ = deepspeed.initialize(
            model=model.to(self.device), optimizer=optimizer, config=self.ds_config,
            dist_init_required=False)
        _batchnorm_in_mixed_precision(ds_engine.module)  # after DeepSpeed's bf16/fp16 cast
        self.model = ds_engine
        self.optimizer = ds_optimizer
        return self.model

    # ---- the step -------------------------------------------------------------------------
    @contextlib.contextmanager
    def accumulate(self, is_boundary: bool) -> Iterator[None]:
        """Tell DeepSpeed whether this micro-batch ends the trainer's window.

        Set before the forward pass, since ZeRO reads the flag in its backward hooks: ZeRO 0/1
        all-reduce only on the boundary; ZeRO 2/3 reduce-scatter every micro-batch into their
        partitions and complete the accumulation on the boundary.
        """
        self.model.set_gradient_accumulation_boundary(is_boundary)
        yield

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of the already window-weighted loss (DeepSpeed must not divide it again)."""
        self.model.backward(loss, scale_wrt_gas=False)

    def step(self, compute_norm: bool = False) -> tuple[Optional[float], bool]:
        """DeepSpeed's step on the boundary: clip, step, zero grads; returns the grad norm.

        ZeRO 1-3 and DeepSpeed's bf16 optimizer measure the global (averaged, unscaled)
        gradient norm themselves in every step (``get_global_grad_norm``). At ZeRO 0 in fp32
        the client optimizer steps the module directly and DeepSpeed records no norm, even
        when it clips; there the module's gradients are already all-reduced after the
        boundary backward, so the norm is measured on them before the step (which may clip).
        None when DeepSpeed was told not to measure (``zero_optimization.compute_grad_norm``
        false in a user JSON) and no fallback applies, or when nothing asked for a norm. Not
        applied: DeepSpeed skipped the update itself (fp16 loss-scale overflow, or an inf/NaN
        norm it found), or (fp16) some rank's head shard overflowed; the sharded modules step
        exactly when the backbone does.
        """
        want = compute_norm or self.grad_clip > 0
        before = None
        # ZeRO 0, fp32: the module holds the global gradient, since DeepSpeed's (default)
        # managed accumulation all-reduces it in the boundary's backward, before step().
        if want and self._client_steps_module():
            before = total_grad_norm([p for p in self.model.module.parameters()
                                      if p.requires_grad])
        head_sq, head_inf = self._head_verdict(want)
        if head_inf:
            self._skip_for_head()
            return (math.inf if want else None), False
        # The trainer's last micro-batch set the boundary already; restating it keeps a step
        # after an empty window (never produced by the trainer) from silently being skipped.
        self.model.set_gradient_accumulation_boundary(True)
        self.model.step()
        applied = bool(self.model.was_step_applied())
        # largebatch steps the head, DeepSpeed never sees it: it follows DeepSpeed's verdict
        if applied:
            self.sharded.step()
        else:
            self.sharded.drop_window()
        if not want:
            return None, applied
        norm = self.model.get_global_grad_norm()
        norm = before if norm is None else float(norm)
        if norm is None or not self.sharded:
            return norm, applied
        return math.sqrt(norm ** 2 + head_sq), applied

    def _head_verdict(self, want: bool) -> tuple[float, bool]:
        """The sharded modules' share of the global norm and, under fp16, their inf/NaN flag.

        The share is the sum over ranks of their squared gradient norms (0.0 unless ``want``),
        taken before their own optimizers step (a collective: every rank, every step that
        wants it). fp16: DeepSpeed scaled the whole loss, the head's part included, but
        unscales only what it steps; the head's gradients are unscaled here by DeepSpeed's
        current scale, and their inf/NaN flag (per rank: the shards differ) rides in the same
        sum, so that every rank learns of any rank's overflow.

        Returns:
            The summed squared norm, and whether some rank's shard holds an inf/NaN.
        """
        reduce_sum = functools.partial(self.reduce_scalars, op="sum")
        if self.precision != "fp16" or not self.sharded:
            return (self.sharded.sq_norm(reduce_sum) if want else 0.0), False
        found = torch.zeros((), dtype=torch.float32, device=self.device)
        scale = float(self.optimizer.loss_scale)  # every DeepSpeed fp16 optimizer has it
        self.sharded.unscale_(torch.full((), 1.0 / scale, device=self.device), found)
        found_sum, head_sq = reduce_sum(
            [float(found), self.sharded.local_sq_norm() if want else 0.0])
        return head_sq, found_sum > 0

    def _skip_for_head(self) -> None:
        """Skip the step as DeepSpeed skips its own overflow: no update of the backbone or the
        head on any rank, the loss scale lowered once.

        DeepSpeed's overflow check sees only the backbone, so its step would apply; the window
        is dropped instead (``zero_grad``: DeepSpeed's step run and undone, its loss scaler
        restored), then the scale is lowered as DeepSpeed's overflow does. ZeRO 0's fp16
        optimizer keeps no restorable scaler: where the undone step lowered the scale itself
        (the backbone overflowed too), it is not lowered twice.
        """
        scale = float(self.optimizer.loss_scale)
        self.zero_grad()
        if float(self.optimizer.loss_scale) == scale:
            self.optimizer._update_scale(True)  # ZeRO 0-3 fp16 optimizers' overflow step

    def setup_sharded(self, module: nn.Module,
                      optimizer: Optional[torch.optim.Optimizer] = None) -> nn.Module:
        """As ``Engine.setup_sharded``; the module stays outside DeepSpeed (no ZeRO).

        Raises:
            ConfigError: with ``optim.grad_clip`` (DeepSpeed clips the backbone by its own
                norm inside its step; one coefficient over backbone + head is not available).
        """
        if self.grad_clip > 0 and optimizer is not None:
            raise ConfigError(f"optim.grad_clip={self.grad_clip} with engine.name=deepspeed and "
                              f"a sharded head is not supported (DeepSpeed clips the backbone "
                              f"by its own norm); use engine.name=ddp or optim.grad_clip=0")
        return super().setup_sharded(module, optimizer)

    # ---- state ----------------------------------------------------------------------------
    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """Full (unpartitioned) weights of the wrapped model, as CPU tensors.

        A collective at ZeRO 3 (every rank gathers each partitioned parameter), so every rank
        must call it; at ZeRO 0-2 every rank holds the full weights already.
        """
        module = self.unwrapped()
        if self.zero_stage < 3:
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}

    def _client_steps_module(self) -> bool:
        return ds_state.client_steps_module(self.zero_stage, self.precision)

    def counters(self) -> dict[str, int]:
        """DeepSpeed's own step/sample/skip counters."""
        return ds_state.counters(self.model)

    def local_state(self, to_cpu: bool = True) -> dict[str, Any]:
        """This rank's share of DeepSpeed's state (``ds_state.local_state``)."""
        return ds_state.local_state(self, to_cpu=to_cpu)

    def load_local_state(self, local: dict[str, Any]) -> None:
        """Restore ``local_state`` of this rank (``ds_state.load_local_state``).

        Raises:
            ConfigError: the saved layout is not this launch's.
        """
        ds_state.load_local_state(self, local)

    # ---- a dropped window (train.nonfinite=skip|stop) -------------------------------------
    def grads_finite(self) -> bool:
        """Whether this rank's share of the window's gradients is finite (no collective).

        ZeRO 1-3: this rank's gradient partitions (``ds_state.partition_grads_finite``); ZeRO
        0: the module's ``.grad``. fp16 is left to DeepSpeed's loss scaler, whose skip
        ``step`` reports.
        """
        if self.precision == "fp16":
            return True
        if self.zero_stage == 0:
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            return not grads or bool(torch.isfinite(
                torch.stack(torch._foreach_norm(grads, float("inf")))).all())
        return ds_state.partition_grads_finite(self)

    def zero_grad(self) -> None:
        """Drop the window's update on every rank (called by all ranks alike).

        Where DeepSpeed steps fp32 masters its gradient buffers clear only in its step, so
        ``ds_state.drop_window`` steps and restores this rank's state from a copy.
        """
        if not self._client_steps_module():
            ds_state.drop_window(self)
        self.optimizer.zero_grad(set_to_none=True)  # ZeRO 0 / fp32: the module's .grad
        self.sharded.drop_window()  # the sharded modules' own windows

    # ---- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Full model weights; the optimizer state here at ZeRO 0 / fp32, else in each rank's
        own half (``ds_state.replicated_state``). A collective at ZeRO 3."""
        return ds_state.replicated_state(self)

    def rank_state_dict(self) -> dict[str, Any]:
        """The sharded modules, and this rank's DeepSpeed partitions where DeepSpeed steps fp32
        masters (``ds_state.local_state``)."""
        local = None if self._client_steps_module() else ds_state.local_state(self)
        return {**super().rank_state_dict(), "deepspeed": local}

    def load_state_dict(self, state: dict[str, Any], rank_state: Optional[dict[str, Any]]
                        ) -> None:
        """Restore a resume at the same world size (exact).

        Raises:
            ConfigError: another ZeRO stage or partitioning.
        """
        ds_state.load_replicated(self, state, (rank_state or {}).get("deepspeed"))
        self.sharded.load_state_dict(rank_state, self.rank, self.world_size)

    def load_resharded(self, state: dict[str, Any],
                       rank_states: Sequence[Optional[dict[str, Any]]]) -> None:
        """Restore a set of another world size: only at ZeRO 0 / fp32.

        Raises:
            ConfigError: ZeRO >= 1 or bf16 (the partitions are cut per world size).
        """
        ds_state.check_reshardable(self, len(rank_states))
        ds_state.load_replicated(self, state, None)
        self.sharded.load_resharded(rank_states, self.rank, self.world_size)
