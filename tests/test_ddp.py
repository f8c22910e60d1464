"""Two-process DDP on the CPU (gloo): every family ends with identical replicas, equal to one process on the
combined batch."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from tests.helpers import AuxHeadLlama, LlamaModule, ddp_loader, flagged_ddp_loader, lightning_trainer, tiny_llama

MINI = "proj=random,rank=1,scale=128.0,scale_type=tensor,update_proj_gap=200"
FAMILIES = {
    "adamw_torch": dict(weight_decay=0.01),
    "adafactor": {},
    "apollo_adamw": dict(optim_target_modules=[r".*.attn.*", r".*.mlp.*"], optim_args=MINI),
    "grokadamw": {},
    "schedule_free_adamw": dict(lr_scheduler_type="constant"),
    "lomo": dict(max_grad_norm=1.0),
    "adalomo": dict(max_grad_norm=0.0),
    # settings in which the scale of the gradient changes the update, so that an engine that summed the processes'
    # gradients instead of averaging them would end elsewhere: LOMO without clipping is SGD, and AdaLomo's update is
    # g / sqrt(mean g^2 + eps_sq), scale-free unless eps_sq is comparable to g^2 (here: ~1e-6 to 1e-4)
    "lomo_unclipped": dict(optim="lomo", max_grad_norm=0.0),
    "adalomo_eps": dict(optim="adalomo", max_grad_norm=0.0, optim_args="eps_sq=1e-4"),
}
STEPS, PER_RANK = 3, 2


class SaveRankWeights(Callback):
    """Each process's weights at the end, and the ``grad_norm`` it logged at each step."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.norms: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.norms.append(float(pl_module.last_grad_norm))

    def on_fit_end(self, trainer, pl_module):
        torch.save(
            {
                "weights": {k: v.detach().cpu() for k, v in pl_module.state_dict().items()},
                "grad_norms": torch.tensor(self.norms),
            },
            f"{self.folder}/rank{trainer.global_rank}.pt",
        )


# with weight decay, a parameter that no process computed a gradient for would still move if it were "updated" with
# a zero gradient: one process leaves it alone
UNUSED_EXTRA = {"lomo": dict(optim_args="weight_decay=0.1"), "adalomo": dict(optim_args="weight_decay=0.1")}


class ScaledLoss(LlamaModule):
    """The loss times ``loss_factor`` (for the control of the scale-sensitive cases)."""

    loss_factor = 1.0

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) * self.loss_factor


def fit(name: str, devices: int, folder, strategy: str = "ddp_fork", unused: bool = False, loss_factor: float = 1.0):
    cls = AuxHeadLlama if unused else (ScaledLoss if loss_factor != 1.0 else LlamaModule)
    settings = {"optim": name, **FAMILIES[name]}
    extra = UNUSED_EXTRA.get(settings["optim"], {}) if unused else {}
    module = cls(model=tiny_llama(), learning_rate=1e-2, **settings, **extra)
    module.loss_factor = loss_factor
    trainer = lightning_trainer(
        STEPS,
        devices=devices,
        strategy=strategy if devices > 1 else "auto",
        callbacks=[SaveRankWeights(str(folder))],
        use_distributed_sampler=False,
    )
    data = flagged_ddp_loader if unused else ddp_loader
    trainer.fit(module, data(PER_RANK * (2 // devices), n=16))
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(devices)]


def test_each_scale_sensitive_case_moves_with_the_gradient_scale(tmp_path):
    """The two cases meant to catch a summed (not averaged) gradient: one process trained on its gradient doubled
    (loss times 2) ends far from the normal run, so a doubled gradient under DDP could not pass as equal."""
    for name in ("lomo_unclipped", "adalomo_eps"):
        folders = [tmp_path / name / kind for kind in ("normal", "doubled")]
        for folder in folders:
            folder.mkdir(parents=True)
        (normal,) = fit(name, 1, folders[0])
        (doubled,) = fit(name, 1, folders[1], loss_factor=2.0)
        gap = max((normal["weights"][k] - doubled["weights"][k]).abs().max().item() for k in normal["weights"])
        assert gap > 1e-3, f"{name}: a doubled gradient moved the weights by {gap} only"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_ddp_replicas_identical_and_equal_to_one_process(tmp_path, name):
    (tmp_path / "ddp").mkdir()
    (tmp_path / "one").mkdir()
    run0, run1 = fit(name, 2, tmp_path / "ddp")
    (one,) = fit(name, 1, tmp_path / "one")
    rank0, rank1, single = run0["weights"], run1["weights"], one["weights"]
    initial = tiny_llama().state_dict()
    for key, value in single.items():
        assert torch.equal(rank0[key], rank1[key]), f"{name}: replicas differ at {key}"
        torch.testing.assert_close(rank0[key], value, atol=1e-5, rtol=0, msg=lambda m, key=key: f"{name} {key}: {m}")
    moved = single["model.model.layers.0.mlp.up_proj.weight"]
    assert not torch.equal(moved, initial["model.layers.0.mlp.up_proj.weight"])
    # grad_norm at each step: the norm of the averaged gradient, the same on both processes, as one process has it
    assert len(one["grad_norms"]) == STEPS and bool((one["grad_norms"] > 0).all())
    assert torch.equal(run0["grad_norms"], run1["grad_norms"])
    # step 1 starts from the same weights: only the order of the sums differs; later steps start from weights equal
    # within the 1e-5 above, and the norm follows them (measured up to 3e-5 relative: GrokAdamW's third step)
    torch.testing.assert_close(run0["grad_norms"][0], one["grad_norms"][0], rtol=1e-6, atol=0)
    torch.testing.assert_close(run0["grad_norms"], one["grad_norms"], rtol=1e-4, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in FAMILIES if "optim" not in FAMILIES[n]])  # (the 7 families)
def test_ddp_parameter_unused_on_one_rank_equals_one_process(tmp_path, name):
    """The aux head is used by sample 0 (rank 0, step 0) and sample 5 (rank 1, step 1) only: in each of those steps
    the other rank computes no gradient for it, and in the later steps no rank does."""
    (tmp_path / "ddp").mkdir()
    (tmp_path / "one").mkdir()
    run0, run1 = fit(name, 2, tmp_path / "ddp", strategy="ddp_fork_find_unused_parameters_true", unused=True)
    (one,) = fit(name, 1, tmp_path / "one", unused=True)
    rank0, rank1, single = run0["weights"], run1["weights"], one["weights"]
    initial = AuxHeadLlama(model=tiny_llama()).state_dict()
    for key, value in single.items():
        assert torch.equal(rank0[key], rank1[key]), f"{name}: replicas differ at {key}"
        torch.testing.assert_close(rank0[key], value, atol=1e-5, rtol=0, msg=lambda m, key=key: f"{name} {key}: {m}")
    assert not torch.equal(single["aux.weight"], initial["aux.weight"])  # the head was trained
