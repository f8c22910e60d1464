"""The whole-tensor optimizers of transformers' list on FSDP2's sharded parameters (and on any layout with tensor
parallelism), with the numbers of one device, without gathering a whole tensor.

APOLLO's and GaLore's projections, Adafactor's factored moments (GaLore Adafactor) read whole rows, columns or
tensors. :class:`ShardedStepOptimizer` steps each parameter on this process's part: the family's block step (APOLLO
with a random or an SVD projection, GaLore AdamW, GaLore Adafactor, for every ``proj_type`` that projects one side:
``std``, ``reverse_std``, ``right``, ``left``; the groups without projection element by element, or, for GaLore
Adafactor, as Adafactor on the part), its sums (row and column statistics, norms, RMS, the projected gradient)
completed over the mesh dimensions that shard them (:mod:`lightning_optims.placements`), every parameter's at once; a
projection renewal (every ``update_proj_gap`` steps) sends each matrix's blocks to the process that takes its SVD.
State tensors are ``DTensor`` s placed like the parameter dimensions they follow, so Lightning's distributed checkpoint
saves and reshards them. GaLore's ``proj_type='full'`` (a projection on both sides) has no block step and is refused.
:class:`ShardedLayerwiseOptimizer` runs the same steps for the layer-wise names, an FSDP2 group at a time
(:class:`~lightning_optims.placements.Rounds`).

In the docstrings below, ``m >= n`` and ``m < n`` name the two sides of a projection of a matrix ``[m, n]`` as
``proj_type='std'`` takes them: ``G @ P.T`` (on the right) and ``P.T @ G`` (on the left); another ``proj_type`` takes
the side :func:`_projects_right` gives it, with the same sums, state and placements as that side.

APOLLO seeds each random projection with the parameter's position among all parameters; stepping one parameter alone,
it is set to the value of the whole optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from typing import Any, cast

import torch
from torch.distributed.tensor import DTensor, Replicate

from lightning_optims.compat import is_shard, shard_like
from lightning_optims.families.adafactor import adafactor_update, apply_adafactor, fp32
from lightning_optims.families.low_rank import ONE_SIDED, projects_right
from lightning_optims.layerwise import StepHooks
from lightning_optims.placements import (
    Along,
    Rounds,
    ShardSums,
    ToOwner,
    local,
    local_indices,
    reduction_key,
    shard_coordinate,
    sharding,
)

Sums = Generator[list[Any], list[torch.Tensor], None]  # (a step that yields what it needs summed)

__all__ = [
    "ShardedLayerwiseOptimizer",
    "ShardedStepOptimizer",
    "is_sharded",
]


def _projectors() -> Any:
    from lightning_optims import optimizers  # (imports apollo_torch and grokadamw: only when a step needs it)

    return optimizers


def _projector_names() -> list[str]:
    return sorted(_projectors()._PROJECTORS)  # a projector's class is stored as its index here (no str in state)


class ShardedStepOptimizer(torch.optim.Optimizer):
    """``optimizer_cls`` over FSDP2 (``fully_shard``) parameters: see the module docstring.

    ``param_groups`` are the groups transformers' Trainer builds, over the sharded parameters: schedulers, Lightning's
    clipping and learning-rate monitor see them as usual.
    """

    def __init__(self, param_groups: list[dict[str, Any]], optimizer_cls: type, kwargs: dict[str, Any]) -> None:
        super().__init__(param_groups, dict(kwargs))
        self._optimizer_cls, self._kwargs = optimizer_cls, dict(kwargs)
        params = [p for g in self.param_groups for p in g["params"]]
        self._position = {p: i + 1 for i, p in enumerate(params)}  # APOLLO's 1-based position among all parameters
        # which process takes each projected matrix's SVD at a renewal (deal_svds)
        self._owners = deal_svds([p for g in self.param_groups if "rank" in g for p in g["params"] if p.dim() == 2])
        self._inner: dict[torch.Tensor, torch.optim.Optimizer] = {}
        self._indices: dict[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] = {}
        # every parameter steps on this process's part: element by element, or on the family's block step
        without = [
            (tuple(p.shape), group.get("proj_type"))
            for group in self.param_groups
            for p in group["params"]
            if not self._elementwise(group) and self._on_rows(p, group) is None
        ]
        if without:
            raise ValueError(
                f"{optimizer_cls.__name__} with these settings has no step on a part of a sharded parameter "
                f"({len(without)} parameters, the first of shape and proj_type {without[0]}): GaLore's "
                "proj_type='full' (two projections of each matrix) is not stepped on parts; use proj_type 'std', "
                "'reverse_std', 'right' or 'left'"
            )

    # -- one parameter -------------------------------------------------------------------------------------------

    def _inner_for(self, p: torch.Tensor, group: dict[str, Any]) -> torch.optim.Optimizer:
        """The upstream optimizer for ``p``, over a placeholder: each step puts a whole-size copy of ``p`` in it and
        takes it out again (neither the copy nor the whole state outlive the step)."""
        if p not in self._inner:
            options = {k: v for k, v in group.items() if k != "params"}
            inner = self._optimizer_cls([{"params": [torch.empty(0)], **options}], **self._kwargs)
            inner.state.clear()  # (APOLLO seeds in __init__; the state comes from the shards)
            self._inner[p] = inner
        return self._inner[p]

    @staticmethod
    def _unflatten_state(flat: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The optimizer's state entry and what it keeps in its param group, from one flat entry: each ``DTensor`` as
        this process's part; the projector rebuilt from its fields."""
        state: dict[str, Any] = {}
        group_state: dict[str, Any] = {}
        projector: dict[str, Any] = {}
        with torch.no_grad():  # (each DTensor's local tensor itself, not a view: _flatten_state knows it again)
            for key, value in flat.items():
                if isinstance(value, DTensor):
                    value = value.to_local()
                if key.startswith("projector."):
                    projector[key[len("projector.") :]] = value
                elif key.startswith("group."):
                    group_state[key[len("group.") :]] = value
                else:
                    state[key] = value
        if projector:
            name = _projector_names()[int(projector.pop("kind"))]
            state["projector"] = _projectors()._projector_from_state({"__projector__": name, **projector})
        return state, group_state

    @staticmethod
    def _flatten_state(
        state: dict[str, Any],
        group_state: dict[str, Any],
        place: Callable[[str, Any], Any],
        previous: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """One flat entry (torch's distributed checkpoint saves it like any optimizer's), each value as ``place``
        lays it out: a projector's fields under ``projector.`` (its class as an index); what the optimizer keeps in
        its param group (per parameter here, as each parameter has its own inner optimizer) under ``group.``. A
        tensor the step updated in place (the local tensor of ``previous``'s ``DTensor`` under that key) keeps that
        ``DTensor``: each step wraps only what is new (building a ``DTensor`` costs more than a small update)."""
        previous = previous or {}

        def placed(key: str, value: Any) -> Any:
            old = previous.get(key)
            if isinstance(old, DTensor) and old.to_local() is value:
                return old
            return place(key, value)

        flat: dict[str, Any] = {}
        for key, value in state.items():
            if key == "projector":
                fields = _projectors()._projector_to_state(value)
                flat["projector.kind"] = _projector_names().index(fields.pop("__projector__"))
                flat.update({f"projector.{field}": item for field, item in fields.items()})
            else:
                flat[key] = value
        flat.update({f"group.{key}": value for key, value in group_state.items()})
        with torch.no_grad():  # (to_local() without grad is the local tensor itself)
            return {key: placed(key, flat[key]) for key in sorted(flat)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch's load_state_dict rebuilds containers value by value (a str character by character) and casts every
        # tensor but "step" to the parameter's dtype: give it the sharded tensors only and put the other values
        # (numbers, strings, 0-d tensors such as optimi's step count) back as they are
        plain: dict[Any, dict[str, Any]] = {}
        state: dict[Any, dict[str, Any]] = {}
        for index, entry in state_dict["state"].items():
            plain[index] = {k: v for k, v in entry.items() if not isinstance(v, DTensor)}
            state[index] = {k: v for k, v in entry.items() if isinstance(v, DTensor)}
        super().load_state_dict({**state_dict, "state": state})
        # the state's keys are what the saved groups list (indices, or names from the distributed checkpoint)
        saved = [key for g in state_dict["param_groups"] for key in g["params"]]
        params = dict(zip(saved, (p for g in self.param_groups for p in g["params"])))
        for index, values in plain.items():
            entry = self.state[params[index]]
            for key, value in values.items():
                entry[key] = value

    # -- the step -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        on_rows = []  # the block steps (APOLLO, GaLore, GaLore Adafactor's Adafactor): their sums batched
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:  # (the same on every process: FSDP2)
                    continue
                rows_step = None if self._elementwise(group) else self._on_rows(p, group)
                if rows_step is not None:
                    on_rows.append(rows_step(p, group))
                else:
                    self._step(p, group)
        if on_rows:
            ShardSums().lockstep(on_rows)
        return loss

    def _on_rows(self, p: DTensor, group: dict[str, Any]) -> Callable[[DTensor, dict[str, Any]], Sums] | None:
        """The step on this process's part of ``p``, where its family has one (APOLLO's projections, GaLore's
        projections with AdamW and with Adafactor, GaLore Adafactor's groups without ``rank``); None where there is
        none (an elementwise group steps with :meth:`_step`)."""
        if self._apollo_on_rows(p, group):
            return self._apollo_rows
        if self._projects("projected_adam_on_rows", p, group):
            return self._galore_rows
        if self._projects("projected_adafactor_on_rows", p, group):
            return self._galore_adafactor_rows
        if getattr(self._optimizer_cls, "adafactor_without_rank", False) and "rank" not in group and p.dim() <= 2:
            return self._adafactor_part
        return None

    def _projects(self, flag: str, p: DTensor, group: dict[str, Any]) -> bool:
        """GaLore's projection of a matrix (any proj_type but ``full``), stepped on this process's block, where the
        optimizer class says so (``flag``: ``projected_adam_on_rows`` for GaLore AdamW, ``projected_adafactor_on_rows``
        for GaLore Adafactor)."""
        return (
            getattr(self._optimizer_cls, flag, False)
            and "rank" in group
            and p.dim() == 2
            and group.get("proj_type", "std") != "full"
        )

    def _galore_projection(
        self, inner: Any, group: dict[str, Any], state: dict[str, Any], grad: torch.Tensor, p: DTensor
    ) -> Generator[list[Any], list[torch.Tensor], tuple[torch.Tensor, Any, bool, torch.Tensor]]:
        """GaLore's projection of this process's block ``grad`` of the matrix ``p``: the projector created the first
        time, renewed every ``update_proj_gap`` steps (:func:`_renew`), the projected gradient summed over the blocks
        that share it (:func:`_project`). Returns it, the projector, whether it is ``G @ P.T`` (the side the group's
        ``proj_type`` takes: :func:`_projects_right`) and this process's columns."""
        rows, cols = self._block(p)
        right = _projects_right(group, p)
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
            yield from _renew(projector, grad, p, rows, right, self._owners[p])
        low = yield from _project(grad, projector.ortho_matrix, p, right, cols)
        return low, projector, right, cols

    def _galore_rows(self, p: DTensor, group: dict[str, Any]) -> Sums:
        """``galore_torch.GaLoreAdamW.step`` for one matrix ``[m, n]`` on this process's block of it (rows ``R``,
        columns ``C``: all of them where that dimension is not split). A regular step needs no whole tensor: ``m >=
        n``, the projected gradient ``G @ P.T`` has the parameter's rows (moments kept as this process's rows, ``P``
        whole on every process), a sum over the column blocks where the columns are split; ``m < n``, ``P.T @ G``
        has its columns, a sum over the row blocks (moments with the parameter's columns, each process keeps its rows
        of ``P``). A projection renewal (every ``update_proj_gap`` steps) takes the SVD of the whole gradient: the
        processes' blocks go to the one process that takes it, and the projection is summed to the others
        (:func:`_renew`)."""
        inner: Any = self._inner_for(p, group)
        group = {**inner.param_groups[0], **group}  # (the upstream defaults, such as correct_bias, with the group's)
        state, _ = self._unflatten_state(self.state.get(p, {}))
        grad, block = local(_grad(p)).to(p.dtype), local(p)
        low, projector, right, cols = yield from self._galore_projection(inner, group, state, grad, p)
        norm_grad, step_size = _adam_on_projected(state, low, group)
        block.add_(_project_back(norm_grad, projector, right, cols), alpha=-step_size)
        if group["weight_decay"] > 0.0:
            block.add_(block, alpha=(-group["lr"] * group["weight_decay"]))
        self.state[p] = self._wrap_state(state, p, right, self.state.get(p))

    def _galore_adafactor_rows(self, p: DTensor, group: dict[str, Any]) -> Sums:
        """``galore_torch.GaLoreAdafactor.step`` for one matrix ``[m, n]`` on this process's block of it: the
        projection as GaLore AdamW's (:meth:`_galore_rows`: a renewal sends the blocks to the SVD's process), then
        Adafactor on the projected gradient (:func:`~lightning_optims.families.adafactor.adafactor_update`): ``m >= n``,
        ``G @ P.T`` (``[m, r]``) has the parameter's rows, so its row statistics are this process's and its column
        statistics (``[r]``) and RMS sums over the row blocks; ``m < n``, ``P.T @ G`` (``[r, n]``) has its columns, the
        row statistics (``[r]``) sum over the column blocks. The update is projected back onto this process's block; the
        parameter's RMS (which the state keeps) is one more number summed."""
        inner: Any = self._inner_for(p, group)
        group = {**inner.param_groups[0], **group}  # (the upstream defaults: clip_threshold, decay_rate, ...)
        state, _ = self._unflatten_state(self.state.get(p, {}))
        part, grad = local(p), fp32(local(_grad(p)))
        weights = fp32(part)
        low, projector, right, cols = yield from self._galore_projection(inner, group, state, grad, p)
        m, n = p.shape
        shape, follows = ((m, low.shape[1]), {0: 0}) if right else ((low.shape[0], n), {1: 1})
        update, lr = yield from adafactor_update(inner, low, shape, follows, p, weights, state, group)
        apply_adafactor(weights, part, _project_back(update, projector, right, cols), lr, group)
        self.state[p] = self._wrap_state(state, p, right, self.state.get(p))

    def _adafactor_part(self, p: DTensor, group: dict[str, Any]) -> Sums:
        """GaLore Adafactor's step of a parameter without projection (a group without ``rank``: Adafactor, whose
        statistics and RMS read whole rows, columns and tensors) on this process's part, its sums completed over the
        processes (:func:`~lightning_optims.families.adafactor.adafactor_update`, as ``ShardedAdafactor``)."""
        inner: Any = self._inner_for(p, group)
        group = {**inner.param_groups[0], **group}
        state, _ = self._unflatten_state(self.state.get(p, {}))
        part, grad = local(p), fp32(local(_grad(p)))
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
        self.state[p] = self._flatten_state(
            state, {}, lambda key, value: _place(value, p, follows.get(key, {})), self.state.get(p)
        )

    def _block(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The global indices of this process's rows and columns of the matrix ``p`` (any placement, the
        strided shard included), computed once."""
        if p not in self._indices:
            self._indices[p] = (local_indices(p, 0), local_indices(p, 1))
        return self._indices[p]

    def _apollo_on_rows(self, p: DTensor, group: dict[str, Any]) -> bool:
        """APOLLO's projection of a matrix (proj=random or svd, any proj_type but ``full``, which upstream does not
        implement): stepped on this process's block."""
        return (
            getattr(self._optimizer_cls, "random_projection_on_rows", False)
            and "rank" in group
            and p.dim() == 2
            and group.get("proj") in ("random", "svd")
            and group.get("proj_type") != "full"
        )

    def _apollo_rows(self, p: DTensor, group: dict[str, Any]) -> Sums:
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
        inner: Any = self._inner_for(p, group)  # (APOLLOAdamW: scale_front, disable_nl, its projector)
        group = {**inner.param_groups[0], **group}  # (the upstream defaults, such as correct_bias, with the group's)
        state, _ = self._unflatten_state(self.state.get(p, {}))
        if not state:
            state["seed"] = self._position[p]
        grad, block = local(_grad(p)).to(p.dtype), local(p)
        rows, cols = self._block(p)
        split_cols = bool(sharding(p, (1,)))
        m, n = p.shape
        right = _projects_right(group, p)
        if "step" not in state:
            state["step"] = 0
        if "projector" not in state:
            state["projector"] = inner._initialize_projector(group, state)
        projector = state["projector"]
        if projector.ortho_matrix is None or state["step"] % projector.update_proj_gap == 0:
            if group["proj"] == "svd":  # (GaLore's projector: the SVD of the whole gradient, taken by one process)
                yield from _renew(projector, grad, p, rows, right, self._owners[p])
                projector.svd_count += 1
            else:  # (get_orthogonal_matrix reads only the shape, dtype and device of the matrix it is given)
                projector.update_ortho_matrix(grad.new_zeros(()).expand(m, n), proj_type="right" if right else "left")
                _keep_my_rows(projector, rows, right)
        low = yield from _project(grad, projector.ortho_matrix, p, right, cols)
        norm_grad, step_size = _adam_on_projected(state, low, group)
        front = math.sqrt(group["scale"]) if inner.scale_front else 1.0
        grad_norm = None  # the norm of the scaled gradient, for the limiter
        if group["scale_type"] == "channel":
            factor = yield from _channel_factor(norm_grad, low, p, right, rows, cols)
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
                limiter = max(grad_norm / (state["scaled_grad"] + 1e-8), 1.01) / 1.01
                scaled = scaled / limiter
                state["scaled_grad"] = grad_norm / limiter
            else:
                state["scaled_grad"] = grad_norm
        if not inner.scale_front:
            scaled *= math.sqrt(group["scale"])
        block.add_(scaled, alpha=-step_size)
        if group["weight_decay"] > 0.0:
            block.add_(block, alpha=(-group["lr"] * group["weight_decay"]))
        self.state[p] = self._wrap_state(state, p, right, self.state.get(p))

    @staticmethod
    def _wrap_state(
        state: dict[str, Any], p: torch.Tensor, right: bool, previous: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """A projected step's state placed as the parameter's dimensions it follows: ``m >= n``, the moments
        (``[m, r]``) follow its rows; ``m < n``, the moments (``[r, n]``) its columns and the projection (``[m, r]``)
        its rows; the rest is the same on every process."""
        follows = (
            {"exp_avg": {0: 0}, "exp_avg_sq": {0: 0}, "exp_avg_sq_row": {0: 0}}
            if right
            else {
                "exp_avg": {1: 1},
                "exp_avg_sq": {1: 1},
                "exp_avg_sq_col": {0: 1},
                "ortho_matrix": {0: 0},
            }
        )
        return ShardedStepOptimizer._flatten_state(
            state, {}, lambda key, value: _place(value, p, follows.get(key.split(".")[-1], {})), previous
        )

    def _elementwise(self, group: dict[str, Any]) -> bool:
        """APOLLO's and GaLore AdamW's groups without ``rank`` (what ``optim_target_modules`` does not select) are
        plain AdamW, element by element: stepped on this process's rows, with no collective."""
        return getattr(self._optimizer_cls, "elementwise_without_rank", False) and "rank" not in group

    def _step(self, p: DTensor, group: dict[str, Any]) -> None:
        """The upstream step of an elementwise group on this process's part of ``p``, its gradient and its state (the
        part of the whole step's result)."""
        inner = self._inner_for(p, group)
        (inner_group,) = inner.param_groups
        for key, value in group.items():
            if key != "params":
                inner_group[key] = value
        rows = local(p).detach()  # (the parameter's own storage: updated in place)
        rows.grad = local(_grad(p)).detach().to(rows.dtype)
        inner_group["params"] = [rows]
        inner.state[rows], group_state = self._unflatten_state(self.state.get(p, {}))
        inner_group.update(group_state)
        inner.step()
        kept = {k: v for k, v in inner_group.items() if k != "params" and k not in group}
        like_p = {d: d for d in range(p.dim())}
        self.state[p] = self._flatten_state(
            inner.state.pop(rows), kept, lambda key, value: _place(value, p, like_p), self.state.get(p)
        )
        inner_group["params"] = [torch.empty(0)]


class ShardedLayerwiseOptimizer(StepHooks, ShardedStepOptimizer):
    """A layer-wise optimizer (``*_layerwise``: one upstream optimizer per parameter, stepped as soon as its gradient
    exists) over FSDP2's sharded parameters (FSDP2 on one mesh dimension, HSDP, or 2-D with tensor parallelism). FSDP2
    reduce-scatters each group's gradients during backward and then runs the post-accumulate-grad hooks of its sharded
    parameters; the hooks here collect the group's parameters, and once the group's post-backward is done
    (:func:`~lightning_optims.compat.after_each_fsdp_group`) their steps start, each on this process's part (the
    family's block step, or element by element). Their sums go into one all-reduce per round (per mesh dimension), the
    first also carrying a flag of non-finite gradients, so that every process stops before the group writes anything; a
    group's later rounds share the next group's first (:class:`~lightning_optims.placements.Rounds`), the last ones
    finish after backward. A gradient is freed when its step ends: no gradient outlives its FSDP group by more than the
    rounds of its step (two or three groups' gradients at a time), where on one device none outlives its parameter.
    Without that signal (the optimizer used outside ``OptimizerMixin``) each parameter steps in its own hook. Each
    parameter is its own optimizer's only one (APOLLO's seed is 1, as in transformers' layer-wise construction); the
    learning rate is its group's (a scheduler drives every group alike)."""

    def __init__(self, param_groups: list[dict[str, Any]], optimizer_cls: type, kwargs: dict[str, Any]) -> None:
        super().__init__(param_groups, optimizer_cls, kwargs)
        self._position = dict.fromkeys(self._position, 1)
        # (the index: load_state_dict replaces the group dicts)
        self._group_of = {p: index for index, group in enumerate(self.param_groups) for p in group["params"]}
        self._pending: list[torch.Tensor] = []
        self._rounds = Rounds(ShardSums())
        self.batched = (
            False  # (set where compat.after_each_fsdp_group hooks it: a group's steps wait for its post-backward)
        )
        self._grad_sq_by_key: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self._hook_handles: list[Any] = []
        self.register_hooks()

    def _hooked_params(self) -> list[torch.Tensor]:
        return list(self._group_of)

    def _start_step(self) -> None:
        super()._start_step()
        self._grad_sq_by_key = {}

    def _measure(self, grad: torch.Tensor, p: Any = None) -> torch.Tensor:
        """This process's part of ``p``'s squared gradient norm, kept per reduction key (the mesh dimensions that
        shard ``p``), so that :meth:`grad_norm` sums each over exactly its processes."""
        norm = torch.linalg.vector_norm(grad, 2.0, dtype=torch.float32)
        key = reduction_key(p)
        if key in self._grad_sq_by_key:
            total, like = self._grad_sq_by_key[key]
            self._grad_sq_by_key[key] = (total + norm.square(), like)
        else:
            self._grad_sq_by_key[key] = (norm.square(), p)
        return norm

    def grad_norm(self) -> torch.Tensor | None:
        """The global norm of the gradients of the last step: each reduction key's part summed over its processes,
        the keys added in their sorted order. Asked for after backward (every gradient measured), its sums ride in
        the next round of the steps still in flight rather than in calls of their own."""
        if not self._grad_sq_by_key:
            return None
        keys = sorted(self._grad_sq_by_key)
        parts = [Along(self._grad_sq_by_key[k][0].clone(), self._grad_sq_by_key[k][1]) for k in keys]
        summed: list[torch.Tensor] = []
        with torch.no_grad():
            self.step_pending()  # (nothing, where every FSDP2 group's steps started after its post-backward)
            self._rounds.advance([], first=parts, check=summed.extend)
        return torch.stack(summed).sum().sqrt()

    def _step_one(self, p: torch.Tensor) -> None:
        if p.grad is None:
            return
        self._measure(_grad(p).to_local(), p)
        self._pending.append(p)
        if not self.batched:
            self.finish_steps()

    def step_pending(self) -> None:
        """Start the steps of the parameters whose gradients arrived since the last call (an FSDP2 group's), in
        one round of sums with the steps still in flight (:class:`~lightning_optims.placements.Rounds`): its first
        round carries a flag of non-finite gradients summed over the processes, so every process raises
        ``NonFiniteGradientError`` before any of the group's parameters is written (the groups started earlier are
        finished first, and were updated). The elementwise parameters step at once, with no collective; the others
        on their blocks, finished in later rounds (with later groups', or by :meth:`finish_steps`)."""
        batch, self._pending = self._pending, []
        if not batch:
            return
        with torch.no_grad():
            bad = torch.zeros((), dtype=torch.float32, device=local(batch[0]).device)
            for p in batch:
                bad += (~torch.isfinite(_grad(p).to_local())).any().to(torch.float32)
            # (summed over the mesh dimensions that shard the parameter whose sharding spans most of them: every
            # process of an FSDP group; a replicated dimension holds the same gradients, so the same flag)
            widest = max(batch, key=lambda p: len(sharding(p)))
            steps, elementwise = [], []
            for p in batch:
                group = self.param_groups[self._group_of[p]]
                on_part = None if self._elementwise(group) else self._on_rows(cast(DTensor, p), group)
                if on_part is not None:
                    steps.append(on_part(cast(DTensor, p), group))
                else:
                    elementwise.append((p, group))

            def check(sums: list[torch.Tensor]) -> None:
                if float(sums[0]) > 0:
                    for p in batch:
                        p.grad = None
                    from lightning_optims.in_backward import NonFiniteGradientError

                    raise NonFiniteGradientError(
                        "non-finite gradient in a layer-wise optimizer: the parameters of this FSDP group were not "
                        "updated and training stops here (parameters of groups whose gradients arrived earlier in "
                        "this backward were updated)"
                    )

            self._rounds.advance(steps, first=[Along(bad, widest)], check=check)
            for p, group in elementwise:
                self._step(cast(DTensor, p), group)
        for p in batch:  # (a step in flight holds its gradient until it ends)
            p.grad = None

    def after_group(self) -> None:
        """An FSDP2 group's post-backward is done (its gradients reduced, its parameters' hooks run): start its
        parameters' steps."""
        self.step_pending()

    def finish_steps(self) -> None:
        """What is pending, then the remaining rounds of the steps in flight."""
        self.step_pending()
        with torch.no_grad():
            self._rounds.drain()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if hasattr(self, "_hook_handles"):  # (groups from __init__ go through torch's add_param_group)
            raise TypeError("a layer-wise optimizer under FSDP2 cannot take a param group added during training")
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Runs the closure (its backward steps every parameter in the hooks, by FSDP group); what is left pending
        after it, and a gradient set without backward (torch's distributed checkpoint initialising the state with
        zero gradients and lr 0), is stepped here."""
        loss = None
        self._start_step()
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.finish_steps()
        super().step()
        return loss


def _projects_right(group: dict[str, Any], p: torch.Tensor) -> bool:
    """Whether GaLore's (and APOLLO's) projection of the matrix ``p`` is ``G @ P.T`` (a projection on the right, ``P``
    ``[r, n]``) rather than ``P.T @ G``, as the projector's ``proj_type`` decides it (:func:`projects_right`)."""
    m, n = p.shape
    proj_type = group.get("proj_type", "std")
    if proj_type not in ONE_SIDED:
        raise ValueError(f"proj_type={proj_type!r} has no step on a part of a matrix: expected one of {ONE_SIDED}")
    return projects_right(proj_type, m, n)


def _channel_factor(
    norm_grad: torch.Tensor, low: torch.Tensor, p: torch.Tensor, right: bool, rows: torch.Tensor, cols: torch.Tensor
) -> Generator[list[Any], list[torch.Tensor], torch.Tensor]:
    """APOLLO's channel-wise scaling factor on this process's block of ``p``. Upstream takes the norms of the
    normalised and the projected gradient along ``norm_dim`` (1 when ``m >= n``, else 0: set by the shape, whatever
    ``proj_type`` projects) and multiplies the whole gradient by their ratio, one number per row (``norm_dim`` 1) or
    per column (0). Along the projected dimension (``r``) the norms are this process's; along a dimension that
    follows the parameter's they are summed over the processes that split it. Where ``proj_type`` does not project
    the side ``std`` would, the ratio has ``r`` entries, which upstream broadcasts over the parameter's rows or
    columns: only ``r == 1`` or ``r`` equal to that dimension runs there (anything else is upstream's shape error,
    refused when the optimizer is built: ``families.low_rank``; raised here too for an optimizer built otherwise)."""
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


def svd_cost(shape: tuple[int, ...]) -> int:
    """The work of the reduced SVD of a matrix of ``shape`` ``[m, n]``, up to a constant: ``m * n * min(m, n)``."""
    m, n = shape
    return m * n * min(m, n)


def deal_svds(matrices: list[torch.Tensor]) -> dict[torch.Tensor, int]:
    """Which process takes the SVD of each projected matrix at a renewal, as
    :func:`~lightning_optims.placements.shard_coordinate` numbers the processes that split it: the matrices are dealt
    by cost (:func:`svd_cost`), the largest first, each to the process of its group with the least work so far
    (longest processing time first: the busiest process's work is within 4/3 of the least possible; ties to the
    matrix that comes first and the lowest coordinate), so that a renewal's SVDs, the whole matrices their owners
    receive, and its time divide among the processes. Every process computes the same deal: it depends on shapes and
    placements only. Matrices split over different mesh dimensions are dealt apart (each group numbers its own
    processes, and a process does not see another replica's deal: under 2-D the head, which FSDP2 alone splits, is
    dealt without the decoder layers' matrices); each replica of a replicated mesh dimension deals its own. A plain
    tensor or one no mesh dimension splits: this process (0)."""
    owners: dict[torch.Tensor, int] = {}
    work: dict[tuple[str, ...], list[int]] = {}
    for p in sorted(matrices, key=lambda p: -svd_cost(tuple(p.shape))):  # (a stable sort: ties keep their order)
        load = work.setdefault(reduction_key(p), [0] * shard_coordinate(p)[1])
        owners[p] = min(range(len(load)), key=lambda k: (load[k], k))
        load[owners[p]] += svd_cost(tuple(p.shape))
    return owners


def _renew(
    projector: Any,
    grad: torch.Tensor,
    p: torch.Tensor,
    rows: torch.Tensor,
    right: bool,
    owner: int,
) -> Generator[list[Any], list[Any], None]:
    """A projection renewal of GaLore (and APOLLO ``proj=svd``): the SVD of the whole gradient, taken by one process,
    ``owner`` (:func:`deal_svds`), to which every process sends its block (:class:`ToOwner`: a process receives only
    the matrices it owns, so the bytes and the memory of a renewal divide among the processes as its SVDs do); the
    projection reaches the others by a sum (the owner's matrix, zeros from the others: exact); then each keeps its
    part of the projection (:func:`_keep_my_rows`)."""
    m, n = p.shape
    (whole,) = yield [ToOwner(grad, p, owner)]
    if whole is not None:  # (the owner)
        ortho = projector.get_orthogonal_matrix(whole, projector.rank, "right" if right else "left")
        del whole
    else:  # (the shape and dtype of get_orthogonal_matrix's: Vh[:rank] or U[:, :rank] of the reduced SVD)
        k = min(projector.rank, m, n)
        ortho = grad.new_zeros((k, n) if right else (m, k))
    (projector.ortho_matrix,) = yield [Along(ortho, p)]
    _keep_my_rows(projector, rows, right)


def _keep_my_rows(projector: Any, rows: torch.Tensor, right: bool) -> None:
    """After a renewal: ``m < n``, the projection ``O`` (``[m, r]``) is kept as this process's rows of it; ``m >= n``,
    ``O`` (``[r, n]``) whole on every process."""
    if not right:
        projector.ortho_matrix = projector.ortho_matrix[rows].clone()


def _project(
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


def _project_back(update: torch.Tensor, projector: Any, right: bool, cols: torch.Tensor) -> torch.Tensor:
    """GaLore's ``project_back`` onto this process's block: ``m >= n``, ``U @ P[:, C]``; ``m < n``, ``P[R] @ U``
    (``P`` kept as this process's rows); times the projector's scale."""
    if right:
        return torch.matmul(update, projector.ortho_matrix[:, cols]) * projector.scale
    return torch.matmul(projector.ortho_matrix, update) * projector.scale


def _adam_on_projected(state: dict[str, Any], low: torch.Tensor, group: dict[str, Any]) -> tuple[torch.Tensor, float]:
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


def _grad(p: torch.Tensor) -> DTensor:
    """The gradient of an FSDP2 parameter that has one (a ``DTensor``, as only those are stepped)."""
    return cast(DTensor, p.grad)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _place(value: Any, p: torch.Tensor, follows: dict[int, int]) -> Any:
    """This process's part of a state tensor as the ``DTensor`` of the whole, on ``p``'s mesh: its dimension ``i``
    follows ``p``'s dimension ``follows[i]`` (sharded where that one is, as it is), the others are whole; scalars,
    numbers and the state of a plain ``p`` as they are."""
    if not isinstance(p, DTensor) or not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    placements: list[Any] = []
    for pl in p.placements:
        dim = next((i for i, d in follows.items() if is_shard(pl, (d,))), None)
        placements.append(Replicate() if dim is None else shard_like(pl, dim))
    shape = tuple(p.shape[follows[i]] if i in follows else size for i, size in enumerate(value.shape))
    return DTensor.from_local(
        value, p.device_mesh, placements, run_check=False, shape=torch.Size(shape), stride=_contiguous_strides(shape)
    )


def is_sharded(params: list[torch.Tensor]) -> bool:
    """Whether these are FSDP2's sharded parameters (``DTensor`` s)."""
    return any(isinstance(p, DTensor) for p in params)
