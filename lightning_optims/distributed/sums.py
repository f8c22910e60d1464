"""Reductions over the placements of sharded parameters: what a step on this process's part needs to get the
numbers of the whole tensor.

A statistic along a tensor dimension (a row mean sums along dim 1, a column sum along dim 0, a norm or an RMS along
all) is a sum of the processes' parts over exactly the mesh dimensions that shard that tensor dimension
(:func:`~lightning_optims.distributed.placements.sharding`). :class:`ShardSums` completes many such parts at once
(an :class:`Along` each), flattened into one all-reduce per mesh dimension involved, so a step issues a fixed, small
number of collectives whatever the number of parameters; :class:`~lightning_optims.distributed.owners.ToOwner` parts
go to their owner in the same call, and :class:`~lightning_optims.distributed.owners.FromOwner` parts from it.
``lockstep`` batches the rounds of steps written as generators (:data:`Sums`), and :class:`Rounds` spreads such
rounds over several calls (the layer-wise engine starts an FSDP2 group's steps in the round that continues the
previous group's). On one process nothing is communicated.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from lightning_optims.compat import flatten_dense, unflatten_dense
from lightning_optims.distributed.owners import FromOwner, ToOwner, gather_to_owners, scatter_from_owners
from lightning_optims.distributed.placements import mesh_dim_key, reduction_key, sharding

__all__ = ["Along", "Rounds", "ShardSums", "Sums"]

#: a step written as a generator: it yields the parts it needs summed (or sent to an owner) and receives the results
Sums = Generator[list[Any], list[Any], None]


class Along(NamedTuple):
    """A part to sum over the processes that shard ``param``'s tensor dimensions ``dims`` (None: all of them): a
    reduction along those dimensions (a row statistic sums along dim 1, a column one along dim 0, a norm along all)
    completed from each process's part."""

    tensor: torch.Tensor
    param: Any
    dims: tuple[int, ...] | None = None


class ShardSums:
    """Sums of tensors over the processes that shard them, many at once: ``sums(parts)`` returns, for each part, the
    sum of every process's part; on one process the parts themselves. A part is an :class:`Along` (summed over the
    mesh dimensions that shard the given dimensions of its parameter: any layout) or a plain tensor (the same on
    every process: returned as it is). The parts are flattened into one all-reduce per mesh dimension involved (a
    part sharded over two mesh dimensions is summed over one, then the other), in an order every process shares."""

    def sums(self, parts: list[Any]) -> list[Any]:
        results = [part.tensor if isinstance(part, (Along, ToOwner)) else part for part in parts]
        rounds: dict[str, tuple[Any, list[int]]] = {}
        owned: dict[tuple[str, ...], list[int]] = {}
        returned: dict[tuple[str, ...], list[int]] = {}
        for index, part in enumerate(parts):
            if isinstance(part, FromOwner):
                if sharding(part.param):
                    returned.setdefault(reduction_key(part.param), []).append(index)
                else:  # (a plain tensor: its owner is this process)
                    assert part.tensor is not None
                    results[index] = part.tensor.to(part.dtype)
            elif isinstance(part, ToOwner):
                if sharding(part.param):
                    owned.setdefault(reduction_key(part.param), []).append(index)
            elif isinstance(part, Along):
                for i in sharding(part.param, part.dims):
                    key = mesh_dim_key(part.param, i)
                    rounds.setdefault(key, (part.param.device_mesh.get_group(i), []))[1].append(index)
        for key in sorted(rounds):
            group, indices = rounds[key]
            chosen = [results[i] for i in indices]
            flat = flatten_dense(chosen)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            for i, summed in zip(indices, unflatten_dense(flat, chosen)):
                results[i] = summed
        for mesh_dims in sorted(owned):
            gather_to_owners([parts[i] for i in owned[mesh_dims]], owned[mesh_dims], results)
        for mesh_dims in sorted(returned):
            scatter_from_owners([parts[i] for i in returned[mesh_dims]], returned[mesh_dims], results)
        return results

    def lockstep(self, steps: list[Generator[list[Any], list[torch.Tensor], None]]) -> None:
        """Run several parameters' steps written as generators that yield the tensors they need summed and receive
        the sums: each round, what every step yields goes into one all-reduce. Every process runs the same steps
        with the same rounds (they depend on shapes and settings only), so the collectives line up."""
        rounds = Rounds(self)
        rounds.advance(steps)
        rounds.drain()


class Rounds:
    """Steps in lockstep (as :meth:`ShardSums.lockstep`) spread over several calls, so that steps started at
    different times share rounds: each :meth:`advance` runs one round, of the steps in flight and of those it
    starts; :meth:`drain` finishes them. A layer-wise optimizer starts each FSDP2 group's steps when the group's
    gradients are reduced: their second round runs with the next group's first, so a backward issues about one
    round per group, not one per group and round."""

    def __init__(self, sums: ShardSums) -> None:
        self._sums = sums
        self._flight: list[tuple[Generator[list[Any], list[torch.Tensor], None], list[Any]]] = []

    def advance(
        self,
        steps: list[Generator[list[Any], list[torch.Tensor], None]],
        first: list[Any] | None = None,
        check: Callable[[list[torch.Tensor]], None] | None = None,
    ) -> None:
        """One round: the ``first`` parts, the next parts of the steps in flight and the first parts of ``steps``,
        summed together. ``check`` receives the sums of ``first`` before any step does; if it raises, ``steps``
        are dropped before they write anything, the steps in flight are finished, and the error propagates."""
        new = []
        for step in steps:
            try:
                new.append((step, next(step)))
            except StopIteration:
                pass
        extra = list(first or [])
        if not (extra or self._flight or new):
            return
        summed = self._sums.sums(
            [*extra, *(t for _, parts in self._flight for t in parts), *(t for _, parts in new for t in parts)]
        )
        error: Exception | None = None
        if check is not None:
            try:
                check(summed[: len(extra)])
            except Exception as caught:  # (after the steps in flight are finished)
                error = caught
        summed = summed[len(extra) :]
        running = self._flight if error is not None else [*self._flight, *new]
        self._flight, at = [], 0
        for step, parts in running:
            result, at = summed[at : at + len(parts)], at + len(parts)
            try:
                self._flight.append((step, step.send(result)))
            except StopIteration:
                pass
        if error is not None:
            self.drain()
            raise error

    def drain(self) -> None:
        """The remaining rounds of the steps in flight."""
        while self._flight:
            self.advance([])
