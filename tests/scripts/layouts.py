"""Run by tests/test_strategies.py: builds each distributed layout Lightning's ModelParallelStrategy offers on one
process (every mesh dimension of size 1, gloo), exactly as a user's ``configure_model`` builds it, and prints as JSON
the layout the compatibility rules see and the message each optimizer gets:

    python tests/scripts/layouts.py OPTIM [OPTIM ...]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from lightning_optims import rules
from lightning_optims.distributed.layout import layout as layout_of
from tests.helpers import LlamaModule, leave_process_group, tiny_llama
from tests.test_reliability import settings

PLAN = {
    **{f"self_attn.{n}": ColwiseParallel() for n in ("q_proj", "k_proj", "v_proj")},
    "self_attn.o_proj": RowwiseParallel(),
    **{f"mlp.{n}": ColwiseParallel() for n in ("gate_proj", "up_proj")},
    "mlp.down_proj": RowwiseParallel(),
}


def build(layout: str, optim: str) -> LlamaModule:
    module = LlamaModule(model=tiny_llama(), **settings(optim))
    layers = module.model.model.layers
    if layout == "fsdp2":
        mesh = init_device_mesh("cpu", (1,))
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(module.model, mesh=mesh)
    elif layout == "hsdp":
        mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("replicate", "shard"))
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(module.model, mesh=mesh)
    elif layout == "tp":  # only the decoder layers parallelised: embeddings, norms and head stay plain tensors
        mesh = init_device_mesh("cpu", (1,))
        for layer in layers:
            parallelize_module(layer, mesh, PLAN)
    elif layout == "2d":
        mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
        for layer in layers:
            parallelize_module(layer, mesh["tensor_parallel"], PLAN)
            fully_shard(layer, mesh=mesh["data_parallel"])
        fully_shard(module.model, mesh=mesh["data_parallel"])
    return module


def main(optims: list[str]) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("gloo", rank=0, world_size=1)
    trainer = SimpleNamespace(
        strategy=ModelParallelStrategy(),
        gradient_clip_val=None,
        accumulate_grad_batches=1,
        world_size=1,
        precision_plugin=SimpleNamespace(),
        estimated_stepping_batches=10,
        callbacks=[],
    )
    out: dict = {}
    for layout in ("fsdp2", "hsdp", "tp", "2d"):
        for optim in optims:
            module = build(layout, optim)
            try:
                rules.check(trainer, module)
                message = None
            except Exception as error:  # (the message is the result)
                message = f"{type(error).__name__}: {error}"
            out[f"{layout} {optim}"] = {"layout": layout_of(module), "message": message}
    print(json.dumps(out))


if __name__ == "__main__":
    torch.manual_seed(0)
    main(sys.argv[1:])
    leave_process_group()
