"""LOMO and AdaLomo (the update rules of lomo-optim): ``lomo``, ``adalomo``.

Parameters are updated inside the backward pass, by the in-backward engine
(:class:`~lightning_optims.engines.in_backward.InBackwardOptimizer`): :class:`Lomo` and :class:`AdaLomo` implement
its bucket update with the same numbers as ``lomo_optim`` 0.1.1 on the same inputs, without its faults (O(P^2) hooks,
``.cuda()`` state, state outside ``state_dict()``, no gradient reduction under DDP). transformers builds
``lomo_optim.Lomo`` / ``AdaLomo`` from the model and the learning rate only; here ``max_grad_norm`` becomes LOMO's
two-pass global-norm clipping (in transformers' Trainer it clips after the update, when no gradient is left, i.e.
never), and the optimizers' own options are ``optim_args`` keys (defaults: lomo_optim's). Under FSDP2, HSDP and
tensor parallelism each process updates its part, AdaLomo's row / column statistics and RMS completed over the
placements.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import nn

from lightning_optims.compat import (
    foreach_add_,
    foreach_div_,
    foreach_mul,
    foreach_mul_,
    foreach_norm,
    foreach_rsqrt,
    foreach_sub_,
)
from lightning_optims.distributed.placements import local, state_along, state_replicated
from lightning_optims.distributed.sums import Along
from lightning_optims.engines.in_backward import DEFAULT_BUCKET_BYTES, InBackwardOptimizer, trainable
from lightning_optims.errors import NonFiniteGradientError
from lightning_optims.optim_args import Arg, OptimizerSettingError
from lightning_optims.spec import BuildContext, OptimizerSpec, Sharding

__all__ = ["SPECS", "AdaLomo", "DynamicLossScaler", "Lomo"]

_COMMON = (
    Arg("weight_decay", float, 0.0, help="decoupled weight decay, applied to every parameter (as lomo_optim)"),
    Arg("clip_grad_value", float, None, help="clamp each gradient element to [-v, v]"),
    Arg("bucket_mb", float, 8.0, help="gradients are applied and freed in buckets of this size; 0: one by one"),
)
_LOMO = (
    Arg("init_loss_scale", float, 2.0**32, help="fp16 (16-true) only: the first dynamic loss scale (lomo_optim's)"),
    Arg(
        "scale_window",
        int,
        1000,
        help="fp16 (16-true) only: the loss scale doubles after this many steps without overflow",
    ),
)
_ADALOMO = (
    Arg("loss_scale", float, 2.0**10, help="the loss is multiplied by this, the gradients divided by it"),
    Arg("clip_threshold", float, 1.0),
    Arg("decay_rate", float, -0.8),
    Arg("eps_sq", float, 1e-30, help="added to squared gradients (lomo_optim eps[0])"),
    Arg("eps_scale", float, 1e-3, help="lower bound of the parameter-RMS lr scale (lomo_optim eps[1])"),
)


def _kwargs(ctx: BuildContext) -> dict:
    kwargs = dict(ctx.optim_args)
    if "eps_sq" in kwargs:
        kwargs["eps"] = (kwargs.pop("eps_sq"), kwargs.pop("eps_scale"))
    bucket_mb = kwargs.pop("bucket_mb")
    if bucket_mb < 0:
        raise OptimizerSettingError(f"optim_args: bucket_mb={bucket_mb!r} for {ctx.args.optim}: expected a number >= 0")
    kwargs["bucket_bytes"] = int(bucket_mb * 2**20)
    if kwargs.get("scale_window", 1) < 1:
        raise OptimizerSettingError(
            f"optim_args: scale_window={kwargs['scale_window']!r} for {ctx.args.optim}: expected an integer >= 1"
        )
    kwargs["clip_grad_norm"] = ctx.args.max_grad_norm if ctx.args.max_grad_norm > 0 else None
    return kwargs


SPECS = [
    OptimizerSpec(
        name=name,
        target=f"lightning_optims.families.lomo:{cls}",
        family="lomo",
        params="model",
        arguments=arguments,
        kwargs=_kwargs,
        updates_in_backward=True,
        sharding=Sharding("in_backward"),
        callbacks=("lightning_optims.callbacks.hooks:GradientHookCleanup",),
        description=f"{cls} (fused backward; lomo_optim's update rule)",
    )
    for name, cls, arguments in (("lomo", "Lomo", _COMMON + _LOMO), ("adalomo", "AdaLomo", _COMMON + _ADALOMO))
]


class DynamicLossScaler:
    """LOMO's dynamic loss scale for fp16 weights or losses: the loss is multiplied by :attr:`scale` and the gradients
    divided by it; an overflowed step (a non-finite gradient norm, seen by the norm pass before anything is written) is
    skipped with a warning while the scale halves (:meth:`overflowed`), and after ``scale_window`` steps without
    overflow the scale doubles (:meth:`stepped`; lomo_optim's scale only ever shrinks). An object with its own
    ``state_dict`` / ``load_state_dict``, as torch's ``GradScaler``; :class:`Lomo` saves that state in its first param
    group (``loss_scaler``), so every checkpoint path (torch's ``state_dict``, Lightning's distributed checkpoint)
    carries it, and a resume restores it."""

    def __init__(self, init_scale: float = 2.0**32, scale_window: int = 1000) -> None:
        self.scale = float(init_scale)
        self.scale_window = int(scale_window)
        self.iter = 0  # steps taken or skipped
        self.last_overflow = -1  # the iter of the last overflow
        self.skipped = 0  # steps skipped for an overflow

    def overflowed(self, step: int) -> None:
        """An overflow at fused step ``step``: halve the scale (the step is skipped), or stop at a scale of 1."""
        if self.scale <= 1.0:
            raise NonFiniteGradientError(
                f"gradient overflow at fused step {step} with the loss scale already at 1: fp16 cannot represent "
                "these gradients; training stops here"
            )
        warnings.warn(
            f"[LOMO] gradient overflow at fused step {step}: step skipped, loss scale {self.scale:g} -> "
            f"{self.scale / 2:g}",
            UserWarning,
            stacklevel=3,
        )
        self.scale /= 2.0
        self.last_overflow = self.iter
        self.iter += 1
        self.skipped += 1

    def stepped(self) -> None:
        """A step without overflow: the scale doubles every ``scale_window`` of them since the last overflow."""
        self.iter += 1
        if (self.iter - self.last_overflow) % self.scale_window == 0:
            self.scale *= 2.0

    def state_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "scale_window": self.scale_window,
            "iter": self.iter,
            "last_overflow": self.last_overflow,
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = float(state["scale"])
        self.scale_window = int(state.get("scale_window", self.scale_window))
        self.iter, self.last_overflow = int(state["iter"]), int(state["last_overflow"])
        self.skipped = int(state.get("skipped", 0))


class Lomo(InBackwardOptimizer):
    """LOMO: SGD fused into backward (``lomo_optim.Lomo``'s update rule, fp32 arithmetic).

    With fp16 weights (``precision="16-true"``) or an fp16 loss it switches on LOMO's dynamic loss scaling, as
    lomo_optim does for an fp16 loss: the loss is multiplied by the scale, the gradients divided by it, the two-pass
    norm is forced on (clip at 1.0 when no ``clip_grad_norm`` was set) so that an overflow is seen before anything
    is written, and an overflowed step is skipped with a warning while the scale halves. Unlike lomo_optim, whose
    scale only ever shrinks, the scale grows back after ``scale_window`` steps without overflow: a
    :class:`DynamicLossScaler` (:attr:`loss_scaler`), whose state the optimizer's ``state_dict`` carries.
    """

    def __init__(
        self,
        model_or_params: nn.Module | Iterable[Any],
        lr: float = 1e-3,
        clip_grad_norm: float | None = None,
        clip_grad_value: float | None = None,
        weight_decay: float = 0.0,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        init_loss_scale: float = 2.0**32,
        scale_window: int = 1000,
    ) -> None:
        params = trainable(model_or_params)
        defaults = dict(lr=lr, clip_grad_value=clip_grad_value, weight_decay=weight_decay)
        super().__init__(params, defaults, clip_grad_norm=clip_grad_norm, bucket_bytes=bucket_bytes)
        self.init_loss_scale, self.scale_window = float(init_loss_scale), int(scale_window)

    # -- fp16: dynamic loss scaling -------------------------------------------------------------------------------

    #: the fp16 loss scaler, switched on by the first fp16 loss or fp16 weights (None before, and without fp16)
    loss_scaler: DynamicLossScaler | None = None

    def _grad_scale(self) -> float:
        return self.loss_scaler.scale if self.loss_scaler is not None else 1.0

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.loss_scaler is not None:  # (in a param group: Lightning's distributed checkpoint keeps only those)
            state["param_groups"][0]["loss_scaler"] = self.loss_scaler.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        saved = self.param_groups[0].pop("loss_scaler", None)
        self.loss_scaler = None  # (a checkpoint of steps without fp16: the first fp16 backward starts one)
        if saved is not None:
            self.loss_scaler = DynamicLossScaler(self.init_loss_scale, self.scale_window)
            self.loss_scaler.load_state_dict(saved)

    def fused_backward(self, loss: torch.Tensor, lr: float | None = None) -> None:
        # lomo_optim switches on when the loss is fp16; a transformers model computes its loss in fp32 from fp16
        # weights (the logits are upcast), and the gradients are fp16 all the same: look at the parameters too
        if self.loss_scaler is None and (
            loss.dtype == torch.float16
            or any(p.dtype == torch.float16 for g in self.param_groups for p in g["params"] if p.requires_grad)
        ):
            self.loss_scaler = DynamicLossScaler(self.init_loss_scale, self.scale_window)
        if self.loss_scaler is not None and self.clip_grad_norm is None:
            warnings.warn(
                "fp16 loss scaling needs the two-pass norm to see overflows before any update: clipping "
                "the gradient norm at 1.0 (as lomo_optim does); set max_grad_norm to choose the value",
                UserWarning,
                stacklevel=2,
            )
            self.clip_grad_norm = 1.0
        scaler = self.loss_scaler
        skipped_before = scaler.skipped if scaler is not None else 0
        super().fused_backward(loss, lr)
        if scaler is not None and scaler.skipped == skipped_before:  # a step without overflow
            scaler.stepped()

    def _on_non_finite_norm(self, total: torch.Tensor) -> None:
        if self.loss_scaler is None:
            super()._on_non_finite_norm(total)
            return
        self.loss_scaler.overflowed(self.steps_taken)

    def _update_bucket(self, params: list[torch.Tensor], grads: list[torch.Tensor], ok: torch.Tensor | None) -> None:
        """lomo_optim's per-parameter update, for a bucket at once (foreach ops: same arithmetic, fewer calls). A
        parameter whose flag is false (its gradient zeros here) keeps its value: no decay, nothing added."""
        for group, ps, gs, oks in self._by_group(params, grads, ok):
            self._clip(gs, group)
            lr, wd = group["lr"], group["weight_decay"]
            locals_ = [local(p).detach() for p in ps]
            targets = [t if t.dtype == torch.float32 else t.to(torch.float32) for t in locals_]
            if wd > 0.0 and oks is None:
                foreach_mul_(targets, 1.0 - lr * wd)
            elif wd > 0.0 and oks is not None:
                foreach_mul_(targets, list(torch.where(oks, 1.0 - lr * wd, 1.0).unbind()))
            foreach_add_(targets, gs, alpha=-lr)
            for part, t in zip(locals_, targets):
                if part.dtype != torch.float32:
                    part.copy_(t)


class AdaLomo(InBackwardOptimizer):
    """AdaLomo: factored second moments (Adafactor-like) fused into backward (``lomo_optim.AdaLomo``'s rule).

    State per parameter (``exp_avg_sq_row`` / ``exp_avg_sq_col`` for matrices, ``exp_avg_sq`` otherwise) lives in
    ``self.state`` on the parameter's device; the step count is the group's ``step``.
    """

    def __init__(
        self,
        model_or_params: nn.Module | Iterable[Any],
        lr: float = 1e-3,
        loss_scale: float = 2**10,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        clip_grad_norm: float | None = None,
        clip_grad_value: float | None = None,
        weight_decay: float = 0.0,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ) -> None:
        params = trainable(model_or_params)
        defaults = dict(
            lr=lr,
            eps=tuple(eps),
            clip_threshold=clip_threshold,
            decay_rate=decay_rate,
            clip_grad_value=clip_grad_value,
            weight_decay=weight_decay,
            step=0,
        )
        self.loss_scale = loss_scale
        super().__init__(params, defaults, clip_grad_norm=clip_grad_norm, bucket_bytes=bucket_bytes)

    def _grad_scale(self) -> float:
        return float(self.loss_scale) if self.loss_scale else 1.0

    def _before_backward(self) -> None:
        for group in self.param_groups:
            group["step"] += 1

    def _init_state(self, p: torch.Tensor) -> None:
        state = self.state[p]
        if p.dim() > 1:
            if "exp_avg_sq_row" not in state:
                state["exp_avg_sq_row"] = state_along(p, (0,))
                state["exp_avg_sq_col"] = state_along(p, (1,))
        elif "exp_avg_sq" not in state:
            state["exp_avg_sq"] = state_along(p, (0,)) if p.dim() == 1 else state_replicated(p, (1,))

    def _update_bucket(self, params: list[torch.Tensor], grads: list[torch.Tensor], ok: torch.Tensor | None) -> None:
        """lomo_optim's AdaLomo update, for a bucket at once: elementwise work with foreach ops over the bucket, the
        row and column statistics per matrix. Under FSDP2 each ``p`` is sharded on dim 0 and its gradient is this
        process's rows: the row statistics are local; the column sums, the sums of the row statistics and the
        parameters' squared norms of the whole bucket are completed by one all-reduce, the updates' squared norms by a
        second, so every shard gets the update of the whole tensor with two collectives per bucket. A parameter whose
        flag is false (its gradient zeros here, so its update is zeros) keeps its value and its statistics (copies of
        the small row / column / vector statistics, put back with ``torch.where``): no host sync."""
        for group, ps, gs, oks in self._by_group(params, grads, ok):
            self._clip(gs, group)
            step, decay_rate = group["step"], group["decay_rate"]
            if step == 0 and decay_rate < 0:  # as upstream (never true there either: the count is incremented first)
                decay_rate = -decay_rate
            beta2t = 1.0 - math.pow(step, decay_rate)
            eps_sq, eps_scale = group["eps"]
            squares = foreach_mul(gs, gs)
            foreach_add_(squares, eps_sq)
            locals_ = [local(p).detach() for p in ps]
            weights = [t if t.dtype == torch.float32 else t.to(torch.float32) for t in locals_]
            matrices = [i for i, p in enumerate(ps) if p.dim() > 1]
            vectors = [i for i, p in enumerate(ps) if p.dim() <= 1]
            # matrices of one shape and placement are reduced together, stacked (one op per kind, not per matrix)
            kinds: dict[tuple[Any, ...], list[int]] = {}
            for i in matrices:
                p = ps[i]
                kinds.setdefault((tuple(squares[i].shape), self._key[p], self._column_key[p]), []).append(i)
            shapes, split = list(kinds.values()), [k for k, kind in enumerate(kinds) if kind[2]]
            stacks = [torch.stack([squares[i] for i in idx]) for idx in shapes]
            reps = [ps[idx[0]] for idx in shapes]
            rows = [[local(self.state[ps[i]]["exp_avg_sq_row"]) for i in idx] for idx in shapes]
            cols = [[local(self.state[ps[i]]["exp_avg_sq_col"]) for i in idx] for idx in shapes]
            kept = [  # (only where a flag may be false)
                (local(value), local(value).clone(), i)
                for i, p in enumerate(ps)
                for value in self.state[p].values()
                if oks is not None and isinstance(value, torch.Tensor)
            ]
            # the row means: local where the columns are whole (FSDP2, HSDP, column-parallel weights); where they
            # are split (row-parallel weights) a first collective sums them
            summed_rows = self._sums([Along(stacks[k].sum(dim=-1), reps[k], (1,)) for k in split]) if split else []
            row_means = {k: total.div_(reps[k].shape[-1]) for k, total in zip(split, summed_rows)}
            for k, (rs, stack) in enumerate(zip(rows, stacks)):
                foreach_mul_(rs, beta2t)
                foreach_add_(rs, list(row_means.get(k, stack.mean(dim=-1)).unbind()), alpha=1.0 - beta2t)
            # then one collective: column sums, row-statistic sums, parameter squared norms (whole tensors)
            p_norms = torch.stack(foreach_norm(weights, 2.0))
            parts: list[Any] = [Along(stack.sum(dim=-2), rep, (0,)) for stack, rep in zip(stacks, reps)]
            parts += [Along(torch.stack(rs).sum(dim=-1, keepdim=True), rep, (0,)) for rs, rep in zip(rows, reps)]
            norm_parts, norms_of = self._per_param(ps, p_norms.square())
            summed = self._sums([*parts, *norm_parts] if self._sharded else parts)
            col_sums, row_sums = summed[: len(stacks)], summed[len(stacks) : 2 * len(stacks)]
            p_norms = norms_of(summed[2 * len(stacks) :]).sqrt() if self._sharded else p_norms
            updates: list[torch.Tensor] = [torch.empty(0)] * len(ps)
            for idx, cs, col_sum, rs, row_sum in zip(shapes, cols, col_sums, rows, row_sums):
                n_rows = float(ps[idx[0]].shape[0])  # of the whole tensor (a DTensor's shape is global)
                foreach_mul_(cs, beta2t)
                foreach_add_(cs, list(col_sum.div_(n_rows).unbind()), alpha=1.0 - beta2t)
                r_factor = (torch.stack(rs) / row_sum.div_(n_rows)).rsqrt_().unsqueeze(-1)
                for i, update in zip(idx, torch.mul(r_factor, torch.stack(cs).unsqueeze(-2).rsqrt()).unbind()):
                    updates[i] = update
            if vectors:
                sq = [local(self.state[ps[i]]["exp_avg_sq"]) for i in vectors]
                foreach_mul_(sq, beta2t)
                foreach_add_(sq, [squares[i] for i in vectors], alpha=1.0 - beta2t)
                for i, rsqrt in zip(vectors, foreach_rsqrt(sq)):
                    updates[i] = rsqrt
            foreach_mul_(updates, gs)
            # the second collective: the updates' squared norms
            u_norms = torch.stack(foreach_norm(updates, 2.0))
            if self._sharded:
                u_parts, u_norms_of = self._per_param(ps, u_norms.square())
                u_norms = u_norms_of(self._sums(u_parts)).sqrt()
            sqrt_numel = torch.tensor([math.sqrt(p.numel()) for p in ps], device=u_norms.device)
            clip = (u_norms / sqrt_numel / group["clip_threshold"]).clamp_(min=1.0)
            foreach_div_(updates, list(clip.unbind()))
            lrs = group["lr"] * (p_norms / sqrt_numel).clamp_(min=eps_scale)
            if group["weight_decay"] > 0.0:
                decay = 1.0 - lrs * group["weight_decay"]
                foreach_mul_(weights, list((decay if oks is None else torch.where(oks, decay, 1.0)).unbind()))
            foreach_mul_(updates, list(lrs.unbind()))
            foreach_sub_(weights, updates)
            for now, before, i in kept:  # (the statistics of a parameter whose flag is false, as they were)
                now.copy_(torch.where(cast(torch.Tensor, oks)[i], now, before))
            for part, w in zip(locals_, weights):
                if w.data_ptr() != part.data_ptr():
                    part.copy_(w)
