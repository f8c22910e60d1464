"""The sharded-step engine: an optimizer whose update reads whole rows, columns or tensors, stepped on each process's
part of ``DTensor`` parameters in any layout (FSDP2, HSDP, tensor parallel, 2-D; plain tensors among them), with the
numbers of one device and no gathered parameter.

The engine knows no family. It asks the family one object, a :class:`PartStep` (the sharded-step protocol): whether
a parameter steps on its part with the family's step or element by element with the upstream step; the family's step
on a part, a generator that yields what it needs summed (:class:`~lightning_optims.distributed.sums.Along`) or sent
whole to an owner (:class:`~lightning_optims.distributed.owners.ToOwner`) and keeps its state as the parameter's
dimensions it follows say; which matrices need an owner and what each costs (the deal); and how objects in its state
(a projector) become plain values a checkpoint holds. :class:`ShardedStepOptimizer` runs every parameter's step in
lockstep, its sums batched into one all-reduce per mesh dimension per round; the layer-wise engine
(:mod:`~lightning_optims.engines.sharded_layerwise`) runs the same steps an FSDP2 group at a time. State tensors are
``DTensor`` s placed like the parameter dimensions they follow, so Lightning's distributed checkpoint saves and
reshards them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, cast

import torch
from torch.distributed.tensor import DTensor

from lightning_optims.distributed.owners import deal
from lightning_optims.distributed.placements import local, local_indices, place
from lightning_optims.distributed.sums import ShardSums, Sums

__all__ = ["PartStep", "ShardedStepOptimizer", "Unsupported", "grad_of"]


class Unsupported(NamedTuple):
    """Settings a family's step on a part cannot take: the setting as the user wrote it (``proj_type='full'``), why,
    and what to use instead (a sentence)."""

    setting: str
    why: str
    instead: str


class PartStep:
    """How a family steps one parameter on this process's part (the sharded-step protocol). A family subclasses it
    and hands an instance to the engine (``Sharding(part_step=...)`` in its spec); the defaults describe a family
    whose every group steps element by element."""

    def elementwise(self, group: dict[str, Any]) -> bool:
        """The group's parameters step with the upstream step on this process's part, element by element, with no
        collective."""
        return True

    def steps_on_part(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        """``p`` steps with :meth:`step` (asked where the group is not :meth:`elementwise`)."""
        return False

    def step(self, parts: ShardedStepOptimizer, p: DTensor, group: dict[str, Any]) -> Sums:
        """The family's step of ``p`` on this process's part: yields the parts it needs summed or sent to an owner,
        receives the results; reads and keeps its state through ``parts`` (:meth:`ShardedStepOptimizer.state_of`,
        :meth:`ShardedStepOptimizer.keep_state`)."""
        raise NotImplementedError
        yield []

    def unsupported(self, options: dict[str, Any]) -> Unsupported | None:
        """Why a group with these options (or these ``optim_args``) has no step on a part (refused when ``fit``
        starts), else ``None``."""
        return None

    def owns(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        """``p``'s step needs the whole matrix on one process at times: it is dealt an owner by :meth:`cost`."""
        return False

    def cost(self, shape: tuple[int, ...]) -> int:
        """The work of a matrix's whole-matrix step, up to a constant (the deal balances it)."""
        return 0

    def encode(self, state: dict[str, Any]) -> dict[str, Any]:
        """The state with each object replaced by a dict of plain values (tensors, numbers), which a checkpoint
        holds; the engine stores ``key.field`` entries."""
        return state

    def decode(self, state: dict[str, Any]) -> dict[str, Any]:
        """The inverse of :meth:`encode`."""
        return state


class ShardedStepOptimizer(torch.optim.Optimizer):
    """``optimizer_cls`` over sharded parameters, each stepped on this process's part (see the module docstring).

    ``param_groups`` are the groups transformers' Trainer builds, over the sharded parameters: schedulers, Lightning's
    clipping and learning-rate monitor see them as usual.
    """

    def __init__(
        self, param_groups: list[dict[str, Any]], optimizer_cls: type, kwargs: dict[str, Any], part_step: PartStep
    ) -> None:
        super().__init__(param_groups, dict(kwargs))
        self._optimizer_cls, self._kwargs, self._part_step = optimizer_cls, dict(kwargs), part_step
        params = [p for g in self.param_groups for p in g["params"]]
        self._position = {p: i + 1 for i, p in enumerate(params)}  # 1-based position among all parameters
        # which process owns each matrix whose step needs it whole (dealt by the family's cost)
        self._owners = deal([p for g in self.param_groups for p in g["params"] if part_step.owns(p, g)], part_step.cost)
        self._inner: dict[torch.Tensor, torch.optim.Optimizer] = {}
        self._indices: dict[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] = {}
        # every parameter steps on this process's part: element by element, or on the family's step
        without = [
            (tuple(p.shape), group)
            for group in self.param_groups
            for p in group["params"]
            if not part_step.elementwise(group) and not part_step.steps_on_part(p, group)
        ]
        if without:
            shape, group = without[0]
            reason = part_step.unsupported({k: v for k, v in group.items() if k != "params"})
            why = f"{reason.setting}: {reason.why}. {reason.instead}" if reason else "no step on a part"
            raise ValueError(
                f"{optimizer_cls.__name__} with these settings has no step on a part of a sharded parameter "
                f"({len(without)} parameters, the first of shape {shape}): {why}"
            )

    # -- what a family's step asks ----------------------------------------------------------------------------------

    def inner_for(self, p: torch.Tensor, group: dict[str, Any]) -> torch.optim.Optimizer:
        """The upstream optimizer for ``p``, over a placeholder: a family's step reads its options and methods; the
        elementwise step puts ``p``'s part in it for the step and takes it out again."""
        if p not in self._inner:
            options = {k: v for k, v in group.items() if k != "params"}
            inner = self._optimizer_cls([{"params": [torch.empty(0)], **options}], **self._kwargs)
            inner.state.clear()  # (the state comes from the shards)
            self._inner[p] = inner
        return self._inner[p]

    def position(self, p: torch.Tensor) -> int:
        """``p``'s 1-based position among all the optimizer's parameters (the layer-wise engine: 1, each parameter
        being its own optimizer's only one)."""
        return self._position[p]

    def owner(self, p: torch.Tensor) -> int:
        """The process that owns ``p`` for a whole-matrix step (:func:`~lightning_optims.distributed.owners.deal`)."""
        return self._owners[p]

    def block(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The global indices of this process's rows and columns of the matrix ``p`` (any placement, the
        strided shard included), computed once."""
        if p not in self._indices:
            self._indices[p] = (local_indices(p, 0), local_indices(p, 1))
        return self._indices[p]

    def state_of(self, p: torch.Tensor) -> dict[str, Any]:
        """``p``'s state for a family's step: each ``DTensor`` as this process's part, objects decoded."""
        state, _ = self._unflatten_state(self.state.get(p, {}))
        return state

    def keep_state(self, p: torch.Tensor, state: dict[str, Any], follows: dict[str, dict[int, int]]) -> None:
        """Keep ``p``'s state after a family's step: a state tensor named ``key`` (or a field ``key`` of an encoded
        object) is placed along ``p``'s dimensions as ``follows[key]`` maps its dimensions (missing: whole on every
        process)."""
        self.state[p] = self._flatten_state(
            state, {}, lambda key, value: place(value, p, follows.get(key.split(".")[-1], {})), self.state.get(p)
        )

    # -- the state as a checkpoint holds it ---------------------------------------------------------------------------

    def _unflatten_state(self, flat: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The optimizer's state entry and what it keeps in its param group, from one flat entry: each ``DTensor`` as
        this process's part; ``key.field`` entries gathered and decoded by the family."""
        state: dict[str, Any] = {}
        group_state: dict[str, Any] = {}
        with torch.no_grad():  # (each DTensor's local tensor itself, not a view: _flatten_state knows it again)
            for key, value in flat.items():
                if isinstance(value, DTensor):
                    value = value.to_local()
                if key.startswith("group."):
                    group_state[key[len("group.") :]] = value
                elif "." in key:
                    name, _, field = key.partition(".")
                    state.setdefault(name, {})[field] = value
                else:
                    state[key] = value
        return self._part_step.decode(state), group_state

    def _flatten_state(
        self,
        state: dict[str, Any],
        group_state: dict[str, Any],
        place_value: Callable[[str, Any], Any],
        previous: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """One flat entry (torch's distributed checkpoint saves it like any optimizer's), each value as
        ``place_value`` lays it out: an object's fields (the family's :meth:`PartStep.encode`) under ``key.``; what
        the optimizer keeps in its param group (per parameter here, as each parameter has its own inner optimizer)
        under ``group.``. A tensor the step updated in place (the local tensor of ``previous``'s ``DTensor`` under
        that key) keeps that ``DTensor``: each step wraps only what is new (building a ``DTensor`` costs more than a
        small update)."""
        previous = previous or {}

        def placed(key: str, value: Any) -> Any:
            old = previous.get(key)
            if isinstance(old, DTensor) and old.to_local() is value:
                return old
            return place_value(key, value)

        flat: dict[str, Any] = {}
        for key, value in self._part_step.encode(state).items():
            if isinstance(value, dict):
                flat.update({f"{key}.{field}": item for field, item in value.items()})
            else:
                flat[key] = value
        flat.update({f"group.{key}": value for key, value in group_state.items()})
        with torch.no_grad():  # (to_local() without grad is the local tensor itself)
            return {key: placed(key, flat[key]) for key in sorted(flat)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch's load_state_dict rebuilds containers value by value (a str character by character) and casts every
        # tensor but "step" to the parameter's dtype: give it the sharded tensors only and put the other values
        # (numbers, strings, 0-d tensors such as a step count) back as they are
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
        on_parts = []  # the family's steps: their sums batched
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:  # (the same on every process: FSDP2)
                    continue
                if self.on_part(p, group):
                    on_parts.append(self._part_step.step(self, cast(DTensor, p), group))
                else:
                    self._step(cast(DTensor, p), group)
        if on_parts:
            ShardSums().lockstep(on_parts)
        return loss

    def on_part(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        """``p`` steps with the family's step (else with the upstream step, element by element)."""
        return not self._part_step.elementwise(group) and self._part_step.steps_on_part(p, group)

    def _step(self, p: DTensor, group: dict[str, Any]) -> None:
        """The upstream step of an elementwise group on this process's part of ``p``, its gradient and its state (the
        part of the whole step's result)."""
        inner = self.inner_for(p, group)
        (inner_group,) = inner.param_groups
        for key, value in group.items():
            if key != "params":
                inner_group[key] = value
        rows = local(p).detach()  # (the parameter's own storage: updated in place)
        rows.grad = local(grad_of(p)).detach().to(rows.dtype)
        inner_group["params"] = [rows]
        inner.state[rows], group_state = self._unflatten_state(self.state.get(p, {}))
        inner_group.update(group_state)
        inner.step()
        kept = {k: v for k, v in inner_group.items() if k != "params" and k not in group}
        like_p = {d: d for d in range(p.dim())}
        self.state[p] = self._flatten_state(
            inner.state.pop(rows), kept, lambda key, value: place(value, p, like_p), self.state.get(p)
        )
        inner_group["params"] = [torch.empty(0)]


def grad_of(p: torch.Tensor) -> DTensor:
    """The gradient of a sharded parameter that has one (a ``DTensor``, as only those are stepped)."""
    return cast(DTensor, p.grad)
