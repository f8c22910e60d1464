"""Whole matrices on one owner: a process's block sent to the process that needs the whole matrix (a projection
renewal's SVD, an orthogonalization), the way back of a whole result to the processes that split it, and the deal
that says which process owns which matrix.

A :class:`ToOwner` part goes to its owner alone, the round's blocks in one ``all_to_all`` per set of mesh dimensions
(:func:`~lightning_optims.distributed.placements.indices_at` tells any process where another's block lies): a process
receives only the matrices it owns, so the bytes and the memory of the work divide among the processes as the work
does. A :class:`FromOwner` part goes the other way: the owner sends each process its block of a whole matrix, in one
``all_to_all`` too. :func:`deal` assigns the matrices by cost, the same on every process.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from lightning_optims.distributed.placements import indices_at, reduction_key, shard_coordinate, sharding

__all__ = ["FromOwner", "ToOwner", "deal", "gather_to_owners", "scatter_from_owners", "whole_matrix_cost"]


class ToOwner(NamedTuple):
    """This process's part (its block: :func:`local_indices`) of the matrix ``param``, to be assembled whole on one of
    the processes that split it, ``owner`` (an index as :func:`shard_coordinate` numbers them): the owner gets the
    whole matrix, the others ``None``. Each process sends its block to the owner alone (the blocks are disjoint:
    exact), so a process receives only the matrices it owns."""

    tensor: torch.Tensor
    param: Any
    owner: int


class FromOwner(NamedTuple):
    """The matrix ``param``'s whole ``tensor`` on its ``owner`` (``None`` on the other processes), of which each
    process that splits ``param`` receives its own block (:func:`local_indices`), in ``dtype``: the way back of a
    whole-matrix result (an orthogonalized update) to the processes that step its parts. Exact: the owner's values,
    sent."""

    tensor: torch.Tensor | None
    param: Any
    owner: int
    dtype: torch.dtype


def gather_to_owners(parts: list[ToOwner], indices: list[int], results: list[Any]) -> None:
    """Assemble each :class:`ToOwner` part's matrix on its owner (``results[i]``; ``None`` on the other processes),
    for parts split over the same mesh dimensions, in one ``all_to_all``: each process sends each owner its blocks
    of the matrices that owner takes (each block padded to the largest of the processes' blocks of its matrix, so
    that every process sends an owner the same number of elements), and receives the blocks of the matrices it
    takes; where each process's block goes, every process computes (:func:`indices_at`)."""
    group, me, size, places, widths, order = _exchange(parts)
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


def scatter_from_owners(parts: list[FromOwner], indices: list[int], results: list[Any]) -> None:
    """Each process's block of each :class:`FromOwner` part's matrix, from its owner (``results[i]``), for parts split
    over the same mesh dimensions, in one ``all_to_all``: each owner sends each other process that process's blocks
    of the matrices it owns (each padded to the largest of the processes' blocks of its matrix, as
    :func:`gather_to_owners` sends them), in the order of the parts, and keeps its own blocks without sending them;
    every process knows the layout from the shapes and placements alone."""
    p = parts[0].param
    group, me, size, places, widths, order = _exchange(parts)
    mine = [k for k in order if parts[k].owner == me]
    dtype = parts[0].dtype

    def block(k: int, member: int) -> torch.Tensor:
        whole = parts[k].tensor
        assert whole is not None, "the owner of a FromOwner part holds its whole matrix"
        rows, cols = places[k][member]
        return whole[rows.unsqueeze(1), cols].to(dtype)

    chunks = [
        torch.nn.functional.pad(
            block(k, member).reshape(-1), (0, widths[k] - len(places[k][member][0]) * len(places[k][member][1]))
        )
        for member in range(size)
        if member != me
        for k in mine
    ]
    local_device = (p.to_local() if isinstance(p, DTensor) else p).device
    send = torch.cat(chunks) if chunks else torch.empty(0, dtype=dtype, device=local_device)
    each = sum(widths[k] for k in mine)
    sent = [0 if member == me else each for member in range(size)]
    received_from = [0 if o == me else sum(widths[k] for k in order if parts[k].owner == o) for o in range(size)]
    received = torch.empty(sum(received_from), dtype=dtype, device=local_device)
    dist.all_to_all_single(received, send, output_split_sizes=received_from, input_split_sizes=sent, group=group)
    at = [sum(received_from[:owner]) for owner in range(size)]
    for k in order:  # (from each owner, its matrices in order)
        owner = parts[k].owner
        if owner == me:
            results[indices[k]] = block(k, me)
            continue
        rows, cols = places[k][me]
        results[indices[k]] = received[at[owner] : at[owner] + len(rows) * len(cols)].view(len(rows), len(cols))
        at[owner] += widths[k]


def _exchange(
    parts: list[Any],
) -> tuple[Any, int, int, list[list[tuple[torch.Tensor, torch.Tensor]]], list[int], list[int]]:
    """What an exchange with the owners of ``parts`` (split over the same mesh dimensions) needs, the same on every
    process: the process group, this process's coordinate in it and its size, where each member's block of each
    part's matrix lies (rows, columns), each part's padded width (its largest block) and the parts in owner order."""
    p = parts[0].param
    group, members = _group_over(p, sharding(p))
    me, size = shard_coordinate(p)
    places = [[(indices_at(part.param, 0, c), indices_at(part.param, 1, c)) for c in members] for part in parts]
    widths = [max(len(rows) * len(cols) for rows, cols in where) for where in places]
    order = sorted(range(len(parts)), key=lambda k: parts[k].owner)  # (by owner: what goes to each, in turn)
    return group, me, size, places, widths, order


def whole_matrix_cost(shape: tuple[int, ...]) -> int:
    """The work of a whole-matrix factorization or iteration on ``[m, n]`` (a reduced SVD, a Newton-Schulz
    iteration), up to a constant: ``m * n * min(m, n)``; what :func:`deal` balances."""
    m, n = shape
    return m * n * min(m, n)


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


def deal(matrices: list[torch.Tensor], cost: Callable[[tuple[int, ...]], int]) -> dict[torch.Tensor, int]:
    """Which process owns each matrix, as :func:`~lightning_optims.distributed.placements.shard_coordinate` numbers
    the processes that split it: the matrices are dealt by ``cost`` (of the shape), the largest first, each to the
    process of its group with the least work so far (longest processing time first: the busiest process's work is
    within 4/3 of the least possible; ties to the matrix that comes first and the lowest coordinate), so that the
    work, the whole matrices the owners receive, and its time divide among the processes. Every process computes the
    same deal: it depends on shapes and placements only. Matrices split over different mesh dimensions are dealt
    apart (each group numbers its own processes, and a process does not see another replica's deal: under 2-D the
    head, which FSDP2 alone splits, is dealt without the decoder layers' matrices); each replica of a replicated mesh
    dimension deals its own. A plain tensor or one no mesh dimension splits: this process (0)."""
    owners: dict[torch.Tensor, int] = {}
    work: dict[tuple[str, ...], list[int]] = {}
    for p in sorted(matrices, key=lambda p: -cost(tuple(p.shape))):  # (a stable sort: ties keep their order)
        load = work.setdefault(reduction_key(p), [0] * shard_coordinate(p)[1])
        owners[p] = min(range(len(load)), key=lambda k: (load[k], k))
        load[owners[p]] += cost(tuple(p.shape))
    return owners
