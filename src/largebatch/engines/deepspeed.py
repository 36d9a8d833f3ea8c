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
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Iterator, Optional

import torch
import torch.distributed as torch_dist
from torch import nn

from largebatch.config import Config, ConfigError
from largebatch.dist import DistEnv
from largebatch.engines.base import Engine, total_grad_norm
from largebatch.engines.ds_config import build_ds_config
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
        # DeepSpeed scales fp16 losses itself; a second (torch) scaler would double-scale.
        self._scaler = torch.amp.GradScaler(device.type, enabled=False)
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
        if cfg.checkpoint.resume not in ("auto", "never") and not self._restorable():
            # Refuse now rather than on the requeued job, after hours of training.
            raise self._not_restorable_error()

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

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        """``deepspeed.initialize`` with ``optimizer`` as the client optimizer.

        Afterwards ``self.model`` is DeepSpeed's engine (call it for the forward pass) and
        ``self.optimizer`` is the optimizer DeepSpeed steps: the client optimizer itself at
        ZeRO 0 / fp32, else DeepSpeed's wrapper, whose ``param_groups`` *are* the client's
        (the same list), so the schedule's LR writes reach the step either way.
        """
        import deepspeed  # slow to import: only when this engine is really used

        _skip_shm_comm_build(deepspeed)
        self._ensure_process_group()
        ds_engine, ds_optimizer, _, _ = deepspeed.initialize(
            model=model.to(self.device), optimizer=optimizer, config=self.ds_config,
            dist_init_required=False)
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

    def step(self, compute_norm: bool = False) -> Optional[float]:
        """DeepSpeed's step on the boundary: clip, step, zero grads; returns the grad norm.

        ZeRO 1-3 and DeepSpeed's bf16 optimizer measure the global (averaged, unscaled)
        gradient norm themselves in every step (``get_global_grad_norm``). At ZeRO 0 in fp32
        the client optimizer steps the module directly and DeepSpeed records no norm, even
        when it clips; there the module's gradients are already all-reduced after the
        boundary backward, so the norm is measured on them before the step (which may clip).
        None when DeepSpeed was told not to measure (``zero_optimization.compute_grad_norm``
        false in a user JSON) and no fallback applies, or when nothing asked for a norm.
        """
        want = compute_norm or self.grad_clip > 0
        before = None
        # ZeRO 0, fp32: the module holds the global gradient, since DeepSpeed's (default)
        # managed accumulation all-reduces it in the boundary's backward, before step().
        if want and self._restorable():
            before = total_grad_norm([p for p in self.model.module.parameters()
                                      if p.requires_grad])
        # The sharded modules' (e.g. the Partial FC head's) share of the global norm, before
        # their own optimizers step (a collective: every rank, every step that wants it).
        head_sq = self.sharded_sq_norm() if want else 0.0
        # The trainer's last micro-batch set the boundary already; restating it keeps a step
        # after an empty window (never produced by the trainer) from silently being skipped.
        self.model.set_gradient_accumulation_boundary(True)
        self.model.step()
        self._step_sharded()  # largebatch steps the head, DeepSpeed never sees it
        if not want:
            return None
        norm = self.model.get_global_grad_norm()
        norm = before if norm is None else float(norm)
        if norm is None or not self.extra_modules:
            return norm
        return math.sqrt(norm ** 2 + head_sq)

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

    def _restorable(self) -> bool:
        # Only at ZeRO 0 in fp32 are the module's parameters the optimizer's own; elsewhere the
        # fp32 master copies and their optimizer state live in DeepSpeed's flat partitions.
        return self.zero_stage == 0 and self.precision == "fp32"

    def _not_restorable_error(self) -> ConfigError:
        return ConfigError(f"checkpoint.resume with engine.name=deepspeed needs "
                           f"engine.zero_stage=0 and train.precision=fp32 (got ZeRO "
                           f"{self.zero_stage}, {self.precision}: DeepSpeed keeps the fp32 "
                           f"master weights and optimizer state partitioned)")

    def state_dict(self) -> dict[str, Any]:
        """Full model weights, plus the optimizer state where ``load_state_dict`` can use it.

        The optimizer entry is the client optimizer's torch state at ZeRO 0 / fp32 and None
        otherwise: DeepSpeed's partitioned state pickles DeepSpeed classes (LossScaler,
        ZeroStageEnum) that a ``weights_only`` load refuses, and restoring it takes
        DeepSpeed's own checkpoint API. The model entry is always complete.
        """
        return {"model": self.model_state_dict(),
                "optimizer": self.optimizer.state_dict() if self._restorable() else None,
                "zero_stage": self.zero_stage,
                "rank": self.rank,
                "per_rank": self.sharded_state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict`` (a resume): supported at ZeRO 0 in fp32 only.

        There the module's parameters are the optimizer's. With ZeRO >= 1 or DeepSpeed's
        bf16/fp16 optimizers the fp32 master copies live in DeepSpeed's partitions, which a
        full rank-0 checkpoint does not capture.

        Raises:
            ConfigError: at ZeRO >= 1 or bf16/fp16 (also raised at construction when
                checkpoint.resume is set).
        """
        if not self._restorable():
            raise self._not_restorable_error()
        self.unwrapped().load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("per_rank_all") is not None:  # written at another world size
            self.load_resharded(state["per_rank_all"])
        else:
            self.load_sharded_state_dict(state.get("per_rank"))
