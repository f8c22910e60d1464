"""Where a process's part of a sharded parameter lies, and state tensors laid out like it.

A tensor dimension of a ``DTensor`` is split by the mesh dimensions whose placement shards it (:func:`sharding`:
``Shard(d)`` and torch's strided shard of ``d``; a ``Replicate`` mesh dimension holds the same numbers, a plain
tensor is whole). Any process computes where any other's part lies (:func:`indices_at`), without a collective. State
tensors are ``DTensor`` s placed along the dimensions of the parameter they follow (:func:`state_along`,
:func:`place`), so Lightning's distributed checkpoint saves and reshards them.

The layouts: FSDP2 on one mesh dimension (``Shard(0)``); HSDP (``(Replicate(), Shard(0))``: FSDP2 reduce-scatters each
gradient over the shard dimension and all-reduces it over the replicate dimension before its post-accumulate-grad
hooks and ``optimizer.step``, so the replicas hold the same rows of the same gradient); tensor parallelism
(column-parallel weights ``Shard(0)``, row-parallel ``Shard(1)``, the rest often plain tensors); both (2-D, where
FSDP2 shards a column-parallel weight's rows again: a strided shard of dim 0).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import torch
from torch.distributed.tensor import DTensor, Replicate

from lightning_optims.compat import is_shard, shard_like, split_indices

__all__ = [
    "indices_at",
    "is_sharded",
    "local",
    "local_indices",
    "mesh_dim_key",
    "place",
    "reduction_key",
    "shard_coordinate",
    "sharding",
    "state_along",
    "state_replicated",
]


def is_sharded(params: list[torch.Tensor]) -> bool:
    """Whether these are sharded parameters (``DTensor`` s: FSDP2, HSDP, tensor parallel, 2-D)."""
    return any(isinstance(p, DTensor) for p in params)


def local(tensor: Any) -> Any:
    """This process's part of a ``DTensor``; a plain tensor as it is. In-place writes to it write the tensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def sharding(p: Any, dims: Iterable[int] | None = None) -> list[int]:
    """The mesh dimensions whose placement shards one of ``p``'s tensor dimensions ``dims`` (all of them: None), by
    ``Shard(d)`` or torch's strided shard of ``d`` (FSDP2 over tensor parallelism on the same dimension); ``Replicate``
    mesh dimensions hold the same numbers and are not among them. Empty for a plain tensor."""
    if not isinstance(p, DTensor):
        return []
    wanted = set(range(p.dim())) if dims is None else {d % p.dim() for d in dims}
    return [i for i, pl in enumerate(p.placements) if is_shard(pl, wanted)]


def mesh_dim_key(p: DTensor, i: int) -> str:
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
    return tuple(mesh_dim_key(p, i) for i in sharding(p, dims))


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
    return DTensor.from_local(
        zeros, p.device_mesh, placements, run_check=False, shape=torch.Size(shape), stride=contiguous_strides(shape)
    )


def state_replicated(p: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A zero fp32 state tensor of ``shape`` that every process of ``p``'s mesh holds whole (a ``DTensor``
    replicated on it, so the distributed checkpoint saves and restores it); a plain tensor for a plain ``p``."""
    part = local(p)
    zeros = torch.zeros(shape, dtype=torch.float32, device=part.device)
    if not isinstance(p, DTensor):
        return zeros
    return DTensor.from_local(
        zeros,
        p.device_mesh,
        [Replicate()] * p.device_mesh.ndim,
        run_check=False,
        shape=torch.Size(shape),
        stride=contiguous_strides(shape),
    )


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def place(value: Any, p: torch.Tensor, follows: dict[int, int]) -> Any:
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
        value, p.device_mesh, placements, run_check=False, shape=torch.Size(shape), stride=contiguous_strides(shape)
    )
