"""The fused-backward engine: LOMO and AdaLomo, updating each parameter as its gradient arrives.

One ``register_post_accumulate_grad_hook`` per parameter updates that parameter and frees its gradient, so no
full set of gradients ever exists. The update rules are those of ``lomo_optim`` 0.1.1 (same numbers on the same
inputs), without its faults: its hook scans every parameter each time any gradient arrives (O(P^2) per step),
AdaLomo allocates its state with ``.cuda()``, its state lives outside ``state_dict()``, and under DDP each
process updated with its own local gradient. Here:

- the optimizers are real ``torch.optim.Optimizer`` objects: the learning rate of ``param_groups`` (what a
  scheduler sets) is the one applied, and ``state_dict()`` carries AdaLomo's second moments and step count;
- state lives on the parameter's device (CPU, CUDA, anything);
- under ``torch.distributed`` each gradient is averaged across processes in its hook, before the update;
- a non-finite gradient never reaches the weights: its elements are left unchanged and, at the end of that
  backward, :class:`NonFiniteGradientError` names the step (with a loss scaler, the step is skipped instead).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["AdaLomo", "InBackwardOptimizer", "Lomo", "NonFiniteGradientError"]


class NonFiniteGradientError(FloatingPointError):
    """A gradient had inf / NaN entries; the affected elements were not updated."""


class InBackwardOptimizer(torch.optim.Optimizer):
    """Base class: :meth:`fused_backward` runs backward and updates each parameter in its gradient hook.

    Subclasses implement :meth:`_update` (one parameter, its fp32 gradient, its group). ``step(closure)`` runs the
    closure (which is expected to call :meth:`fused_backward`, as Lightning's ``manual_backward`` does through the
    module's ``backward`` hook), so Lightning's step counters and callbacks work as for any optimizer.
    """

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], clip_grad_norm: float | None = None) -> None:
        super().__init__(params, defaults)
        if clip_grad_norm is not None and clip_grad_norm <= 0:
            raise ValueError(f"clip_grad_norm should be positive, got {clip_grad_norm}")
        self.clip_grad_norm = clip_grad_norm
        self.clip_coef: torch.Tensor | None = None
        self.steps_taken = 0  # fused backwards run, for error messages
        self._active = False
        self._norm_pass = False
        self._norms: list[torch.Tensor] = []
        self._bad: torch.Tensor | None = None
        # group *indices*: load_state_dict replaces the group dicts, and the lr a scheduler sets is in the new ones
        self._group_index = {p: i for i, g in enumerate(self.param_groups) for p in g["params"]}
        self._handles = [
            p.register_post_accumulate_grad_hook(self._hook)
            for g in self.param_groups for p in g["params"] if p.requires_grad
        ]

    # -- hooks ----------------------------------------------------------------------------------------------------

    def remove_hooks(self) -> None:
        """Detach the gradient hooks (the module can then be trained with another optimizer, pickled, reused)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def has_hooks(self) -> bool:
        return bool(self._handles)

    def _hook(self, p: torch.Tensor) -> None:
        if not self._active or p.grad is None:
            return  # outside fused_backward gradients accumulate as usual
        grad = p.grad
        p.grad = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)  # gloo has no AVG
            grad.div_(dist.get_world_size())
        grad_fp32 = grad.to(torch.float32)
        scale = self._grad_scale()
        if scale != 1.0:
            grad_fp32.div_(scale)
        if self._norm_pass:
            self._norms.append(torch.norm(grad_fp32, 2.0))
            return
        finite = torch.isfinite(grad_fp32)
        bad = ~finite.all()
        self._bad = bad if self._bad is None else self._bad | bad
        grad_fp32 = torch.where(finite, grad_fp32, 0.0)
        with torch.no_grad():
            self._update(p, grad_fp32, self.param_groups[self._group_index[p]])

    # -- the step -------------------------------------------------------------------------------------------------

    def _grad_scale(self) -> float:
        """The factor the loss was multiplied by (its gradients are divided by it)."""
        return 1.0

    def _before_backward(self) -> None:
        """Per-step bookkeeping before the gradients arrive (AdaLomo's step count)."""

    def fused_backward(self, loss: torch.Tensor, lr: float | None = None) -> None:
        """Backward through ``loss``, updating each parameter when its gradient is ready.

        ``lr`` (optional, for ``lomo_optim`` compatibility) overrides every group's learning rate; otherwise the
        groups' ``lr`` (what a scheduler set) is applied. With ``clip_grad_norm`` a first backward pass computes the
        global gradient norm (LOMO's two-pass clipping), which needs ``retain_graph``.
        """
        if lr is not None:
            for group in self.param_groups:
                group["lr"] = lr
        self.steps_taken += 1
        self._before_backward()
        scaled = loss * self._grad_scale() if self._grad_scale() != 1.0 else loss
        self.clip_coef = None
        self._active = True
        try:
            if self.clip_grad_norm is not None:
                self._norm_pass, self._norms = True, []
                scaled.backward(retain_graph=True)
                self._norm_pass = False
                total = torch.norm(torch.stack(self._norms), 2.0) if self._norms else torch.tensor(0.0)
                self._norms = []
                if not torch.isfinite(total):
                    self._on_non_finite_norm(total)
                    return
                self.clip_coef = torch.clamp(float(self.clip_grad_norm) / (total + 1e-6), max=1.0)
            self._bad = None
            scaled.backward()
        finally:
            self._active = self._norm_pass = False
        if self._bad is not None and bool(self._bad):
            self._bad = None
            raise NonFiniteGradientError(
                f"non-finite gradient at fused step {self.steps_taken} of {type(self).__name__}: the affected "
                "elements were left unchanged and training stops here (lower the learning rate, check the data, or "
                "enable clipping with max_grad_norm)"
            )

    def _on_non_finite_norm(self, total: torch.Tensor) -> None:
        raise NonFiniteGradientError(
            f"non-finite gradient norm ({total.item()}) at fused step {self.steps_taken} of "
            f"{type(self).__name__}: no parameter was updated and training stops here"
        )

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Run ``closure`` (forward + :meth:`fused_backward`); the updates happen inside it."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def zero_grad(self, set_to_none: bool = True) -> None:
        # gradients are consumed in the hooks; clear any that accumulated outside fused_backward
        super().zero_grad(set_to_none=True)

    def _update(self, p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> None:
        raise NotImplementedError


def _clip_and_scale(grad: torch.Tensor, group: dict[str, Any], clip_coef: torch.Tensor | None) -> None:
    value = group["clip_grad_value"]
    if value is not None and value > 0:
        grad.clamp_(min=-value, max=value)
    if clip_coef is not None:
        grad.mul_(clip_coef)


class Lomo(InBackwardOptimizer):
    """LOMO: SGD fused into backward (``lomo_optim.Lomo``'s update rule, fp32 arithmetic)."""

    def __init__(self, model_or_params: nn.Module | Iterable[Any], lr: float = 1e-3, clip_grad_norm: float | None = None,
                 clip_grad_value: float | None = None, weight_decay: float = 0.0) -> None:
        params = model_or_params.parameters() if isinstance(model_or_params, nn.Module) else model_or_params
        defaults = dict(lr=lr, clip_grad_value=clip_grad_value, weight_decay=weight_decay)
        super().__init__(params, defaults, clip_grad_norm=clip_grad_norm)

    def _update(self, p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> None:
        _clip_and_scale(grad, group, self.clip_coef)
        lr, wd = group["lr"], group["weight_decay"]
        p_fp32 = p.detach().to(torch.float32)
        if wd > 0.0:
            p_fp32.mul_(1.0 - lr * wd)
        p_fp32.add_(grad, alpha=-lr)
        if p_fp32.data_ptr() != p.data_ptr():
            p.detach().copy_(p_fp32)


class AdaLomo(InBackwardOptimizer):
    """AdaLomo: factored second moments (Adafactor-like) fused into backward (``lomo_optim.AdaLomo``'s rule).

    State per parameter (``exp_avg_sq_row`` / ``exp_avg_sq_col`` for matrices, ``exp_avg_sq`` otherwise) lives in
    ``self.state`` on the parameter's device; the step count is the group's ``step``.
    """

    def __init__(self, model_or_params: nn.Module | Iterable[Any], lr: float = 1e-3, loss_scale: float = 2**10,
                 eps: tuple[float, float] = (1e-30, 1e-3), clip_threshold: float = 1.0, decay_rate: float = -0.8,
                 clip_grad_norm: float | None = None, clip_grad_value: float | None = None,
                 weight_decay: float = 0.0) -> None:
        params = model_or_params.parameters() if isinstance(model_or_params, nn.Module) else model_or_params
        defaults = dict(lr=lr, eps=tuple(eps), clip_threshold=clip_threshold, decay_rate=decay_rate,
                        clip_grad_value=clip_grad_value, weight_decay=weight_decay, step=0)
        self.loss_scale = loss_scale
        super().__init__(params, defaults, clip_grad_norm=clip_grad_norm)

    def _grad_scale(self) -> float:
        return float(self.loss_scale) if self.loss_scale else 1.0

    def _before_backward(self) -> None:
        for group in self.param_groups:
            group["step"] += 1

    def _update(self, p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> None:
        _clip_and_scale(grad, group, self.clip_coef)
        step, decay_rate = group["step"], group["decay_rate"]
        if step == 0 and decay_rate < 0:  # as upstream (never true there either: the count is incremented first)
            decay_rate = -decay_rate
        beta2t = 1.0 - math.pow(step, decay_rate)
        eps_sq, eps_scale = group["eps"]
        update = (grad**2) + eps_sq
        state = self.state[p]
        if p.dim() > 1:
            if "exp_avg_sq_row" not in state:
                state["exp_avg_sq_row"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
                state["exp_avg_sq_col"] = torch.zeros(p.shape[1], dtype=torch.float32, device=p.device)
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(beta2t).add_(update.mean(dim=-1), alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(update.mean(dim=-2), alpha=1.0 - beta2t)
            r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
            c_factor = col.unsqueeze(-2).rsqrt()
            update = torch.mul(r_factor, c_factor)
            update.mul_(grad)
        else:
            if "exp_avg_sq" not in state:
                state["exp_avg_sq"] = torch.zeros(p.shape[0] if p.dim() else 1, dtype=torch.float32, device=p.device)
            sq = state["exp_avg_sq"]
            sq.mul_(beta2t).add_(update, alpha=1.0 - beta2t)
            update = sq.rsqrt().mul_(grad)
        update.div_((update.norm(2) / (update.numel() ** 0.5) / group["clip_threshold"]).clamp_(min=1.0))
        p_fp32 = p.detach().to(torch.float32)
        p_rms = torch.norm(p_fp32, 2.0) / math.sqrt(p.numel())
        lr = group["lr"] * max(eps_scale, p_rms)
        if group["weight_decay"] > 0.0:
            p_fp32.mul_(1.0 - lr * group["weight_decay"])
        p_fp32.add_(update, alpha=-lr)
        if p_fp32.data_ptr() != p.data_ptr():
            p.detach().copy_(p_fp32)
