"""The projection machinery APOLLO and GaLore share (apollo-torch's SVD projector is GaLore's): which side a matrix is
projected on, projector objects as plain data in a checkpoint, and the pieces of a projected step on a process's
block of a sharded matrix (the renewal by one owner, the projection and its way back, Adam on the projected
gradient). The two family modules (:mod:`.apollo`, :mod:`.galore`) build their optimizers and steps from it.

In the docstrings below, ``m >= n`` and ``m < n`` name the two sides of a projection of a matrix ``[m, n]`` as
``proj_type='std'`` takes them: ``G @ P.T`` (on the right) and ``P.T @ G`` (on the left); another ``proj_type`` takes
the side :func:`projects_right` gives it, with the same sums, state and placements as that side.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

import torch

from lightning_optims.distributed.owners import ToOwner, whole_matrix_cost
from lightning_optims.distributed.sums import Along
from lightning_optims.engines.sharded import PartStep, Unsupported
from lightning_optims.param_groups import follow_leader_lrs, split_added_group

__all__ = [
    "ONE_SIDED",
    "PROJ_TYPES",
    "ProjectedPartStep",
    "ProjectorStateMixin",
    "adam_on_projected",
    "keep_my_rows",
    "project",
    "project_back",
    "projected_follows",
    "projects_right",
    "renew",
    "side",
    "svd_cost",
]

#: the projections on one side of a matrix (a sharded block step exists for each); "full" projects both
ONE_SIDED = ("std", "reverse_std", "right", "left")
PROJ_TYPES = (*ONE_SIDED, "full")


def projects_right(proj_type: str, m: int, n: int) -> bool:
    """Whether the projector (galore_torch's and apollo_torch's, same rule) projects ``[m, n]`` on the right
    (``G @ P.T``): ``std`` projects the smaller dimension (right when ``m >= n``), ``reverse_std`` the larger,
    ``right`` and ``left`` always that side."""
    return {"std": m >= n, "reverse_std": m < n, "right": True, "left": False}[proj_type]


def side(group: dict[str, Any], p: torch.Tensor) -> bool:
    """Whether GaLore's (and APOLLO's) projection of the matrix ``p`` is ``G @ P.T`` (a projection on the right, ``P``
    ``[r, n]``) rather than ``P.T @ G``, as the projector's ``proj_type`` decides it (:func:`projects_right`)."""
    m, n = p.shape
    proj_type = group.get("proj_type", "std")
    if proj_type not in ONE_SIDED:
        raise ValueError(f"proj_type={proj_type!r} has no step on a part of a matrix: expected one of {ONE_SIDED}")
    return projects_right(proj_type, m, n)


# projector classes a checkpoint may name (nothing else is imported from a checkpoint)
_PROJECTORS = {
    "apollo_torch.random_projector:GradientProjector",
    "apollo_torch.svd_projector:GaLoreProjector",
    "galore_torch.galore_projector:GaLoreProjector",
}
_MARK = "__projector__"
_PROJECTOR_NAMES = sorted(_PROJECTORS)  # (a projector's class is stored as its index here: no str in state)


def projector_to_state(projector: Any) -> dict[str, Any]:
    cls = type(projector)
    name = f"{cls.__module__}:{cls.__qualname__}"
    if name not in _PROJECTORS:
        raise TypeError(f"unknown projector class {name}: cannot store it in a weights-only checkpoint")
    return {_MARK: name, **{k: v for k, v in vars(projector).items()}}


def projector_from_state(state: dict[str, Any]) -> Any:
    name = state[_MARK]
    if name not in _PROJECTORS:
        raise ValueError(f"checkpoint names projector class {name!r}, which is not one of {sorted(_PROJECTORS)}")
    module, _, qualname = name.partition(":")
    projector = object.__new__(getattr(importlib.import_module(module), qualname))
    projector.__dict__.update({k: v for k, v in state.items() if k != _MARK})
    return projector


if TYPE_CHECKING:  # mixed into an optimizer class, before it in the bases: type it as one
    _OptimizerBase = torch.optim.Optimizer
else:
    _OptimizerBase = object


class ProjectorStateMixin(_OptimizerBase):
    """``state_dict`` with projector objects as plain data; ``load_state_dict`` rebuilds them.

    A param group added during training (``BaseFinetuning``) is split as the build splits the model: target modules
    projected, the rest not (see :func:`split_added_group`), and APOLLO's random projections get their seeds.
    """

    low_rank_targets: Any = None
    _seeded_projections = False  # APOLLO seeds each random projection with the parameter's position

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        parts = split_added_group(param_group, self.low_rank_targets)
        for part in parts:
            if "follows_group" in part:
                part["follows_group"] = len(self.param_groups) + 1  # the part added right after it
            super().add_param_group(part)
        if self._seeded_projections:
            position = 0  # as APOLLOAdamW.__init__: 1-based position among all parameters, trainable ones seeded
            for group in self.param_groups:
                for p in group["params"]:
                    position += 1
                    if p.requires_grad and "seed" not in self.state[p]:
                        self.state[p]["seed"] = position

    def step(self, closure: Callable[[], float] | None = None) -> Any:
        follow_leader_lrs(self.param_groups)
        return super().step(closure)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        state = {}
        for index, entry in sd["state"].items():
            if "projector" in entry:
                entry = dict(entry)
                entry["projector"] = projector_to_state(entry["projector"])
            state[index] = entry
        return {**sd, "state": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # rebuild the projectors first: torch's load_state_dict turns str values inside state dicts into garbage
        state = {}
        for index, entry in state_dict["state"].items():
            projector = entry.get("projector")
            if isinstance(projector, dict) and _MARK in projector:
                entry = {**entry, "projector": projector_from_state(projector)}
            state[index] = entry
        super().load_state_dict({**state_dict, "state": state})
        for p, entry in self.state.items():
            projector = entry.get("projector")
            if projector is not None:  # its tensors follow the parameter (torch moves only the state's own tensors)
                for key, value in vars(projector).items():
                    if isinstance(value, torch.Tensor):
                        setattr(projector, key, value.to(p.device))


class ProjectedPartStep(PartStep):
    """The sharded-step protocol's parts common to APOLLO and GaLore: the target groups (with ``rank``) own their
    matrices for a renewal's SVD, dealt by :func:`svd_cost`; the projector is stored as plain fields (its class as an
    index of the known ones) and rebuilt."""

    def owns(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        return "rank" in group and p.dim() == 2

    def cost(self, shape: tuple[int, ...]) -> int:
        return svd_cost(shape)

    def unsupported(self, options: dict[str, Any]) -> Unsupported | None:
        proj_type = options.get("proj_type", "std")
        if proj_type in ONE_SIDED:
            return None
        return Unsupported(
            f"proj_type={proj_type!r}",
            f"proj_type={proj_type!r} projects both sides of each matrix",
            "Use proj_type 'std', 'reverse_std', 'right' or 'left'",
        )

    def encode(self, state: dict[str, Any]) -> dict[str, Any]:
        if "projector" not in state:
            return state
        fields = projector_to_state(state["projector"])
        kind = _PROJECTOR_NAMES.index(fields.pop(_MARK))
        return {**state, "projector": {"kind": kind, **fields}}

    def decode(self, state: dict[str, Any]) -> dict[str, Any]:
        fields = state.get("projector")
        if not isinstance(fields, dict):
            return state
        fields = dict(fields)
        name = _PROJECTOR_NAMES[int(fields.pop("kind"))]
        return {**state, "projector": projector_from_state({_MARK: name, **fields})}


#: the work of a renewal's reduced SVD of a matrix ``[m, n]``, up to a constant: ``m * n * min(m, n)``
svd_cost = whole_matrix_cost


def renew(
    projector: Any,
    grad: torch.Tensor,
    p: torch.Tensor,
    rows: torch.Tensor,
    right: bool,
    owner: int,
) -> Generator[list[Any], list[Any], None]:
    """A projection renewal of GaLore (and APOLLO ``proj=svd``): the SVD of the whole gradient, taken by one process,
    ``owner`` (:func:`~lightning_optims.distributed.owners.deal`), to which every process sends its block
    (:class:`~lightning_optims.distributed.owners.ToOwner`: a process receives only the matrices it owns, so the bytes
    and the memory of a renewal divide among the processes as its SVDs do); the projection reaches the others by a
    sum (the owner's matrix, zeros from the others: exact); then each keeps its part of the projection
    (:func:`keep_my_rows`)."""
    m, n = p.shape
    (whole,) = yield [ToOwner(grad, p, owner)]
    if whole is not None:  # (the owner)
        ortho = projector.get_orthogonal_matrix(whole, projector.rank, "right" if right else "left")
        del whole
    else:  # (the shape and dtype of get_orthogonal_matrix's: Vh[:rank] or U[:, :rank] of the reduced SVD)
        k = min(projector.rank, m, n)
        ortho = grad.new_zeros((k, n) if right else (m, k))
    (projector.ortho_matrix,) = yield [Along(ortho, p)]
    keep_my_rows(projector, rows, right)


def keep_my_rows(projector: Any, rows: torch.Tensor, right: bool) -> None:
    """After a renewal: ``m < n``, the projection ``O`` (``[m, r]``) is kept as this process's rows of it; ``m >= n``,
    ``O`` (``[r, n]``) whole on every process."""
    if not right:
        projector.ortho_matrix = projector.ortho_matrix[rows].clone()


def project(
    grad: torch.Tensor, ortho: torch.Tensor, p: torch.Tensor, right: bool, cols: torch.Tensor
) -> Generator[list[Any], list[torch.Tensor], torch.Tensor]:
    """The projected gradient of APOLLO and GaLore from this process's block ``grad`` of ``p``: ``m >= n``, ``G @
    O.T`` (a sum over the column blocks, with ``O``'s columns of the block); ``m < n``, ``O.T @ G`` (a sum over the
    row blocks, ``O`` being this process's rows). Yields the part to sum, returns the sum."""
    if right:
        (low,) = yield [Along(grad @ ortho[:, cols].t(), p, (1,))]
    else:
        (low,) = yield [Along(ortho.t() @ grad, p, (0,))]
    return low


def project_back(update: torch.Tensor, projector: Any, right: bool, cols: torch.Tensor) -> torch.Tensor:
    """GaLore's ``project_back`` onto this process's block: ``m >= n``, ``U @ P[:, C]``; ``m < n``, ``P[R] @ U``
    (``P`` kept as this process's rows); times the projector's scale."""
    if right:
        return torch.matmul(update, projector.ortho_matrix[:, cols]) * projector.scale
    return torch.matmul(projector.ortho_matrix, update) * projector.scale


def adam_on_projected(state: dict[str, Any], low: torch.Tensor, group: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """The Adam step of APOLLO and GaLore on a projected gradient ``low`` (its moments in ``state``, created the first
    time): the normalised gradient ``exp_avg / (sqrt(exp_avg_sq) + eps)`` and the step size (bias-corrected when the
    group asks), as both upstream optimizers compute them."""
    if "exp_avg" not in state:
        state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(low), torch.zeros_like(low)
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    beta1, beta2 = group["betas"]
    state["step"] += 1
    exp_avg.mul_(beta1).add_(low, alpha=(1.0 - beta1))
    exp_avg_sq.mul_(beta2).addcmul_(low, low, value=1.0 - beta2)
    denom = exp_avg_sq.sqrt().add_(group["eps"])
    step_size = group["lr"]
    if group["correct_bias"]:
        step_size = step_size * math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
    return exp_avg / denom, step_size


def projected_follows(right: bool) -> dict[str, dict[int, int]]:
    """How a projected step's state follows the parameter's dimensions: ``m >= n``, the moments (``[m, r]``) follow
    its rows; ``m < n``, the moments (``[r, n]``) its columns and the projection (``[m, r]``) its rows; the rest is
    the same on every process."""
    if right:
        return {"exp_avg": {0: 0}, "exp_avg_sq": {0: 0}, "exp_avg_sq_row": {0: 0}}
    return {"exp_avg": {1: 1}, "exp_avg_sq": {1: 1}, "exp_avg_sq_col": {0: 1}, "ortho_matrix": {0: 0}}
