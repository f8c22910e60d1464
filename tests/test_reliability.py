"""The registry-wide guarantee: every registered optimizer usable here resumes exactly, loads weights-only, refuses
a mismatched resume, never writes a non-finite value silently, and leaves no hook behind. A new registry entry is
covered by these tests without being named in them."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_optims import NonFiniteGradientError, NonFiniteLossError, available_optimizers, get_spec
from tests.helpers import (
    WEIGHTS_ONLY,
    LlamaModule,
    NanGradient,
    assert_unavailable_for_its_reason,
    lightning_trainer,
    loader,
    tiny_llama,
)

ROWS = available_optimizers()
ALL = [r.name for r in ROWS]  # every registered name: a new registry entry is covered without being named here
USABLE = [r.name for r in ROWS if r.usable]
SKIPPED = {r.name: r.reason for r in ROWS if not r.usable}


def require_usable(name: str) -> None:
    """Skip, with the reason in the test report (-ra), a name whose package or device is missing here."""
    if name in SKIPPED:
        pytest.skip(SKIPPED[name])


def test_every_registered_name_is_covered_or_listed():
    """The matrix runs over every registered name: each is usable here (its class loads, so its cases run), or
    skipped with a reason that is true (loading it fails with that very reason)."""
    from lightning_optims.registry import registered_names
    from lightning_optims.spec import load as _load

    assert sorted(ALL) == sorted(registered_names())
    for name in USABLE:
        _load(get_spec(name).target)  # the class itself, not the registry's availability check
    for name, reason in SKIPPED.items():
        assert_unavailable_for_its_reason(name, reason)
    print(
        "\nreliability matrix: usable here:", len(USABLE), "| skipped (package or device missing):", SKIPPED or "none"
    )


def settings(name: str, **overrides) -> dict:
    spec = get_spec(name)
    s: dict = {"optim": name, "learning_rate": 1e-2}
    if spec.needs_target_modules:
        s["optim_target_modules"] = "all-linear"
        if spec.params == "low_rank":
            s["optim_args"] = "rank=2,update_proj_gap=2"
    if spec.layerwise:
        s["max_grad_norm"] = 0.0
    if spec.has_train_eval_modes:
        s["lr_scheduler_type"] = "constant"
    s.update(overrides)
    return s


def fit(name: str, ckpt_dir=None, ckpt_path=None, epochs: int = 2, **overrides):
    module = LlamaModule(model=tiny_llama(), **settings(name, **overrides))
    callbacks = [ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, filename="{epoch}")] if ckpt_dir else []
    trainer = lightning_trainer(-1, max_epochs=epochs, enable_checkpointing=bool(ckpt_dir), callbacks=callbacks)
    trainer.fit(module, loader(n=16), ckpt_path=ckpt_path)
    return module, trainer


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_resume_from_epoch_boundary_equals_uninterrupted(tmp_path, name):
    require_usable(name)
    full, _ = fit(name, ckpt_dir=tmp_path)
    path = tmp_path / "epoch=0.ckpt"
    checkpoint = torch.load(path, weights_only=True)  # no pickled objects in any optimizer's state
    assert checkpoint["optimizer_states"]
    resumed, trainer = fit(name, ckpt_path=str(path))  # a new module and a new Trainer
    assert trainer.global_step == full.trainer.global_step
    for key, value in full.model.state_dict().items():  # bit-identical (measured for every name): equality
        assert torch.equal(resumed.model.state_dict()[key], value), f"{name} {key}"
    # the fits moved the weights, and left no gradient hook behind
    assert not torch.equal(full.model.state_dict()["lm_head.weight"], tiny_llama().state_dict()["lm_head.weight"])
    assert all(not p._post_accumulate_grad_hooks for p in [*full.parameters(), *resumed.parameters()])


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_fitting_the_same_module_twice(name):
    require_usable(name)
    module = LlamaModule(model=tiny_llama(), **settings(name))
    for _ in range(2):
        trainer = lightning_trainer(2)
        trainer.fit(module, loader())
        assert trainer.global_step == 2
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert all(not p._post_accumulate_grad_hooks for p in module.parameters())


def test_resume_with_another_optim_is_refused(tmp_path):
    fit("adamw_torch", ckpt_dir=tmp_path, epochs=1)
    with pytest.raises(MisconfigurationException, match=r"written with optim='adamw_torch'.*optim='grokadamw'"):
        fit("grokadamw", ckpt_path=str(tmp_path / "epoch=0.ckpt"))


def test_resume_with_other_settings_is_refused(tmp_path):
    fit("adamw_torch", ckpt_dir=tmp_path, epochs=1)
    with pytest.raises(MisconfigurationException, match=r"weight_decay: 0.0 -> 0.1"):
        fit("adamw_torch", ckpt_path=str(tmp_path / "epoch=0.ckpt"), weight_decay=0.1)


class LrSpy(Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize("name", ["adamw_torch", "lomo", "apollo_adamw_layerwise"])
def test_changing_learning_rate_on_resume_is_applied(tmp_path, name):
    fit(name, ckpt_dir=tmp_path, epochs=2, lr_scheduler_type="linear")
    spies = {}
    for lr in (1e-2, 5e-3):
        spies[lr] = LrSpy()
        module = LlamaModule(model=tiny_llama(), **settings(name, learning_rate=lr, lr_scheduler_type="linear"))
        lightning_trainer(-1, max_epochs=2, callbacks=[spies[lr]]).fit(
            module, loader(n=16), ckpt_path=str(tmp_path / "epoch=0.ckpt")
        )
    # the same point of the same schedule, at half the peak learning rate
    assert spies[5e-3].lrs == pytest.approx([x / 2 for x in spies[1e-2].lrs])
    assert spies[1e-2].lrs[0] > 0


def test_loading_weights_into_another_optim_is_allowed(tmp_path):
    fit("adamw_torch", ckpt_dir=tmp_path, epochs=1)
    module = LlamaModule.load_from_checkpoint(
        tmp_path / "epoch=0.ckpt", model=tiny_llama(), optim="grokadamw", **WEIGHTS_ONLY
    )
    assert module.optimizer_arguments.optim == "grokadamw"


class NanLoss(LlamaModule):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if batch_idx == 1 else loss


@pytest.mark.parametrize("name", ALL)
def test_non_finite_loss_stops_before_any_write(name):
    require_usable(name)
    module = NanLoss(model=tiny_llama(), **settings(name))
    with pytest.raises(NonFiniteLossError, match="global step 1"):
        lightning_trainer(4).fit(module, loader())
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert all(not p._post_accumulate_grad_hooks for p in module.parameters())  # cleaned up after the exception


@pytest.mark.parametrize("clipping", ["default", "off"])
@pytest.mark.parametrize("name", ALL)
def test_non_finite_gradient_is_never_written(name, clipping):
    """With clipping on (the default) or off (max_grad_norm=0: the norm is still computed, for grad_norm), a NaN
    gradient stops training unwritten."""
    require_usable(name)
    extra = {"max_grad_norm": 0.0} if clipping == "off" else {}
    module = NanGradient(model=tiny_llama(), **{**settings(name), **extra})
    with pytest.raises(NonFiniteGradientError):
        lightning_trainer(4).fit(module, loader())
    assert all(torch.isfinite(p).all() for p in module.parameters())


class InterruptInValidation(Callback):
    def __init__(self, exception):
        self.exception = exception

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking and trainer.global_step >= 2:
            raise self.exception


@pytest.mark.parametrize("name", ["schedule_free_adamw", "lomo", "apollo_adamw_layerwise", "adamw_torch"])
@pytest.mark.parametrize("exception", [KeyboardInterrupt(), RuntimeError("boom")], ids=["interrupt", "error"])
def test_exception_in_validation_leaves_a_consistent_state(name, exception):
    module = LlamaModule(model=tiny_llama(), **settings(name))
    trainer = lightning_trainer(
        6, limit_val_batches=2, val_check_interval=2, callbacks=[InterruptInValidation(exception)]
    )
    # Lightning turns a KeyboardInterrupt into SystemExit(1) after its on_exception hooks
    with pytest.raises(SystemExit if isinstance(exception, KeyboardInterrupt) else RuntimeError):
        trainer.fit(module, loader(), loader())
    assert all(not p._post_accumulate_grad_hooks for p in module.parameters())
    optimizer = trainer.optimizers[0]
    if get_spec(name).has_train_eval_modes:  # stopped in validation: eval mode, weights are the averaged point
        assert optimizer.param_groups[0]["train_mode"] is False
    # the module can be fitted again from here
    trainer2 = lightning_trainer(2)
    trainer2.fit(module, loader())
    assert trainer2.global_step == 2 and all(torch.isfinite(p).all() for p in module.parameters())


class ManualNonFiniteGradient(LlamaModule):
    """Manual optimization; at the second step a hook makes every gradient NaN (the loss stays finite)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = self.model(**batch).loss
        if batch_idx == 1:
            loss.register_hook(lambda grad: grad * float("nan"))
        self.manual_backward(loss)
        opt.step()
        opt.zero_grad()
        return loss


@pytest.mark.parametrize("name", [n for n in USABLE if get_spec(n).layerwise])
def test_a_layerwise_non_finite_gradient_in_manual_optimization_is_not_passed_over(name):
    """A layer-wise engine skips a non-finite gradient on the device and its verdict raises; in manual optimization,
    where no clipping hook follows, the verdict comes right after backward (it was passed over silently before)."""
    module = ManualNonFiniteGradient(model=tiny_llama(), **settings(name, lr_scheduler_type="constant"))
    with pytest.raises(NonFiniteGradientError, match="layer-wise"):
        lightning_trainer(3).fit(module, loader(n=8))
    assert all(bool(torch.isfinite(p).all()) for p in module.parameters())
