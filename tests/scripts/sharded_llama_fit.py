"""Run by tests/test_sharded.py (Lightning's launcher re-executes this script for the second process):

    python tests/scripts/sharded_llama_fit.py OPTIM MAX_GRAD_NORM OUT_FILE MODE [CKPT_DIR [RESUME_CKPT]]

MODE: sharded, single, or sharded_local_stats (a control: statistics not completed over the shards).

Fits the tiny Llama of the tests for 4 steps (2 epochs of 2), either under ``ModelParallelStrategy`` on 2 CPU
processes (gloo) with every decoder layer and the model ``fully_shard``-ed (FSDP2, DTensor parameters sharded on
dim 0), each process taking half of every batch, or on one process with the combined batches. Rank 0 writes the
full weights to OUT_FILE. With CKPT_DIR, a checkpoint is saved at each epoch end; with RESUME_CKPT the fit resumes
from it.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from tests.helpers import LlamaModule, ddp_loader, tiny_llama  # noqa: E402

STEPS_PER_EPOCH, EPOCHS, PER_PROCESS = 2, 2, 2


MINI = "proj=random,rank=1,scale=128.0,scale_type=tensor,update_proj_gap=2"


def optimizer_settings(optim: str, max_grad_norm: float) -> dict:
    """The test settings of ``optim`` (low-rank: all-linear targets, rank 2, projections renewed every 2 steps),
    with weight decay where the optimizer takes it; ``apollo_mini`` is APOLLO with tensor-wise scaling, rank 1."""
    from lightning_optims import get_spec
    from tests.test_reliability import settings

    if optim == "apollo_mini":
        chosen = settings("apollo_adamw", optim_args=MINI)
    else:
        chosen = settings(optim)
    chosen.update(learning_rate=1e-2, max_grad_norm=max_grad_norm)
    spec = get_spec(chosen["optim"])
    if spec.updates_in_backward:
        chosen["optim_args"] = "weight_decay=0.01"
    elif "weight_decay" in spec.uses:
        chosen["weight_decay"] = 0.01
    return chosen


class ShardedLlama(LlamaModule):
    def __init__(self, shard: bool, **kwargs) -> None:
        super().__init__(model=tiny_llama(), **kwargs)
        self.shard = shard

    def configure_model(self) -> None:
        if self.shard:
            mesh = self.device_mesh["data_parallel"]
            for layer in self.model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(self.model, mesh=mesh)


class SaveFullWeights(Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_end(self, trainer, pl_module):
        full = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu()
                for k, v in pl_module.model.state_dict().items()}
        if trainer.is_global_zero:
            torch.save(full, self.path)


def main(optim: str, max_grad_norm: str, out: str, mode: str, ckpt_dir: str = "", resume: str = "") -> None:
    if mode == "sharded_local_stats":  # the negative control: each process uses its shard's statistics only
        from lightning_optims.in_backward import InBackwardOptimizer

        InBackwardOptimizer._all_sum = lambda self, tensor: tensor
        mode = "sharded"
    sharded = mode == "sharded"
    module = ShardedLlama(sharded, **optimizer_settings(optim, float(max_grad_norm)))
    callbacks: list = [SaveFullWeights(out)]
    if ckpt_dir:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, filename="{epoch}"))
    trainer = L.Trainer(
        accelerator="cpu", devices=2 if sharded else 1,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if sharded else "auto",
        max_epochs=EPOCHS, logger=False, enable_checkpointing=bool(ckpt_dir), enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, use_distributed_sampler=False,
        callbacks=callbacks,
    )
    per_process = PER_PROCESS if sharded else 2 * PER_PROCESS
    trainer.fit(module, ddp_loader(per_process, n=2 * PER_PROCESS * STEPS_PER_EPOCH), ckpt_path=resume or None)


if __name__ == "__main__":
    main(*sys.argv[1:])
