"""The head's own optimizers: SGD with momentum and AdamW that update only sampled rows.

Why the head owns its step: a generic optimizer sees one dense ``weight`` and moves every row
every step (momentum keeps pushing rows that had no gradient for thousands of steps, weight
decay shrinks them), which is what insightface's setup does. Here the gradient exists only for
the window's sampled rows (``PartialFC`` keeps them in a small leaf), and ``step`` gathers those
rows, their momentum (and AdamW moments and per-row step counts), applies torch's own update
formulas to them, and writes them back with ``index_copy_``: every other row and its state is
untouched, bit for bit. With ``sparse_update=False`` (or ``sample_rate=1``) the update is the
ordinary dense one over the whole shard, exactly torch's ``SGD``/``AdamW``.

Both are ``torch.optim.Optimizer`` subclasses over ``[head.weight]``: LR schedules set
``param_groups[0]["lr"]`` as usual, and ``step()`` is called at the same accumulation boundary
as the backbone's optimizer. Per-row AdamW step counts give each row the bias correction of
the number of times it was actually updated (a lazily updated row is not "step t").
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from largebatch.config import ConfigError


class _HeadOptimizer(torch.optim.Optimizer):
    """Shared machinery: find the window's rows, update them, write them back."""

    kind = ""
    row_keys: tuple[str, ...] = ()

    def __init__(self, head: Any, defaults: dict[str, Any]) -> None:
        super().__init__([head.weight], defaults)
        self.head = head
        head.optimizer = self
        if head._pending_optimizer_state is not None:  # the head was loaded first
            self.load_row_state(head._pending_optimizer_state)
            head._pending_optimizer_state = None

    def _state_rows(self) -> dict[str, torch.Tensor]:
        """The full-shard state tensors, created (zeros) on first use."""
        weight = self.head.weight
        state = self.state[weight]
        for key in self.row_keys:
            if key not in state:
                dtype = torch.int64 if key == "row_step" else weight.dtype
                shape = weight.shape[:1] if key == "row_step" else weight.shape
                state[key] = torch.zeros(shape, dtype=dtype, device=weight.device)
        return {k: state[k] for k in self.row_keys}

    def _update(self, weight: torch.Tensor, grad: torch.Tensor,
                state: dict[str, torch.Tensor], group: dict[str, Any]) -> None:
        """Apply one update to the sampled ``weight`` rows (each subclass's formula)."""
        raise NotImplementedError(f"{type(self).__name__} must define _update "
                                  f"(PartialFCSGD and PartialFCAdamW do)")

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Update the window's sampled rows (or every row when dense), then close the window."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index, grad = self.head.window_grad()
        if grad is not None:
            group, weight, state = self.param_groups[0], self.head.weight, self._state_rows()
            if index is None:
                self._update(weight, grad, state, group)
            elif self.head.sparse_update:
                rows = weight.index_select(0, index)
                sub = {k: v.index_select(0, index) for k, v in state.items()}
                self._update(rows, grad, sub, group)
                weight.index_copy_(0, index, rows)
                for key, value in sub.items():
                    state[key].index_copy_(0, index, value)
            else:  # dense: unsampled rows see a zero gradient, as with a generic optimizer
                full = torch.zeros_like(weight).index_copy_(0, index, grad)
                self._update(weight, full, state, group)
        self.head.end_window()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear ``weight.grad`` and the open window's sampled-row gradient."""
        super().zero_grad(set_to_none=set_to_none)
        self.head.zero_window_grad()

    def row_state(self) -> dict[str, Any]:
        """Hyper-parameters and full-shard state rows, as the head's state dict carries them.

        The rows are the live tensors (no copy, as ``state_dict`` does for parameters).
        """
        group = self.param_groups[0]
        state = self.state.get(self.head.weight, {})
        return {"kind": self.kind,
                "hparams": {k: v for k, v in group.items() if k != "params"},
                "rows": {k: state[k].detach() for k in self.row_keys if k in state}}

    def load_row_state(self, saved: dict[str, Any]) -> None:
        """Restore what ``row_state`` returned (same shard)."""
        if saved["kind"] != self.kind:
            raise ValueError(f"PartialFC optimizer: state is for {saved['kind']!r}, this is "
                             f"{self.kind!r}")
        self.param_groups[0].update(saved["hparams"])
        weight = self.head.weight
        for key, value in saved["rows"].items():
            if value.shape[0] != weight.shape[0]:
                raise ValueError(f"PartialFC optimizer: {key} has {value.shape[0]} rows, the "
                                 f"shard {weight.shape[0]}")
            dtype = value.dtype if key == "row_step" else weight.dtype
            self.state[weight][key] = value.to(device=weight.device, dtype=dtype).clone()


class PartialFCSGD(_HeadOptimizer):
    """SGD with momentum and L2 weight decay on the head's sampled rows (torch's formulas).

    Args:
        head: the ``PartialFC`` whose shard to update.
        lr: learning rate.
        momentum: momentum factor (a row's buffer starts at its first gradient, as in torch).
        weight_decay: L2 penalty added to the gradient.
        nesterov: Nesterov momentum.
    """

    kind = "sgd"

    def __init__(self, head: Any, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 nesterov: bool = False) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or (nesterov and momentum == 0):
            raise ConfigError(f"face.optim: lr={lr}, momentum={momentum}, weight_decay="
                              f"{weight_decay} must be >= 0 (nesterov needs momentum > 0)")
        self.row_keys = ("momentum_buffer",) if momentum > 0 else ()
        super().__init__(head, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                    nesterov=nesterov))

    def _update(self, weight, grad, state, group):
        step = grad.add(weight, alpha=group["weight_decay"]) if group["weight_decay"] else grad
        if "momentum_buffer" in state:
            buf = state["momentum_buffer"]
            # zeros * momentum + g == g exactly: a row's first update equals torch's clone(g)
            buf.mul_(group["momentum"]).add_(step)
            step = step.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
        weight.add_(step, alpha=-group["lr"])


class PartialFCAdamW(_HeadOptimizer):
    """AdamW (decoupled decay) on the head's sampled rows, with per-row step counts.

    Args:
        head: the ``PartialFC`` whose shard to update.
        lr: learning rate.
        betas: moment decay rates.
        eps: denominator term.
        weight_decay: decoupled decay, ``w *= 1 - lr * weight_decay``.
    """

    kind = "adamw"
    row_keys = ("exp_avg", "exp_avg_sq", "row_step")

    def __init__(self, head: Any, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01) -> None:
        if lr < 0 or eps <= 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ConfigError(f"face.optim: lr={lr}, betas={betas}, eps={eps}, "
                              f"weight_decay={weight_decay} out of range")
        super().__init__(head, dict(lr=lr, betas=tuple(betas), eps=eps,
                                    weight_decay=weight_decay))

    def _update(self, weight, grad, state, group):
        beta1, beta2 = group["betas"]
        lr, m, v, steps = group["lr"], state["exp_avg"], state["exp_avg_sq"], state["row_step"]
        steps.add_(1)
        weight.mul_(1.0 - lr * group["weight_decay"])
        m.lerp_(grad, 1.0 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        t = steps.to(torch.float64)[:, None]
        step_size = (lr / (1.0 - beta1 ** t)).to(weight.dtype)
        bc2_sqrt = torch.sqrt(1.0 - beta2 ** t).to(weight.dtype)
        denom = (v.sqrt() / bc2_sqrt).add_(group["eps"])
        weight.sub_(step_size * m / denom)
