"""Reductions over the placements of sharded parameters: what a family's step on this process's part needs to get
the numbers of the whole tensor.

A statistic along a tensor dimension (a row mean sums along dim 1, a column sum along dim 0, a norm or an RMS along
all) is a sum of the processes' parts over exactly the mesh dimensions that shard that tensor dimension:
:func:`sharding` names them (``Shard(d)`` and torch's strided shard of ``d``; a ``Replicate`` mesh dimension holds the
same numbers, a plain tensor is whole). :class:`ShardSums` completes many such parts at once (an :class:`Along` each),
flattened into one all-reduce per mesh dimension involved, so a step issues a fixed, small number of collectives
whatever the number of parameters; ``lockstep`` batches the rounds of steps written as generators, and
:class:`Rounds` spreads such rounds over several calls (the layer-wise engine starts an FSDP2 group's steps in the
round that continues the previous group's). A :class:`ToOwner` part (a block of a matrix that one process needs
whole: a projection renewal's SVD) goes to that process alone, the round's blocks in one ``all_to_all`` per set of
mesh dimensions (:func:`indices_at` tells any process where another's block lies). On one process nothing is
communicated.

The layouts: FSDP2 on one mesh dimension (``Shard(0)``); HSDP (``(Replicate(), Shard(0))``: FSDP2 reduce-scatters each
gradient over the shard dimension and all-reduces it over the replicate dimension before its post-accumulate-grad
hooks and ``optimizer.step``, so the replicas hold the same rows of the same gradient); tensor parallelism
(column-parallel weights ``Shard(0)``, row-parallel ``Shard(1)``, the rest often plain tensors); both (2-D, where
FSDP2 shards a column-parallel weight's rows again: a strided shard of dim 0). State tensors are placed along the
dimensions of the parameter they follow (:func:`state_along`); :func:`local_indices` gives a process's global rows or
columns (APOLLO's and GaLore's projections).

Used by the in-backward engine (LOMO's norm, AdaLomo's per-bucket statistics), the layer-wise engine (its groups'
steps, norm and non-finite flag), the sharded steps of Adafactor, StableAdamW and GrokAdamW, and the block steps of
APOLLO and GaLore (AdamW, Adafactor).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Iterable
from typing import Any, NamedTuple, cast

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate

from lightning_optims.compat import flatten_dense, is_shard, shard_like, split_indices, unflatten_dense

__all__ = [
    "Along",
    "Rounds",
    "ShardSums",
    "ToOwner",
    "indices_at",
    "local",
    "local_indices",
    "reduction_key",
    "replicated",
    "rows_placements",
    "shard_coordinate",
    "sharding",
    "state_along",
    "state_like",
]


def local(tensor: Any) -> Any:
    """This process's part of a ``DTensor``; a plain tensor as it is. In-place writes to it write the tensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def rows_placements(p: DTensor) -> list[Any]:
    """The placements of a tensor with ``p``'s rows, laid out like ``p``."""
    return list(p.placements)


def replicated(p: DTensor) -> list[Any]:
    """The placements of a tensor every process of ``p``'s mesh holds whole."""
    return [Replicate()] * p.device_mesh.ndim


def sharding(p: Any, dims: Iterable[int] | None = None) -> list[int]:
    """The mesh dimensions whose placement shards one of ``p``'s tensor dimensions ``dims`` (all of them: None), by
    ``Shard(d)`` or torch's strided shard of ``d`` (FSDP2 over tensor parallelism on the same dimension); ``Replicate``
    mesh dimensions hold the same numbers and are not among them. Empty for a plain tensor."""
    if not isinstance(p, DTensor):
        return []
    wanted = set(range(p.dim())) if dims is None else {d % p.dim() for d in dims}
    return [i for i, pl in enumerate(p.placements) if is_shard(pl, wanted)]


class Along(NamedTuple):
    """A part to sum over the processes that shard ``param``'s tensor dimensions ``dims`` (None: all of them): a
    reduction along those dimensions (a row statistic sums along dim 1, a column one along dim 0, a norm along all)
    completed from each process's part."""

    tensor: torch.Tensor
    param: Any
    dims: tuple[int, ...] | None = None


class ToOwner(NamedTuple):
    """This process's part (its block: :func:`local_indices`) of the matrix ``param``, to be assembled whole on one of
    the processes that split it, ``owner`` (an index as :func:`shard_coordinate` numbers them): the owner gets the
    whole matrix, the others ``None``. Each process sends its block to the owner alone (the blocks are disjoint:
    exact), so a process receives only the matrices it owns."""

    tensor: torch.Tensor
    param: Any
    owner: int


def _mesh_dim_key(p: DTensor, i: int) -> str:
    """A name for mesh dimension ``i`` of ``p``'s mesh that is the same on every process and for every mesh that
    shares the dimension (a 2-D mesh and its 1-D data-parallel sub-mesh): its name, else its index and mesh shape."""
    names = p.device_mesh.mesh_dim_names
    return names[i] if names else f"#{i} of {tuple(p.device_mesh.shape)}"


def local_indices(p: Any, dim: int) -> torch.Tensor:
    """The global indices along ``p``'s dimension ``dim`` of this process's part, in its order (torch's
    strided shards included); every index for a plain tensor or a dimension no mesh dimension splits. No
    collective: each process splits the index vector as its part of ``p`` was split."""
    if not sharding(p, (dim,)):
        return torch.arange(p.shape[dim], device=local(p).device)
    return indices_at(p, dim, tuple(p.device_mesh.get_coordinate()))


def indices_at(p: DTensor, dim: int, coordinate: tuple[int, ...]) -> torch.Tensor:
    """The global indices along ``p``'s dimension ``dim`` held by the process at ``coordinate`` on ``p``'s mesh: the
    index vector split mesh dimension after mesh dimension as ``distribute_tensor`` splits a tensor (each ``Shard`` /
    strided shard placement's own split, without padding), that process's chunk kept each time. No
    collective: any process computes any other's."""
    indices = torch.arange(p.shape[dim], device=local(p).device)
    for i, pl in enumerate(p.placements):
        if is_shard(pl, (dim,)):
            indices = split_indices(pl, indices, p.device_mesh.size(i))[coordinate[i]]
    return indices


def shard_coordinate(p: Any) -> tuple[int, int]:
    """This process's index among the processes that hold different parts of ``p`` (row-major over the mesh
    dimensions that shard it: :func:`sharding`), and their number; ``(0, 1)`` for a plain or unsplit tensor."""
    coordinate, size = 0, 1
    for d in sharding(p):
        width = p.device_mesh.size(d)
        coordinate, size = coordinate * width + p.device_mesh.get_local_rank(d), size * width
    return coordinate, size


def reduction_key(p: Any, dims: Iterable[int] | None = None) -> tuple[str, ...]:
    """What a sum along ``p``'s tensor dimensions ``dims`` (None: all) is completed over, as names every process
    shares: parameters with the same key can have their parts summed together (``()``: nothing to sum)."""
    return tuple(_mesh_dim_key(p, i) for i in sharding(p, dims))


def state_along(p: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """A zero fp32 state tensor whose dimensions are ``p``'s dimensions ``dims`` (``(0,)``: one number per row,
    ``(1,)``: per column, ``(0, 1)``: like ``p``), placed as ``p`` places those dimensions (sharded where ``p`` is,
    strided shards included, replicated elsewhere) so that this process's part lines up with its part of ``p``,
    and Lightning's distributed checkpoint saves and reshards it; a plain tensor for a plain ``p``."""
    part = local(p)
    local_shape = tuple(part.shape[d] for d in dims)
    if not isinstance(p, DTensor):
        return torch.zeros(local_shape, dtype=torch.float32, device=part.device)
    shape = tuple(p.shape[d] for d in dims)
    placements = [
        shard_like(pl, dims.index(pl.dim)) if is_shard(pl, dims) else Replicate()
        for pl in cast(list[Any], p.placements)
    ]
    zeros = torch.zeros(local_shape, dtype=torch.float32, device=part.device)
    strides = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(
        zeros, p.device_mesh, placements, run_check=False, shape=torch.Size(shape), stride=strides
    )


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
        for index, part in enumerate(parts):
            if isinstance(part, ToOwner):
                if sharding(part.param):
                    owned.setdefault(reduction_key(part.param), []).append(index)
            elif isinstance(part, Along):
                for i in sharding(part.param, part.dims):
                    key = _mesh_dim_key(part.param, i)
                    rounds.setdefault(key, (part.param.device_mesh.get_group(i), []))[1].append(index)
        for key in sorted(rounds):
            group, indices = rounds[key]
            chosen = [results[i] for i in indices]
            flat = flatten_dense(chosen)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            for i, summed in zip(indices, unflatten_dense(flat, chosen)):
                results[i] = summed
        for mesh_dims in sorted(owned):
            _gather_to_owners([parts[i] for i in owned[mesh_dims]], owned[mesh_dims], results)
        return results

    def lockstep(self, steps: list[Generator[list[Any], list[torch.Tensor], None]]) -> None:
        """Run several parameters' steps written as generators that yield the tensors they need summed and receive
        the sums: each round, what every step yields goes into one all-reduce. Every process runs the same steps
        with the same rounds (they depend on shapes and settings only), so the collectives line up."""
        rounds = Rounds(self)
        rounds.advance(steps)
        rounds.drain()


def _gather_to_owners(parts: list[ToOwner], indices: list[int], results: list[Any]) -> None:
    """Assemble each :class:`ToOwner` part's matrix on its owner (``results[i]``; ``None`` on the other processes),
    for parts split over the same mesh dimensions, in one ``all_to_all``: each process sends each owner its blocks
    of the matrices that owner takes (each block padded to the largest of the processes' blocks of its matrix, so
    that every process sends an owner the same number of elements), and receives the blocks of the matrices it
    takes; where each process's block goes, every process computes (:func:`indices_at`)."""
    p = parts[0].param
    dims = sharding(p)
    group, members = _group_over(p, dims)
    me, size = shard_coordinate(p)
    places = [[(indices_at(part.param, 0, c), indices_at(part.param, 1, c)) for c in members] for part in parts]
    widths = [max(len(rows) * len(cols) for rows, cols in where) for where in places]
    order = sorted(range(len(parts)), key=lambda k: parts[k].owner)  # (by owner: what goes to each, in turn)
    send = torch.cat(
        [torch.nn.functional.pad(parts[k].tensor.reshape(-1), (0, widths[k] - parts[k].tensor.numel())) for k in order]
    )
    sent = [sum(widths[k] for k in order if parts[k].owner == owner) for owner in range(size)]
    mine = [k for k in order if parts[k].owner == me]
    each = sum(widths[k] for k in mine)
    received = send.new_empty(each * size)
    dist.all_to_all_single(received, send, output_split_sizes=[each] * size, input_split_sizes=sent, group=group)
    for i in indices:
        results[i] = None
    at = 0
    for k in mine:
        whole = parts[k].tensor.new_empty(parts[k].param.shape)
        for source, (rows, cols) in enumerate(places[k]):
            start = source * each + at
            whole[rows.unsqueeze(1), cols] = received[start : start + len(rows) * len(cols)].view(len(rows), len(cols))
        results[indices[k]] = whole
        at += widths[k]


def _group_over(p: DTensor, dims: list[int]) -> tuple[Any, list[tuple[int, ...]]]:
    """The process group of the processes that differ from this one only on the mesh dimensions ``dims`` of ``p``'s
    mesh, and their mesh coordinates in group-rank order (row-major over ``dims``: :func:`shard_coordinate`'s
    order). One mesh dimension: the mesh's own group; several (tensor parallelism and FSDP2 both splitting a
    matrix): a group made once per mesh with its members alone (``use_local_synchronization``), kept on the mesh (it
    lives as long as the mesh, not beyond the process groups it was made in)."""
    mesh = p.device_mesh
    mine = cast(list[int], mesh.get_coordinate())
    members = []
    for flat in range(math.prod(mesh.size(d) for d in dims)):
        coordinate = list(mine)
        for d in reversed(dims):
            flat, coordinate[d] = divmod(flat, mesh.size(d))
        members.append(tuple(coordinate))
    if len(dims) == 1:
        return mesh.get_group(dims[0]), members
    groups = mesh.__dict__.setdefault("_lightning_optims_groups", {})
    if tuple(dims) not in groups:
        ranks = [int(mesh.mesh[c]) for c in members]
        if ranks != sorted(ranks):  # (a group numbers its members in ascending global rank)
            raise RuntimeError(f"the processes that split a parameter on mesh dimensions {dims} are not in rank order")
        groups[tuple(dims)] = dist.new_group(ranks, use_local_synchronization=True)
    return groups[tuple(dims)], members


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


def state_like(p: torch.Tensor, shape: tuple[int, ...], sharded: bool) -> torch.Tensor:
    """A zero fp32 state tensor of the whole ``shape`` for ``p``: for an FSDP2 parameter a ``DTensor`` on its mesh,
    sharded on dim 0 like the parameter's rows (``sharded``: ``shape[0]`` is the parameter's rows) or replicated, so
    that Lightning's distributed checkpoint saves every process's part and a resume (on any number of processes)
    gets it back; for a plain parameter a plain tensor."""
    part = local(p)
    if not isinstance(p, DTensor):
        return torch.zeros(shape, dtype=torch.float32, device=part.device)
    local_shape = (part.shape[0], *shape[1:]) if sharded else shape
    zeros = torch.zeros(local_shape, dtype=torch.float32, device=part.device)
    strides = torch.empty(shape, device="meta").stride()
    placements = rows_placements(p) if sharded else replicated(p)
    return DTensor.from_local(
        zeros, p.device_mesh, placements, run_check=False, shape=torch.Size(shape), stride=strides
    )
