"""transformers' Adafactor on FSDP2's shards: each process steps its own rows, with the numbers of the whole tensor.

Adafactor's statistics of a matrix: the row means of the squared gradient (local: FSDP2 shards rows), its column
means (a sum over every row), the mean of the row statistics, the update's RMS and the parameter's RMS (sums over the
whole tensor). The sums are completed with :class:`~lightning_optims.placements.ShardSums`, batched over every
parameter of the step: two all-reduces per optimizer step, of a few numbers per parameter and one vector per matrix
(its columns), instead of an all-gather of each parameter, gradient and state tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from transformers.optimization import Adafactor

from lightning_optims.placements import ShardSums, local, state_like

__all__ = ["ShardedAdafactor"]


class ShardedAdafactor(Adafactor):
    """``transformers.optimization.Adafactor`` (same arguments, same state keys) for parameters that FSDP2 shards on
    dim 0 over one mesh dimension. Its state tensors are ``DTensor`` s on the parameter's mesh (the row statistics,
    first moment and unfactored second moment sharded like the parameter's rows, the column statistics replicated),
    created with the optimizer, so Lightning's distributed checkpoint saves and restores them on any number of
    processes."""

    def __init__(self, params: Any, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self._sums = ShardSums.over(self.param_groups)
        for group in self.param_groups:
            for p in group["params"]:
                self._init_state(p, group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_sums"):  # (a group added during training: BaseFinetuning unfreezing a backbone)
            group = self.param_groups[-1]
            self._sums = ShardSums.over(self.param_groups)
            for p in group["params"]:
                self._init_state(p, group)

    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        if state:
            return
        factored, use_first_moment = self._get_options(group, p.shape)
        if factored and p.dim() != 2:
            raise ValueError(f"ShardedAdafactor factors matrices; got a parameter of shape {tuple(p.shape)}")
        state["step"] = 0
        if use_first_moment:
            state["exp_avg"] = state_like(p, tuple(p.shape), sharded=True)
        if factored:
            state["exp_avg_sq_row"] = state_like(p, (p.shape[0],), sharded=True)
            state["exp_avg_sq_col"] = state_like(p, (p.shape[1],), sharded=False)
        else:
            state["exp_avg_sq"] = state_like(p, tuple(p.shape), sharded=True)
        state["RMS"] = torch.zeros((), device=local(p).device)  # (a tensor from the start, as after a step: the
        # distributed checkpoint shapes what it loads after the current state)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = closure() if closure is not None else None
        items = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                self._init_state(p, group)
                grad = local(p.grad)
                grad = grad.float() if grad.dtype in (torch.float16, torch.bfloat16) else grad
                state = self.state[p]
                factored, use_first_moment = self._get_options(group, p.shape)
                part = local(p)
                weights = part.float() if part.dtype in (torch.float16, torch.bfloat16) else part
                state["step"] += 1
                beta2t = 1.0 - math.pow(state["step"], group["decay_rate"])
                items.append((p, group, state, grad, weights, factored, use_first_moment, beta2t))

        # the first sums: each parameter's squared norm (its RMS), each matrix's column sums of the squared gradient
        # and the sum of its row statistics, after their local update
        parts: list[torch.Tensor] = []
        squares = []
        for _p, group, state, grad, weights, factored, _, beta2t in items:
            square = (grad**2) + group["eps"][0]
            squares.append(square)
            parts.append(weights.square().sum())
            if factored:
                row = local(state["exp_avg_sq_row"])
                row.mul_(beta2t).add_(square.mean(dim=-1), alpha=(1.0 - beta2t))
                parts += [square.sum(dim=-2), row.sum(dim=-1, keepdim=True)]
            else:
                local(state["exp_avg_sq"]).mul_(beta2t).add_(square, alpha=(1.0 - beta2t))
        summed = iter(self._sums.sums(parts))

        updates, lrs = [], []
        for (p, group, state, grad, _weights, factored, _, beta2t), _square in zip(items, squares):
            state["RMS"] = next(summed).sqrt() / (p.numel() ** 0.5)
            lrs.append(self._get_lr(group, state))
            if factored:
                rows = p.shape[0]
                col = local(state["exp_avg_sq_col"])
                col.mul_(beta2t).add_(next(summed).div_(rows), alpha=(1.0 - beta2t))
                row_mean = next(summed).div_(rows)
                r_factor = (local(state["exp_avg_sq_row"]) / row_mean).rsqrt_().unsqueeze(-1)
                update = torch.mul(r_factor, col.unsqueeze(-2).rsqrt())
                update.mul_(grad)
            else:
                update = local(state["exp_avg_sq"]).rsqrt().mul_(grad)
            updates.append(update)

        # the second sums: each update's squared norm (its RMS)
        update_norms = self._sums.sums([u.square().sum() for u in updates])
        for (p, group, state, _grad, weights, _, use_first_moment, _), update, lr, norm in zip(
            items, updates, lrs, update_norms
        ):
            rms = norm.sqrt() / (p.numel() ** 0.5)
            update.div_((rms / group["clip_threshold"]).clamp_(min=1.0))
            update.mul_(lr)
            if use_first_moment:
                exp_avg = local(state["exp_avg"])
                exp_avg.mul_(group["beta1"]).add_(update, alpha=(1 - group["beta1"]))
                update = exp_avg
            if group["weight_decay"] != 0:
                weights.add_(weights, alpha=(-group["weight_decay"] * lr))
            weights.add_(-update)
            part = local(p)
            if weights.data_ptr() != part.data_ptr():
                part.copy_(weights)
        return loss
