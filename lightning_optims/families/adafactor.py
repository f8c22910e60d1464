"""transformers' Adafactor on sharded parameters: each process steps its own part, with the numbers of the whole tensor.

Adafactor's statistics of a matrix: the row means of the squared gradient (a sum along its columns), its column means
(along its rows), the mean of the row statistics, the update's RMS and the parameter's RMS (sums over the whole
tensor). Each is completed over the mesh dimensions that shard the tensor dimensions it sums along
(:class:`~lightning_optims.placements.ShardSums`), batched over every parameter of the step: under FSDP2 and HSDP
(rows split) two all-reduces per optimizer step, of a few numbers per parameter and one vector per matrix (its
columns); under tensor parallelism the row-parallel weights (columns split) add a round for their row statistics.
No parameter, gradient or state tensor is gathered.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from typing import Any

import torch
from transformers.optimization import Adafactor

from lightning_optims.placements import Along, ShardSums, local, sharding, state_along

__all__ = ["ShardedAdafactor"]


class ShardedAdafactor(Adafactor):
    """``transformers.optimization.Adafactor`` (same arguments, same state keys) for ``DTensor`` parameters in any
    layout (FSDP2, HSDP, tensor parallel, both), plain tensors among them. Each process steps its part of each
    parameter; the row and column statistics and the RMS of the parameter and of the update are sums along a tensor
    dimension, completed over the mesh dimensions that shard it (:class:`~lightning_optims.placements.Along`), every
    parameter's at once. Its state tensors are ``DTensor`` s placed like the dimensions of the parameter they follow
    (the row statistics like its rows, the column statistics like its columns, the moments like the parameter),
    created with the optimizer, so Lightning's distributed checkpoint saves and restores them on any number of
    processes."""

    def __init__(self, params: Any, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self._ready = True
        for group in self.param_groups:
            for p in group["params"]:
                self._init_state(p, group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_ready"):  # (a group added during training: BaseFinetuning unfreezing a backbone)
            for p in self.param_groups[-1]["params"]:
                self._init_state(p, self.param_groups[-1])

    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        if state:
            return
        factored, use_first_moment = self._get_options(group, p.shape)
        if factored and p.dim() != 2:
            raise ValueError(f"ShardedAdafactor factors matrices; got a parameter of shape {tuple(p.shape)}")
        state["step"] = 0
        every = tuple(range(p.dim()))
        if use_first_moment:
            state["exp_avg"] = state_along(p, every)
        if factored:
            state["exp_avg_sq_row"] = state_along(p, (0,))
            state["exp_avg_sq_col"] = state_along(p, (1,))
        else:
            state["exp_avg_sq"] = state_along(p, every)
        state["RMS"] = torch.zeros((), device=local(p).device)  # (a tensor from the start, as after a step: the
        # distributed checkpoint shapes what it loads after the current state)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = closure() if closure is not None else None
        steps = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._init_state(p, group)
                    steps.append(self._step_param(p, group))
        ShardSums().lockstep(steps)
        return loss

    def _step_param(self, p: torch.Tensor, group: dict[str, Any]) -> Generator[list[Any], list[torch.Tensor], None]:
        """transformers' Adafactor step of one parameter on this process's part, yielding the sums it needs (the
        steps of every parameter run in lockstep: each round's sums in one all-reduce per mesh dimension). Rows
        split (FSDP2, HSDP, column-parallel weights): two rounds, the row statistics local; columns split too
        (row-parallel weights): one more, for the row statistics."""
        grad = local(p.grad)
        grad = grad.float() if grad.dtype in (torch.float16, torch.bfloat16) else grad
        state = self.state[p]
        factored, use_first_moment = self._get_options(group, p.shape)
        part = local(p)
        weights = part.float() if part.dtype in (torch.float16, torch.bfloat16) else part
        state["step"] += 1
        beta2t = 1.0 - math.pow(state["step"], group["decay_rate"])
        square = (grad**2) + group["eps"][0]
        rows, columns = p.shape[0], p.shape[-1]
        if factored:
            row = local(state["exp_avg_sq_row"])
            if sharding(p, (1,)):  # the rows' means need the other processes' columns first
                p_square, row_sum, col_sum = yield [
                    Along(weights.square().sum(), p),
                    Along(square.sum(dim=-1), p, (1,)),
                    Along(square.sum(dim=-2), p, (0,)),
                ]
                row.mul_(beta2t).add_(row_sum.div_(columns), alpha=(1.0 - beta2t))
                (row_total,) = yield [Along(row.sum(dim=-1, keepdim=True), p, (0,))]
            else:
                row.mul_(beta2t).add_(square.mean(dim=-1), alpha=(1.0 - beta2t))
                p_square, col_sum, row_total = yield [
                    Along(weights.square().sum(), p),
                    Along(square.sum(dim=-2), p, (0,)),
                    Along(row.sum(dim=-1, keepdim=True), p, (0,)),
                ]
            col = local(state["exp_avg_sq_col"])
            col.mul_(beta2t).add_(col_sum.div_(rows), alpha=(1.0 - beta2t))
            r_factor = (row / row_total.div_(rows)).rsqrt_().unsqueeze(-1)
            update = torch.mul(r_factor, col.unsqueeze(-2).rsqrt())
            update.mul_(grad)
        else:
            local(state["exp_avg_sq"]).mul_(beta2t).add_(square, alpha=(1.0 - beta2t))
            (p_square,) = yield [Along(weights.square().sum(), p)]
            update = local(state["exp_avg_sq"]).rsqrt().mul_(grad)
        state["RMS"] = p_square.sqrt() / (p.numel() ** 0.5)
        lr = self._get_lr(group, state)
        (u_square,) = yield [Along(update.square().sum(), p)]
        rms = u_square.sqrt() / (p.numel() ** 0.5)
        update.div_((rms / group["clip_threshold"]).clamp_(min=1.0))
        update.mul_(lr)
        if use_first_moment:
            exp_avg = local(state["exp_avg"])
            exp_avg.mul_(group["beta1"]).add_(update, alpha=(1 - group["beta1"]))
            update = exp_avg
        if group["weight_decay"] != 0:
            weights.add_(weights, alpha=(-group["weight_decay"] * lr))
        weights.add_(-update)
        if weights.data_ptr() != part.data_ptr():
            part.copy_(weights)
