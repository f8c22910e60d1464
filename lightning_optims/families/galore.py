"""GaLore (galore-torch): ``galore_adamw``, ``galore_adamw_8bit``, ``galore_adafactor`` and their layer-wise forms.

- :data:`SPECS`: transformers' defaults and settings, the check of ``reverse_std``'s way back;
- ``GaLoreAdamW``, ``GaLoreAdamW8bit``, ``GaLoreAdafactor``: galore-torch's optimizers whose checkpoints load with
  ``weights_only=True`` and resume exactly, built when first asked for (galore-torch is an extra);
- :class:`GaLoreAdamWPartStep`, :class:`GaLoreAdafactorPartStep`: their steps on a process's block of a sharded
  matrix (any layout), with the numbers of one device; a renewal's SVD taken by one owner. The 8-bit AdamW calls CUDA
  kernels and has no sharded step.
"""

from __future__ import annotations

import importlib
from collections.abc import Generator
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from lightning_optims.distributed.placements import local
from lightning_optims.distributed.sums import Sums
from lightning_optims.engines.sharded import ShardedStepOptimizer, grad_of
from lightning_optims.families.adafactor import adafactor_update, apply_adafactor, fp32
from lightning_optims.families.projection import (
    PROJ_TYPES,
    ProjectedPartStep,
    ProjectorStateMixin,
    adam_on_projected,
    project,
    project_back,
    projected_follows,
    renew,
    side,
)
from lightning_optims.optim_args import Arg
from lightning_optims.spec import BuildContext, OptimizerSpec, Sharding
from lightning_optims.warn import quiet_upstream_noise

__all__ = ["GALORE_ARGUMENTS", "SPECS", "GaLoreAdafactorPartStep", "GaLoreAdamWPartStep"]

# transformers' defaults (trainer_optimizer._get_galore_optimizer); it passes neither betas, eps nor weight_decay
GALORE_ARGUMENTS = (
    Arg("rank", int, 128),
    Arg("update_proj_gap", int, 200),
    Arg("scale", float, 0.25),
    Arg("proj_type", str, "std", choices=PROJ_TYPES),
)


def _galore_projection_back(options: dict[str, Any], targets: list[tuple[str, tuple[int, ...]]]) -> str | None:
    """galore_torch's ``project_back`` for ``proj_type='reverse_std'`` picks its side from the projected gradient's
    shape: a wide matrix (``m < n``, projected on the right onto ``min(rank, m)`` columns) with ``rank >= m`` comes
    back square and is multiplied on the wrong side, a shape error at the first step."""
    rank = options.get("rank", 128)
    if options.get("proj_type", "std") != "reverse_std":
        return None
    for name, (m, n) in targets:
        if m < n and rank >= m:
            return (
                f"optim_args proj_type='reverse_std' with rank={rank} cannot step {name!r} {[m, n]}: galore_torch "
                f"projects it onto {m} columns and projects them back on the wrong side (a shape error at the first "
                f"step). Use a rank below {m}, or another proj_type"
            )
    return None


def _galore_target_group(ctx: BuildContext) -> dict:
    return dict(ctx.optim_args)


def _galore_adafactor(ctx: BuildContext) -> dict:
    return {"scale_parameter": False, "relative_step": False}


def _galore(name: str) -> type:
    quiet_upstream_noise()  # (galore_torch imports bitsandbytes)
    upstream = getattr(importlib.import_module("galore_torch"), name)
    return type(
        name,
        (ProjectorStateMixin, upstream),
        {
            "__module__": __name__,
            "__doc__": upstream.__doc__,
            "projector_class": importlib.import_module("galore_torch.galore_projector").GaLoreProjector,
        },
    )


def __getattr__(name: str) -> Any:  # GaLore classes, built only when galore_torch is installed and asked for
    if name in ("GaLoreAdamW", "GaLoreAdamW8bit", "GaLoreAdafactor"):
        cls = _galore(name)
        globals()[name] = cls
        return cls
    raise AttributeError(name)


def galore_projection(
    parts: ShardedStepOptimizer,
    inner: Any,
    group: dict[str, Any],
    state: dict[str, Any],
    grad: torch.Tensor,
    p: DTensor,
) -> Generator[list[Any], list[Any], tuple[torch.Tensor, Any, bool, torch.Tensor]]:
    """GaLore's projection of this process's block ``grad`` of the matrix ``p``: the projector created the first
    time, renewed every ``update_proj_gap`` steps (:func:`~lightning_optims.families.projection.renew`, by the
    matrix's owner), the projected gradient summed over the blocks that share it
    (:func:`~lightning_optims.families.projection.project`). Returns it, the projector, whether it is ``G @ P.T`` (the
    side the group's ``proj_type`` takes) and this process's columns."""
    rows, cols = parts.block(p)
    right = side(group, p)
    if "step" not in state:
        state["step"] = 0
    if "projector" not in state:
        state["projector"] = type(inner).projector_class(
            group["rank"],
            update_proj_gap=group["update_proj_gap"],
            scale=group["scale"],
            proj_type=group.get("proj_type", "std"),
        )
    projector = state["projector"]
    if projector.ortho_matrix is None or state["step"] % projector.update_proj_gap == 0:
        yield from renew(projector, grad, p, rows, right, parts.owner(p))
    low = yield from project(grad, projector.ortho_matrix, p, right, cols)
    return low, projector, right, cols


class GaLoreAdamWPartStep(ProjectedPartStep):
    """GaLore AdamW on sharded parameters: a projected matrix (any one-sided ``proj_type``) steps on this process's
    block; a group without ``rank`` is plain AdamW, element by element."""

    def elementwise(self, group: dict[str, Any]) -> bool:
        return "rank" not in group

    def steps_on_part(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        return p.dim() == 2 and group.get("proj_type", "std") != "full"

    def step(self, parts: ShardedStepOptimizer, p: DTensor, group: dict[str, Any]) -> Sums:
        """``galore_torch.GaLoreAdamW.step`` for one matrix ``[m, n]`` on this process's block of it (rows ``R``,
        columns ``C``: all of them where that dimension is not split). A regular step needs no whole tensor: ``m >=
        n``, the projected gradient ``G @ P.T`` has the parameter's rows (moments kept as this process's rows, ``P``
        whole on every process), a sum over the column blocks where the columns are split; ``m < n``, ``P.T @ G``
        has its columns, a sum over the row blocks (moments with the parameter's columns, each process keeps its rows
        of ``P``). A projection renewal (every ``update_proj_gap`` steps) takes the SVD of the whole gradient: the
        processes' blocks go to the one process that takes it, and the projection is summed to the others
        (:func:`~lightning_optims.families.projection.renew`)."""
        inner: Any = parts.inner_for(p, group)
        group = {**inner.param_groups[0], **group}  # (the upstream defaults, such as correct_bias, with the group's)
        state = parts.state_of(p)
        grad, block = local(grad_of(p)).to(p.dtype), local(p)
        low, projector, right, cols = yield from galore_projection(parts, inner, group, state, grad, p)
        norm_grad, step_size = adam_on_projected(state, low, group)
        block.add_(project_back(norm_grad, projector, right, cols), alpha=-step_size)
        if group["weight_decay"] > 0.0:
            block.add_(block, alpha=(-group["lr"] * group["weight_decay"]))
        parts.keep_state(p, state, projected_follows(right))


class GaLoreAdafactorPartStep(ProjectedPartStep):
    """GaLore Adafactor on sharded parameters: a projected matrix (any one-sided ``proj_type``) steps on this
    process's block; a group without ``rank`` is Adafactor (whose statistics and RMS read whole rows, columns and
    tensors) on this process's part, its sums completed over the processes."""

    def elementwise(self, group: dict[str, Any]) -> bool:
        return False

    def steps_on_part(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        if "rank" in group:
            return p.dim() == 2 and group.get("proj_type", "std") != "full"
        return p.dim() <= 2

    def step(self, parts: ShardedStepOptimizer, p: DTensor, group: dict[str, Any]) -> Sums:
        return self._projected(parts, p, group) if "rank" in group else self._adafactor(parts, p, group)

    def _projected(self, parts: ShardedStepOptimizer, p: DTensor, group: dict[str, Any]) -> Sums:
        """``galore_torch.GaLoreAdafactor.step`` for one matrix ``[m, n]`` on this process's block of it: the
        projection as GaLore AdamW's (:meth:`GaLoreAdamWPartStep.step`: a renewal sends the blocks to the SVD's
        owner), then Adafactor on the projected gradient
        (:func:`~lightning_optims.families.adafactor.adafactor_update`): ``m >= n``, ``G @ P.T`` (``[m, r]``) has the
        parameter's rows, so its row statistics are this process's and its column statistics (``[r]``) and RMS sums
        over the row blocks; ``m < n``, ``P.T @ G`` (``[r, n]``) has its columns, the row statistics (``[r]``) sum over
        the column blocks. The update is projected back onto this process's block; the parameter's RMS (which the
        state keeps) is one more number summed."""
        inner: Any = parts.inner_for(p, group)
        group = {**inner.param_groups[0], **group}  # (the upstream defaults: clip_threshold, decay_rate, ...)
        state = parts.state_of(p)
        part, grad = local(p), fp32(local(grad_of(p)))
        weights = fp32(part)
        low, projector, right, cols = yield from galore_projection(parts, inner, group, state, grad, p)
        m, n = p.shape
        shape, follows = ((m, low.shape[1]), {0: 0}) if right else ((low.shape[0], n), {1: 1})
        update, lr = yield from adafactor_update(inner, low, shape, follows, p, weights, state, group)
        apply_adafactor(weights, part, project_back(update, projector, right, cols), lr, group)
        parts.keep_state(p, state, projected_follows(right))

    def _adafactor(self, parts: ShardedStepOptimizer, p: DTensor, group: dict[str, Any]) -> Sums:
        """GaLore Adafactor's step of a parameter without projection (a group without ``rank``: Adafactor, whose
        statistics and RMS read whole rows, columns and tensors) on this process's part, its sums completed over the
        processes (:func:`~lightning_optims.families.adafactor.adafactor_update`, as ``ShardedAdafactor``)."""
        inner: Any = parts.inner_for(p, group)
        group = {**inner.param_groups[0], **group}
        state = parts.state_of(p)
        part, grad = local(p), fp32(local(grad_of(p)))
        weights = fp32(part)
        every = {d: d for d in range(p.dim())}
        update, lr = yield from adafactor_update(inner, grad, tuple(p.shape), every, p, weights, state, group)
        apply_adafactor(weights, part, update, lr, group)
        d = p.dim()
        follows = {
            "exp_avg": every,
            "exp_avg_sq": every,
            "exp_avg_sq_row": {i: i for i in range(d - 1)},
            "exp_avg_sq_col": {**{i: i for i in range(d - 2)}, max(d - 2, 0): d - 1},
        }
        parts.keep_state(p, state, follows)


_PART_STEPS = {"GaLoreAdamW": GaLoreAdamWPartStep(), "GaLoreAdafactor": GaLoreAdafactorPartStep()}


def _spec(name: str, cls: str) -> OptimizerSpec:
    layerwise, eight_bit = name.endswith("_layerwise"), "8bit" in name
    part_step = _PART_STEPS.get(cls)
    return OptimizerSpec(
        name=name,
        target=f"lightning_optims.families.galore:{cls}",
        family="galore",
        arguments=GALORE_ARGUMENTS,
        params="low_rank",
        target_group_kwargs=_galore_target_group,
        # transformers adds scale_parameter / relative_step for galore_adafactor only; without them its layerwise
        # form raises "Cannot combine manual `lr` and `relative_step=True`", so here both get them
        kwargs=_galore_adafactor if "adafactor" in name else (lambda ctx: {}),
        packages=("galore_torch", "bitsandbytes") if eight_bit else ("galore_torch",),
        extra="galore",
        device="cuda" if eight_bit else None,  # galore_torch's 8-bit AdamW calls CUDA kernels
        layerwise=layerwise,
        updates_in_backward=layerwise,
        # (8-bit: CUDA-only, untested sharded)
        sharding=Sharding("parts", part_step=part_step) if part_step is not None and not eight_bit else None,
        check_targets=_galore_projection_back,
        callbacks=("lightning_optims.callbacks.hooks:GradientHookCleanup",) if layerwise else (),
        description=f"galore_torch.{cls}",
    )


SPECS = [
    _spec(name, cls)
    for name, cls in (
        ("galore_adamw", "GaLoreAdamW"),
        ("galore_adamw_8bit", "GaLoreAdamW8bit"),
        ("galore_adafactor", "GaLoreAdafactor"),
        ("galore_adamw_layerwise", "GaLoreAdamW"),
        ("galore_adamw_8bit_layerwise", "GaLoreAdamW8bit"),
        ("galore_adafactor_layerwise", "GaLoreAdafactor"),
    )
]
