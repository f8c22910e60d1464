"""Run by tests/test_strategies.py (Lightning's launcher re-executes this script for the second process):

    python tests/scripts/model_parallel_fit.py OUT_DIR {parallel,single} RUN [RUN ...]

Each RUN is ``NAME:OPTIM:MODE[:OPTIM_ARGS]`` and fits a small MLP for 3 steps. ``parallel``: under
``ModelParallelStrategy`` on 2 CPU processes (gloo), MODE ``sharded`` (FSDP2, ``fully_shard``, each process on half of
every batch), ``unsharded`` (a configure_model that shards nothing) or ``tp`` (tensor parallelism alone,
data_parallel_size=1, both processes on the whole batch; the first linear layer ``ColwiseParallel``, the second
``RowwiseParallel``, the LayerNorm and the last layer left plain tensors, as a user's plan commonly leaves them);
``single``: on one process with the combined batches (MODE unused). Rank 0 writes the full weights to
``OUT_DIR/NAME.pt``; a fit that raises writes ``OUT_DIR/NAME.error.rankR`` on each process (the exception's type and
message) and the launch goes on. All runs of a launch share its processes (one launch, many fits), in the order given.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_optims import OptimizerMixin, get_spec
from tests.helpers import RankInterleavedSampler, leave_process_group, lightning_trainer


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
    """The full weights at the end, and (``grad_norms``) the global gradient norm the module measured at each step."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.norms: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.last_grad_norm is not None:
            self.norms.append(float(pl_module.last_grad_norm))

    def on_fit_end(self, trainer, pl_module):
        full = {
            k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu()
            for k, v in pl_module.state_dict().items()
        }
        full["grad_norms"] = torch.tensor(self.norms, dtype=torch.float64)
        if trainer.is_global_zero:
            torch.save(full, self.path)


def fit(out: Path, single: bool, name: str, optim: str, mode: str, optim_args: str | None = None) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 8, generator=g)
    data = TensorDataset(x, x.sum(dim=1, keepdim=True).sin())
    per_process = 2 if mode in ("sharded", "unsharded") and not single else 4
    # (tensor parallel: every process on the whole batch, in order)
    sampler = None if mode == "tp" else RankInterleavedSampler(len(data))
    loader = DataLoader(data, batch_size=per_process, sampler=sampler)
    spec = get_spec(optim)
    extra: dict = {"lr_scheduler_type": "constant"} if spec.has_train_eval_modes else {}
    if spec.needs_target_modules:  # (rank 2: a projection of rank >= the gradient's own rank is ill-conditioned, its
        # extra singular vectors set by rounding: GaLore's default 128 on these 8- to 32-wide layers ended 3e-3 away
        # from one process under FSDP2, rank 2 1.2e-7)
        extra["optim_target_modules"] = "all-linear"
        extra["optim_args"] = optim_args or "rank=2,update_proj_gap=2"
    if spec.layerwise:
        extra["max_grad_norm"] = 0.0
    if "weight_decay" in spec.uses:
        extra["weight_decay"] = 0.01
    try:
        shard: bool | str = False if single else "tp" if mode == "tp" else mode == "sharded"
        module = ShardedMLP(shard, optim=optim, learning_rate=1e-2, **extra)
        tensor_parallel = 2 if mode == "tp" else 1
        trainer = lightning_trainer(
            3,
            devices=1 if single else 2,
            strategy="auto"
            if single
            else ModelParallelStrategy(data_parallel_size=2 // tensor_parallel, tensor_parallel_size=tensor_parallel),
            use_distributed_sampler=False,
            callbacks=[SaveFullWeights(str(out / f"{name}.pt"))],
        )
        trainer.fit(module, loader)
    except Exception as error:  # (the refusals are results: every process writes its own)
        rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("LOCAL_RANK", "0"))
        (out / f"{name}.error.rank{rank}").write_text(f"{type(error).__name__}: {error}")


def main(out: str, mode: str, *runs: str) -> None:
    for run in runs:
        fit(Path(out), mode == "single", *run.split(":"))


if __name__ == "__main__":
    main(*sys.argv[1:])
    leave_process_group()
