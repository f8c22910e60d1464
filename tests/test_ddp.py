"""Two-process DDP on the CPU (gloo): every family ends with identical replicas, equal to one process on the
combined batch."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from tests.helpers import AuxHeadLlama, LlamaModule, ddp_loader, flagged_ddp_loader, tiny_llama

MINI = "proj=random,rank=1,scale=128.0,scale_type=tensor,update_proj_gap=200"
FAMILIES = {
    "adamw_torch": dict(weight_decay=0.01),
    "adafactor": {},
    "apollo_adamw": dict(optim_target_modules=[r".*.attn.*", r".*.mlp.*"], optim_args=MINI),
    "grokadamw": {},
    "schedule_free_adamw": dict(lr_scheduler_type="constant"),
    "lomo": dict(max_grad_norm=1.0),
    "adalomo": dict(max_grad_norm=0.0),
}
STEPS, PER_RANK = 3, 2


class SaveRankWeights(Callback):
    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_fit_end(self, trainer, pl_module):
        torch.save(
            {k: v.detach().cpu() for k, v in pl_module.state_dict().items()},
            f"{self.folder}/rank{trainer.global_rank}.pt",
        )


# with weight decay, a parameter that no process computed a gradient for would still move if it were "updated" with
# a zero gradient: one process leaves it alone
UNUSED_EXTRA = {"lomo": dict(optim_args="weight_decay=0.1"), "adalomo": dict(optim_args="weight_decay=0.1")}


def fit(name: str, devices: int, folder, strategy: str = "ddp_fork", unused: bool = False):
    cls = AuxHeadLlama if unused else LlamaModule
    extra = UNUSED_EXTRA.get(name, {}) if unused else {}
    module = cls(model=tiny_llama(), optim=name, learning_rate=1e-2, **FAMILIES[name], **extra)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy if devices > 1 else "auto",
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[SaveRankWeights(str(folder))],
        use_distributed_sampler=False,
    )
    data = flagged_ddp_loader if unused else ddp_loader
    trainer.fit(module, data(PER_RANK * (2 // devices), n=16))
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(devices)]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_ddp_replicas_identical_and_equal_to_one_process(tmp_path, name):
    (tmp_path / "ddp").mkdir()
    (tmp_path / "one").mkdir()
    rank0, rank1 = fit(name, 2, tmp_path / "ddp")
    (single,) = fit(name, 1, tmp_path / "one")
    initial = tiny_llama().state_dict()
    for key, value in single.items():
        assert torch.equal(rank0[key], rank1[key]), f"{name}: replicas differ at {key}"
        torch.testing.assert_close(rank0[key], value, atol=1e-5, rtol=0, msg=lambda m: f"{name} {key}: {m}")
    moved = single["model.model.layers.0.mlp.up_proj.weight"]
    assert not torch.equal(moved, initial["model.layers.0.mlp.up_proj.weight"])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_ddp_parameter_unused_on_one_rank_equals_one_process(tmp_path, name):
    """The aux head is used by sample 0 (rank 0, step 0) and sample 5 (rank 1, step 1) only: in each of those steps
    the other rank computes no gradient for it, and in the later steps no rank does."""
    (tmp_path / "ddp").mkdir()
    (tmp_path / "one").mkdir()
    rank0, rank1 = fit(name, 2, tmp_path / "ddp", strategy="ddp_fork_find_unused_parameters_true", unused=True)
    (single,) = fit(name, 1, tmp_path / "one", unused=True)
    initial = AuxHeadLlama(model=tiny_llama()).state_dict()
    for key, value in single.items():
        assert torch.equal(rank0[key], rank1[key]), f"{name}: replicas differ at {key}"
        torch.testing.assert_close(rank0[key], value, atol=1e-5, rtol=0, msg=lambda m: f"{name} {key}: {m}")
    assert not torch.equal(single["aux.weight"], initial["aux.weight"])  # the head was trained
