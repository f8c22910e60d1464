"""APOLLO and APOLLO-Mini (apollo-torch): ``apollo_adamw``, ``apollo_adamw_layerwise``.

- :data:`SPECS`: transformers' defaults and settings, the check of the channel-wise ratio's shape;
- ``APOLLOAdamW``: ``apollo_torch.APOLLOAdamW`` whose checkpoints load with ``weights_only=True`` and resume exactly
  (the projectors as plain data, :class:`~lightning_optims.families.projection.ProjectorStateMixin`), built when
  first asked for (apollo-torch is slow to import);
- :class:`ApolloPartStep`: its step on a process's block of a sharded matrix (any layout), with the numbers of one
  device.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from lightning_optims.distributed.placements import local, sharding
from lightning_optims.distributed.sums import Along, Sums
from lightning_optims.engines.sharded import ShardedStepOptimizer, grad_of
from lightning_optims.families.projection import (
    ONE_SIDED,
    ProjectedPartStep,
    ProjectorStateMixin,
    adam_on_projected,
    keep_my_rows,
    project,
    projected_follows,
    projects_right,
    renew,
    side,
)
from lightning_optims.optim_args import Arg
from lightning_optims.spec import ADAM, BuildContext, OptimizerSpec, Sharding

__all__ = ["APOLLO_ARGUMENTS", "SPECS", "ApolloPartStep"]

# transformers' defaults (trainer_optimizer._get_apollo_optimizer)
APOLLO_ARGUMENTS = (
    Arg("rank", int, 128, help="projection rank (APOLLO: 256 recommended; APOLLO-Mini: 1)"),
    Arg("proj", str, "random", choices=("random", "svd")),
    Arg(
        "scale_type",
        str,
        "channel",
        choices=("channel", "tensor"),
        help="channel-wise (APOLLO) or tensor-wise (APOLLO-Mini) gradient scaling",
    ),
    Arg("update_proj_gap", int, 200),
    Arg("scale", float, 1.0, help="APOLLO-Mini: 128"),
    # ('full': apollo_torch raises NotImplementedError at the first step; refused here before training starts)
    Arg("proj_type", str, "std", choices=ONE_SIDED),
)


def _apollo_channel_ratio(options: dict[str, Any], targets: list[tuple[str, tuple[int, ...]]]) -> str | None:
    """APOLLO's channel-wise ratio (``apollo_torch.APOLLOAdamW.step``) is the norms of the normalised and the projected
    gradient along ``norm_dim``, chosen by the shape as for ``proj_type='std'`` (1 when ``m >= n``): where the
    projection is on the other side, that dimension is the rank's, and the ``rank`` numbers scale the gradient's
    rows or columns, a shape error at the first step unless there is 1 of them or that dimension's size (``proj=svd``:
    at most ``min(m, n)``, the SVD's vectors)."""
    if options.get("scale_type", "channel") != "channel":
        return None
    rank, proj_type = options.get("rank", 128), options.get("proj_type", "std")
    for name, (m, n) in targets:
        if projects_right(proj_type, m, n) == projects_right("std", m, n):  # (std's side: the ratio follows it)
            continue
        size, what = (m, "rows") if m >= n else (n, "columns")
        ratio = min(rank, m, n) if options.get("proj") == "svd" else rank  # (an SVD has at most min(m, n) vectors)
        if ratio not in (1, size):
            return (
                f"optim_args scale_type='channel' with proj_type={proj_type!r} and rank={rank} cannot step "
                f"{name!r} {[m, n]}: its projection is on the other side than proj_type='std' takes, where APOLLO's "
                f"channel-wise ratio has {ratio} numbers for the matrix's {size} {what}, and apollo_torch fails with "
                "a shape error at the first step. Use proj_type='std', scale_type='tensor' or rank=1"
            )
    return None


def _apollo_target_group(ctx: BuildContext) -> dict:
    # transformers puts betas / eps into the target group only; the other group keeps APOLLOAdamW's defaults
    return {**ctx.optim_args, **ctx.adam_kwargs}


def __getattr__(name: str) -> Any:  # the optimizer class, built when first asked for
    if name == "APOLLOAdamW":
        from apollo_torch import APOLLOAdamW as upstream

        cls = type(
            name,
            (ProjectorStateMixin, upstream),
            {
                "__module__": __name__,
                "__doc__": "``apollo_torch.APOLLOAdamW`` whose checkpoints load with ``weights_only=True`` and resume "
                "exactly.",
                "_seeded_projections": True,
            },
        )
        globals()[name] = cls
        return cls
    raise AttributeError(name)


class ApolloPartStep(ProjectedPartStep):
    """APOLLO on sharded parameters: a projected matrix (``proj=random`` or ``svd``, any one-sided ``proj_type``)
    steps on this process's block; a group without ``rank`` (what ``optim_target_modules`` does not select) is plain
    AdamW, element by element."""

    def elementwise(self, group: dict[str, Any]) -> bool:
        return "rank" not in group

    def steps_on_part(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        return p.dim() == 2 and group.get("proj") in ("random", "svd") and group.get("proj_type") != "full"

    def step(self, parts: ShardedStepOptimizer, p: DTensor, group: dict[str, Any]) -> Sums:
        """``apollo_torch.APOLLOAdamW.step`` for one matrix ``[m, n]``, computed on this process's rows of the
        parameter and its gradient (neither is gathered), with sums of a few numbers over the processes: it yields
        the tensors to sum and receives their sums (``ShardSums.lockstep`` batches them over every matrix of the
        step: one all-reduce per round, at most three rounds).

        The projection matrix comes from the seed and the shape alone. ``m >= n``: the projected gradient
        ``G @ O.T`` (``[m, r]``) has the parameter's rows, so its moments are kept as this process's rows, a
        channel-wise scaling (per row) is local and a tensor-wise one needs one sum of three numbers over the
        processes (two norms and the gradient's, which gives the norm-growth limiter's); ``O`` (``[r, n]``) is kept
        whole on every process. ``m < n``: ``O.T @ G`` (``[r, n]``) is a sum over row blocks (one all-reduce of
        ``r * n`` numbers), after which every process holds it and its moments whole; each keeps its rows of ``O``
        (``[m, r]``); the limiter's norm is one more sum. State tensors are ``DTensor`` s, sharded on the
        parameter's rows or replicated, so the distributed checkpoint saves and reshards them."""
        inner: Any = parts.inner_for(p, group)  # (APOLLOAdamW: scale_front, disable_nl, its projector)
        group = {**inner.param_groups[0], **group}  # (the upstream defaults, such as correct_bias, with the group's)
        state = parts.state_of(p)
        if not state:
            state["seed"] = parts.position(p)
        grad, block = local(grad_of(p)).to(p.dtype), local(p)
        rows, cols = parts.block(p)
        split_cols = bool(sharding(p, (1,)))
        m, n = p.shape
        right = side(group, p)
        if "step" not in state:
            state["step"] = 0
        if "projector" not in state:
            state["projector"] = inner._initialize_projector(group, state)
        projector = state["projector"]
        if projector.ortho_matrix is None or state["step"] % projector.update_proj_gap == 0:
            if group["proj"] == "svd":  # (GaLore's projector: the SVD of the whole gradient, taken by one process)
                yield from renew(projector, grad, p, rows, right, parts.owner(p))
                projector.svd_count += 1
            else:  # (get_orthogonal_matrix reads only the shape, dtype and device of the matrix it is given)
                projector.update_ortho_matrix(grad.new_zeros(()).expand(m, n), proj_type="right" if right else "left")
                keep_my_rows(projector, rows, right)
        low = yield from project(grad, projector.ortho_matrix, p, right, cols)
        norm_grad, step_size = adam_on_projected(state, low, group)
        front = math.sqrt(group["scale"]) if inner.scale_front else 1.0
        grad_norm = None  # the norm of the scaled gradient, for the limiter
        if group["scale_type"] == "channel":
            factor = yield from channel_factor(norm_grad, low, p, right, rows, cols)
        elif group["scale_type"] == "tensor" and right:
            low_sums, grad_sum = yield [
                Along(torch.stack([norm_grad.square().sum(), low.square().sum()]), p, (0,)),
                Along(grad.square().sum(), p),
            ]
            factor = low_sums[0].sqrt() / (low_sums[1].sqrt() + 1e-8)
            grad_norm = factor * grad_sum.sqrt() * front
        elif group["scale_type"] == "tensor" and split_cols:  # (O.T @ G has the parameter's columns)
            (low_sums,) = yield [Along(torch.stack([norm_grad.square().sum(), low.square().sum()]), p, (1,))]
            factor = low_sums[0].sqrt() / (low_sums[1].sqrt() + 1e-8)
        elif group["scale_type"] == "tensor":
            factor = torch.norm(norm_grad) / (torch.norm(low) + 1e-8)
        else:
            raise ValueError(f"APOLLO scale_type={group['scale_type']!r}: expected 'channel' or 'tensor'")
        scaled = grad * factor
        if inner.scale_front:
            scaled *= front
        if not inner.disable_nl:
            if grad_norm is None:
                (grad_norm,) = yield [Along(scaled.square().sum(), p)]
                grad_norm = grad_norm.sqrt()
            if "scaled_grad" in state:
                # (upstream's max(ratio, 1.01) on the device: no host sync; the same numbers)
                limiter = torch.clamp(grad_norm / (state["scaled_grad"] + 1e-8), min=1.01) / 1.01
                scaled = scaled / limiter
                state["scaled_grad"] = grad_norm / limiter
            else:
                state["scaled_grad"] = grad_norm
        if not inner.scale_front:
            scaled *= math.sqrt(group["scale"])
        block.add_(scaled, alpha=-step_size)
        if group["weight_decay"] > 0.0:
            block.add_(block, alpha=(-group["lr"] * group["weight_decay"]))
        parts.keep_state(p, state, projected_follows(right))


def channel_factor(
    norm_grad: torch.Tensor, low: torch.Tensor, p: torch.Tensor, right: bool, rows: torch.Tensor, cols: torch.Tensor
) -> Generator[list[Any], list[torch.Tensor], torch.Tensor]:
    """APOLLO's channel-wise scaling factor on this process's block of ``p``. Upstream takes the norms of the
    normalised and the projected gradient along ``norm_dim`` (1 when ``m >= n``, else 0: set by the shape, whatever
    ``proj_type`` projects) and multiplies the whole gradient by their ratio, one number per row (``norm_dim`` 1) or
    per column (0). Along the projected dimension (``r``) the norms are this process's; along a dimension that
    follows the parameter's they are summed over the processes that split it. Where ``proj_type`` does not project
    the side ``std`` would, the ratio has ``r`` entries, which upstream broadcasts over the parameter's rows or
    columns: only ``r == 1`` or ``r`` equal to that dimension runs there (anything else is upstream's shape error,
    refused when the optimizer is built: :func:`_apollo_channel_ratio`; raised here too for an optimizer built
    otherwise)."""
    m, n = p.shape
    dim = 1 if m >= n else 0
    follows_parameter = (dim == 0) == right  # (G @ P.T: dim 0 is the parameter's rows; P.T @ G: dim 1 its columns)
    sums = torch.stack([norm_grad.square().sum(dim=dim), low.square().sum(dim=dim)])
    if follows_parameter:
        (sums,) = yield [Along(sums, p, (dim,))]  # (G @ P.T: its rows, dim 0; P.T @ G: its columns, dim 1)
    factor = sums[0].sqrt() / (sums[1].sqrt() + 1e-8)
    if not follows_parameter:  # (the ratio is per row of G @ P.T, or per column of P.T @ G: this process's)
        return factor.unsqueeze(1) if dim == 1 else factor
    size, mine = (m, rows) if dim == 1 else (n, cols)
    if factor.numel() not in (1, size):
        raise RuntimeError(
            f"APOLLO scale_type='channel' with this proj_type gives {factor.numel()} factors for a matrix of shape "
            f"{tuple(p.shape)}: upstream broadcasts them over its {size} {'rows' if dim == 1 else 'columns'} (rank 1, "
            f"or rank {size}, runs)"
        )
    if factor.numel() > 1:
        factor = factor[mine]
    return factor.unsqueeze(1) if dim == 1 else factor


def _spec(name: str, layerwise: bool) -> OptimizerSpec:
    return OptimizerSpec(
        name=name,
        target="lightning_optims.families.apollo:APOLLOAdamW",
        family="apollo",
        arguments=APOLLO_ARGUMENTS,
        params="low_rank",
        target_group_kwargs=_apollo_target_group,
        uses=ADAM,
        packages=("apollo_torch",),
        layerwise=layerwise,
        updates_in_backward=layerwise,
        sharding=Sharding("parts", part_step=ApolloPartStep()),
        check_targets=_apollo_channel_ratio,
        callbacks=("lightning_optims.callbacks.hooks:GradientHookCleanup",) if layerwise else (),
        description="APOLLO (apollo-torch); APOLLO-Mini with rank=1,scale_type=tensor,scale=128",
    )


SPECS = [_spec("apollo_adamw", False), _spec("apollo_adamw_layerwise", True)]
