"""transformers' Adafactor (``adafactor``), and its step on sharded parameters: each process steps its own part, with
the numbers of the whole tensor.

Adafactor's statistics of a matrix: the row means of the squared gradient (a sum along its columns), its column means
(along its rows), the mean of the row statistics, the update's RMS and the parameter's RMS (sums over the whole
tensor). Each is completed over the mesh dimensions that shard the tensor dimensions it sums along
(:class:`~lightning_optims.distributed.sums.ShardSums`), batched over every parameter of the step: under FSDP2 and HSDP
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

from lightning_optims.distributed.placements import local, sharding, state_along
from lightning_optims.distributed.sums import Along, ShardSums
from lightning_optims.spec import WEIGHT_DECAY, OptimizerSpec, Sharding

__all__ = ["SPECS", "ShardedAdafactor", "adafactor_update", "apply_adafactor", "fp32"]


class ShardedAdafactor(Adafactor):
    """``transformers.optimization.Adafactor`` (same arguments, same state keys) for ``DTensor`` parameters in any
    layout (FSDP2, HSDP, tensor parallel, both), plain tensors among them. Each process steps its part of each
    parameter; the row and column statistics and the RMS of the parameter and of the update are sums along a tensor
    dimension, completed over the mesh dimensions that shard it (:class:`~lightning_optims.distributed.sums.Along`),
    every parameter's at once. Its state tensors are ``DTensor`` s placed like the dimensions of the parameter they
    follow (the row statistics like its rows, the column statistics like its columns, the moments like the parameter),
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
        steps of every parameter run in lockstep: each round's sums in one all-reduce per mesh dimension)."""
        part, grad = local(p), fp32(local(p.grad))
        weights = fp32(part)
        every = {d: d for d in range(p.dim())}
        update, lr = yield from adafactor_update(self, grad, tuple(p.shape), every, p, weights, self.state[p], group)
        apply_adafactor(weights, part, update, lr, group)


def fp32(tensor: torch.Tensor) -> torch.Tensor:
    """Adafactor computes in fp32: a half-precision tensor's fp32 copy, else the tensor itself."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def apply_adafactor(
    weights: torch.Tensor, part: torch.Tensor, update: torch.Tensor, lr: float, group: dict[str, Any]
) -> None:
    """Adafactor's end of a step on this process's part: weight decay, the update subtracted, the fp32 copy (if
    one) written back to the parameter's part."""
    if group["weight_decay"] != 0:
        weights.add_(weights, alpha=(-group["weight_decay"] * lr))
    weights.add_(-update)
    if weights.data_ptr() != part.data_ptr():
        part.copy_(weights)


def adafactor_update(
    optimizer: Any,
    grad: torch.Tensor,
    shape: tuple[int, ...],
    follows: dict[int, int],
    p: torch.Tensor,
    weights: torch.Tensor,
    state: dict[str, Any],
    group: dict[str, Any],
) -> Generator[list[Any], list[torch.Tensor], tuple[torch.Tensor, float]]:
    """transformers' (and GaLore's) Adafactor update of ``grad``: this process's part of a tensor of the whole
    ``shape`` whose dimension ``i`` lies along ``p``'s dimension ``follows[i]`` (split as ``p`` splits it; a dimension
    not in ``follows`` is whole on every process). That tensor is ``p``'s gradient (``follows`` the identity) or
    GaLore's projection of it (``G @ P.T`` follows ``p``'s rows, ``P.T @ G`` its columns). Yields the sums it needs
    (:class:`~lightning_optims.distributed.sums.Along` ``p``): rows split, two rounds, the row statistics local; columns
    split, two rounds too, a third for the row statistics' mean where the rows are split as well. Returns the update
    (divided by its clipped RMS, times the learning rate, through the first moment) and the learning rate; the
    caller applies weight decay and subtracts the update. ``weights`` is this process's part of ``p`` in fp32, whose
    RMS the state keeps. The state's tensors are local parts (created here the first time, as upstream creates them
    at the first step); none is written before the first round."""

    def along(*dims: int) -> tuple[int, ...]:  # the dimensions of p that a sum along these dimensions of grad spans
        return tuple(follows[d] for d in dims if d in follows)

    factored, use_first_moment = optimizer._get_options(group, shape)
    if "RMS" not in state:
        state["step"] = 0
        if use_first_moment:
            state["exp_avg"] = torch.zeros_like(grad)
        if factored:
            state["exp_avg_sq_row"] = torch.zeros(grad.shape[:-1]).to(grad)
            state["exp_avg_sq_col"] = torch.zeros(grad.shape[:-2] + grad.shape[-1:]).to(grad)
        else:
            state["exp_avg_sq"] = torch.zeros_like(grad)
        state["RMS"] = 0
    # (nothing of the state is written before the first round: a flag summed with it may stop the step there)
    step = state["step"] + 1
    beta2t = 1.0 - math.pow(step, group["decay_rate"])
    square = (grad**2) + group["eps"][0]
    last, before = grad.dim() - 1, grad.dim() - 2
    if factored:
        rows, columns = shape[-2], shape[-1]
        row = local(state["exp_avg_sq_row"])
        if sharding(p, along(last)):  # the rows' means need the other processes' columns first
            p_square, row_sum, col_sum = yield [
                Along(weights.square().sum(), p),
                Along(square.sum(dim=-1), p, along(last)),
                Along(square.sum(dim=-2), p, along(before)),
            ]
            state["step"] = step
            row.mul_(beta2t).add_(row_sum.div_(columns), alpha=(1.0 - beta2t))
            if sharding(p, along(before)):
                (row_total,) = yield [Along(row.sum(dim=-1, keepdim=True), p, along(before))]
            else:  # (the rows are whole here: no round of sums for them)
                row_total = row.sum(dim=-1, keepdim=True)
        else:
            new_row = row.mul(beta2t).add_(square.mean(dim=-1), alpha=(1.0 - beta2t))
            p_square, col_sum, row_total = yield [
                Along(weights.square().sum(), p),
                Along(square.sum(dim=-2), p, along(before)),
                Along(new_row.sum(dim=-1, keepdim=True), p, along(before)),
            ]
            state["step"] = step
            row.copy_(new_row)
        col = local(state["exp_avg_sq_col"])
        col.mul_(beta2t).add_(col_sum.div_(rows), alpha=(1.0 - beta2t))
        r_factor = (row / row_total.div_(rows)).rsqrt_().unsqueeze(-1)
        update = torch.mul(r_factor, col.unsqueeze(-2).rsqrt())
        update.mul_(grad)
    else:
        (p_square,) = yield [Along(weights.square().sum(), p)]
        state["step"] = step
        local(state["exp_avg_sq"]).mul_(beta2t).add_(square, alpha=(1.0 - beta2t))
        update = local(state["exp_avg_sq"]).rsqrt().mul_(grad)
    state["RMS"] = p_square.sqrt() / (p.numel() ** 0.5)
    lr = optimizer._get_lr(group, state)
    (u_square,) = yield [Along(update.square().sum(), p, along(*range(grad.dim())))]
    rms = u_square.sqrt() / (math.prod(shape) ** 0.5)
    update.div_((rms / group["clip_threshold"]).clamp_(min=1.0))
    update.mul_(lr)
    if use_first_moment:
        exp_avg = local(state["exp_avg"])
        exp_avg.mul_(group["beta1"]).add_(update, alpha=(1 - group["beta1"]))
        update = exp_avg
    return update, lr


SPECS = [
    OptimizerSpec(
        name="adafactor",
        target="transformers.optimization:Adafactor",
        family="torch",
        sharding=Sharding("optimizer", optimizer="lightning_optims.families.adafactor:ShardedAdafactor"),
        kwargs=lambda ctx: {"scale_parameter": False, "relative_step": False},
        uses=WEIGHT_DECAY,
        description="transformers.optimization.Adafactor with relative_step=False, scale_parameter=False",
    )
]
