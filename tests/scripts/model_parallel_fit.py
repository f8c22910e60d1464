"""Run by tests/test_strategies.py (Lightning's launcher re-executes this script for the second process):

    python tests/scripts/model_parallel_fit.py OPTIM OUT_FILE {sharded,single,unsharded,tp}

Fits a small MLP for 3 steps, sharded with FSDP2 (``fully_shard``) under ``ModelParallelStrategy`` on 2 CPU processes
(gloo), or on one process with the combined batches (``unsharded``: the 2 processes of ModelParallelStrategy with
a configure_model that shards nothing), or with tensor parallelism alone (``tp``: 2 processes, data_parallel_size=1,
both on the whole batch; the first linear layer ``ColwiseParallel``, the second ``RowwiseParallel``, the LayerNorm and
the last layer left plain tensors, as a user's plan commonly leaves them); rank 0 writes the full weights to OUT_FILE.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_optims import OptimizerMixin
from tests.helpers import RankInterleavedSampler, leave_process_group


class ShardedMLP(OptimizerMixin, L.LightningModule):
    def __init__(self, shard: bool | str, **kwargs) -> None:
        super().__init__(**kwargs)
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(8, 32), nn.Tanh(), nn.LayerNorm(32), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1)
        )
        self.shard = shard

    def configure_model(self) -> None:
        if self.shard == "tp":
            from torch.distributed.tensor import Replicate
            from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

            plan = {"0": ColwiseParallel(output_layouts=Replicate()), "3": RowwiseParallel(input_layouts=Replicate())}
            parallelize_module(self.net, self.device_mesh["tensor_parallel"], plan)
        elif self.shard:
            mesh = self.device_mesh["data_parallel"]
            for layer in self.net:
                if any(True for _ in layer.parameters()):
                    fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)


class SaveFullWeights(Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_end(self, trainer, pl_module):
        full = {
            k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu()
            for k, v in pl_module.state_dict().items()
        }
        if trainer.is_global_zero:
            torch.save(full, self.path)


def main(optim: str, out: str, mode: str) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 8, generator=g)
    data = TensorDataset(x, x.sum(dim=1, keepdim=True).sin())
    sharded = mode in ("sharded", "unsharded", "tp")  # unsharded: ModelParallelStrategy, configure_model shards nothing
    per_process = 2 if mode in ("sharded", "unsharded") else 4
    # (tensor parallel: every process on the whole batch, in order)
    sampler = None if mode == "tp" else RankInterleavedSampler(len(data))
    loader = DataLoader(data, batch_size=per_process, sampler=sampler)
    from lightning_optims import get_spec

    spec = get_spec(optim)
    extra: dict = {"lr_scheduler_type": "constant"} if spec.has_train_eval_modes else {}
    if spec.needs_target_modules:  # (rank 2: a projection of rank >= the gradient's own rank is ill-conditioned, its
        # extra singular vectors set by rounding: GaLore's default 128 on these 8- to 32-wide layers ended 3e-3 away
        # from one process under FSDP2, rank 2 1.2e-7)
        extra["optim_target_modules"] = "all-linear"
        extra["optim_args"] = os.environ.get("MODEL_PARALLEL_OPTIM_ARGS", "rank=2,update_proj_gap=2")
    if spec.layerwise:
        extra["max_grad_norm"] = 0.0
    if "weight_decay" in spec.uses:
        extra["weight_decay"] = 0.01
    module = ShardedMLP("tp" if mode == "tp" else mode == "sharded", optim=optim, learning_rate=1e-2, **extra)
    parallel = dict(data_parallel_size=1, tensor_parallel_size=2) if mode == "tp" else dict(data_parallel_size=2)
    parallel.setdefault("tensor_parallel_size", 1)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2 if sharded else 1,
        strategy=ModelParallelStrategy(**parallel) if sharded else "auto",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[SaveFullWeights(out)],
    )
    trainer.fit(module, loader)


if __name__ == "__main__":
    main(*sys.argv[1:4])
    leave_process_group()
