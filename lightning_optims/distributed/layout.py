"""What a strategy does with the parameters, and which layout a sharded model has."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
)

__all__ = ["SHARDED_STRATEGIES", "layout", "plain_data_parallel"]

# strategies that shard or flatten parameters (DeepSpeed needs its package to be instantiated, not to be named)
SHARDED_STRATEGIES = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)


def plain_data_parallel(strategy: Any) -> bool:
    """One device, or DDP with whole parameters on every process (DeepSpeed subclasses DDPStrategy: not it)."""
    return isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) and not isinstance(strategy, SHARDED_STRATEGIES)


def layout(module: Any) -> tuple[str, str] | None:
    """How the module's trainable parameters are distributed, as the user built it: ``FSDP2`` (``fully_shard`` on a
    1-D mesh, every parameter sharded on dim 0), ``HSDP`` (``fully_shard`` on a replicate x shard mesh), ``tensor
    parallel`` (``parallelize_module`` without ``fully_shard``) or ``2-D (tensor parallel + FSDP2)``; with an example
    parameter. None when no parameter is a ``DTensor``."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, Replicate, Shard

    params = [(n, p) for n, p in module.optimized_module().named_parameters() if p.requires_grad]
    sharded = [(n, p) for n, p in params if isinstance(p, DTensor)]
    if not sharded:
        return None
    plain = [n for n, p in params if not isinstance(p, DTensor)]
    fsdp = any(isinstance(m, FSDPModule) for m in module.modules())
    meshes = {p.device_mesh for _, p in sharded}
    placements = {tuple(p.placements) for _, p in sharded}

    def example(name: str, p: Any) -> str:
        return f"{name!r}: placements {tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh"

    odd = next(((n, p) for n, p in sharded if tuple(p.placements) != (Shard(0),)), sharded[0])
    if not fsdp:
        where = example(*odd) + (f"; {plain[0]!r} left a plain tensor" if plain else "")
        return "tensor parallel", where
    if plain:
        return "FSDP2 with parameters left unsharded", f"{plain[0]!r} is a plain tensor"
    if len(meshes) == 1 and placements == {(Shard(0),)} and next(iter(meshes)).ndim == 1:
        return "FSDP2", example(*sharded[0])
    if placements == {(Replicate(), Shard(0))}:
        return "HSDP", example(*sharded[0])
    return "2-D (tensor parallel + FSDP2)", example(*odd)
