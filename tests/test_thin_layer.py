"""The mixin stays out of Lightning's way: plain Lightning behaviour kept (hook wrappers, ``clip_gradients``, anomaly
detection, TorchScript, use without a Trainer), and a module overriding hooks without ``super()`` trains and resumes
as one that calls it, because the run-time work lives in the package's callback."""

from __future__ import annotations

import functools
import warnings
from unittest import mock

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_optims import OptimizerMixin, create_optimizer, create_scheduler, get_spec
from lightning_optims.callbacks import OptimizerCallback
from lightning_optims.errors import NonFiniteLossError
from tests.helpers import LlamaModule, lightning_trainer, loader, tiny_llama
from tests.test_reliability import ALL, require_usable, settings

STAGES = ("fit", "validate", "test", "predict")


class AllStages(LlamaModule):
    def test_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def predict_step(self, batch, batch_idx):
        return self.model(**batch).logits


def record_every_hook(module: L.LightningModule, called: list[str]) -> None:
    """What Lightning's own hook-order tests do (``tests_pytorch/models/test_hooks.py``): every LightningModule hook
    replaced on the instance by ``functools.partial`` of a recorder, ``update_wrapper``-ed onto the original."""
    hooks = {
        name
        for name in dir(L.LightningModule)
        if (name.startswith(("on_", "configure_")) or name in ("setup", "teardown", "backward"))
        and callable(getattr(L.LightningModule, name))
    }

    def call(hook, fn, *args, **kwargs):
        called.append(hook)
        return fn(*args, **kwargs)

    for name in hooks:
        original = getattr(module, name)
        wrapper = functools.partial(call, name, original)
        functools.update_wrapper(wrapper, original)
        setattr(module, name, wrapper)


def weights(module: L.LightningModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


def assert_equal_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def run(stage: str, module: L.LightningModule, **trainer_kwargs) -> L.Trainer:
    trainer = lightning_trainer(3, **trainer_kwargs)
    if stage == "fit":
        trainer.fit(module, loader())
    else:
        getattr(trainer, stage)(module, loader(n=8))
    return trainer


# -- configure_optimizers replaced on the instance ------------------------------------------------------------------


@pytest.mark.parametrize("stage", STAGES)
def test_hook_recording_wrappers_work_in_every_stage(stage):
    called: list[str] = []
    module = AllStages(model=tiny_llama(), optim="lomo", max_grad_norm=1.0)
    record_every_hook(module, called)
    run(stage, module)
    assert "setup" in called and "configure_callbacks" in called
    assert ("configure_optimizers" in called) == (stage == "fit") and ("backward" in called) == (stage == "fit")
    if stage == "fit":  # and it trained as an unwrapped module does
        plain = AllStages(model=tiny_llama(), optim="lomo", max_grad_norm=1.0)
        run("fit", plain)
        assert_equal_weights(weights(module), weights(plain))


def test_mock_wrapping_configure_optimizers_trains():
    module = LlamaModule(model=tiny_llama(), optim="adamw_torch")
    with mock.patch.object(module, "configure_optimizers", wraps=module.configure_optimizers) as spy:
        run("fit", module)
    spy.assert_called_once_with()
    plain = LlamaModule(model=tiny_llama(), optim="adamw_torch")
    run("fit", plain)
    assert_equal_weights(weights(module), weights(plain))


def test_a_class_assigning_the_mixins_configure_optimizers_trains():
    class Assigned(LlamaModule):
        configure_optimizers = OptimizerMixin.configure_optimizers

    module = Assigned(model=tiny_llama(), optim="adamw_torch")
    trainer = run("fit", module)
    assert trainer.global_step == 3


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_a_replaced_configure_optimizers_is_only_refused_when_fitting(stage):
    module = AllStages(model=tiny_llama(), optim="adamw_torch")
    module.configure_optimizers = lambda: torch.optim.SGD(module.parameters(), lr=0.1)
    run(stage, module)  # no optimizer is built in these stages: nothing to refuse
    with pytest.raises(MisconfigurationException, match="configure_optimizers of AllStages was replaced"):
        run("fit", module)


# -- clip_gradients -------------------------------------------------------------------------------------------------


class ClipRecorder(LlamaModule):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.clips: list[tuple] = []

    def clip_gradients(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.clips.append((self.global_step, gradient_clip_val, gradient_clip_algorithm))
        super().clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)


def test_an_overridden_clip_gradients_is_called_at_every_step_and_clips_as_the_mixin_does():
    module = ClipRecorder(model=tiny_llama(), optim="adamw_torch", learning_rate=1e-2, max_grad_norm=0.5)
    run("fit", module)
    assert module.clips == [(0, 0.5, "norm"), (1, 0.5, "norm"), (2, 0.5, "norm")]
    plain = LlamaModule(model=tiny_llama(), optim="adamw_torch", learning_rate=1e-2, max_grad_norm=0.5)
    run("fit", plain)  # (the mixin's own path: the norm measured once, then torch's clip_grads_with_norm_)
    assert_equal_weights(weights(module), weights(plain))
    unclipped = LlamaModule(model=tiny_llama(), optim="adamw_torch", learning_rate=1e-2, max_grad_norm=0.0)
    run("fit", unclipped)  # (the control: clipping at 0.5 changes these weights)
    assert any(not torch.equal(a, b) for a, b in zip(weights(plain).values(), weights(unclipped).values()))


def test_an_overridden_clip_gradients_that_clips_differently_takes_effect():
    class HalfClip(LlamaModule):
        def clip_gradients(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            super().clip_gradients(optimizer, gradient_clip_val / 2, gradient_clip_algorithm)

    module = HalfClip(model=tiny_llama(), optim="adamw_torch", learning_rate=1e-2, max_grad_norm=0.5)
    run("fit", module)
    reference = LlamaModule(model=tiny_llama(), optim="adamw_torch", learning_rate=1e-2, max_grad_norm=0.25)
    run("fit", reference)
    for a, b in zip(weights(module).values(), weights(reference).values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)  # (clip_grad_norm_'s norm vs ours: one rounding apart)


# -- anomaly detection ----------------------------------------------------------------------------------------------


class NanLoss(LlamaModule):
    """The loss goes through sqrt of a negative number: NaN, produced by SqrtBackward0's forward."""

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) + torch.sqrt(self.model.lm_head.weight[0, 0].abs() * -1.0)


@pytest.mark.parametrize("optim", ["adamw_torch", "lomo"])
def test_detect_anomaly_names_the_operation(optim):
    module = NanLoss(model=tiny_llama(), optim=optim, max_grad_norm=0.0)
    before = weights(module)
    with pytest.raises(RuntimeError, match="Function 'SqrtBackward0' returned nan values"):
        run("fit", module, detect_anomaly=True)
    assert_equal_weights(before, weights(module))
    # without anomaly detection: the package's error, before backward
    module = NanLoss(model=tiny_llama(), optim=optim, max_grad_norm=0.0)
    with pytest.raises(NonFiniteLossError, match="non-finite loss"):
        run("fit", module)


def test_detect_anomaly_with_a_nan_loss_and_finite_gradients_still_stops():
    class NanConstant(LlamaModule):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) + torch.tensor(float("nan"))

    module = NanConstant(model=tiny_llama(), optim="adamw_torch", max_grad_norm=0.0)
    with pytest.raises(NonFiniteLossError, match="after backward, where anomaly detection reported nothing"):
        run("fit", module, detect_anomaly=True)


# -- without a Trainer: Fabric and plain PyTorch --------------------------------------------------------------------


def test_configure_optimizers_without_a_trainer_says_what_to_pass():
    module = LlamaModule(model=tiny_llama(), optim="adamw_torch")
    with pytest.raises(MisconfigurationException, match=r"configure_optimizers\(num_training_steps=N\)"):
        module.configure_optimizers()
    constant = LlamaModule(model=tiny_llama(), optim="adamw_torch", lr_scheduler_type="constant")
    assert constant.configure_optimizers()["optimizer"] is not None  # a constant schedule needs no count
    with pytest.raises(ValueError, match="num_training_steps=0: expected an int >= 1"):
        module.configure_optimizers(num_training_steps=0)


def fabric_run(module: LlamaModule, steps: int) -> None:
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1)
    config = module.configure_optimizers(num_training_steps=steps)
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    model, optimizer = fabric.setup(module, optimizer)
    batches = iter(loader())
    for _ in range(steps):
        loss = model.training_step(next(batches), 0)
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()


def test_fabric_trains_as_the_trainer_does():
    settings = dict(optim="adamw_torch", learning_rate=1e-2, warmup_steps=1, max_grad_norm=0.0)
    module = LlamaModule(model=tiny_llama(), **settings)
    fabric_run(module, 3)
    trained = LlamaModule(model=tiny_llama(), **settings)
    run("fit", trained)
    assert_equal_weights(weights(module), weights(trained))


def test_plain_pytorch_lomo_with_the_pure_layer_trains_as_the_trainer_does():
    """The pure layer (docs/fabric.md): create_optimizer, create_scheduler, fused_backward."""
    settings = dict(optim="lomo", learning_rate=1e-2, warmup_steps=1, max_grad_norm=0.0)
    module = LlamaModule(model=tiny_llama(), **settings)
    optimizer = create_optimizer(module, module.optimizer_arguments, num_training_steps=3)
    scheduler = create_scheduler(optimizer, module.optimizer_arguments, 3)
    batches = iter(loader())
    for _ in range(3):
        optimizer.fused_backward(module.model(**next(batches)).loss)
        scheduler.step()
    optimizer.remove_hooks()
    trained = LlamaModule(model=tiny_llama(), **settings)
    run("fit", trained)
    assert_equal_weights(weights(module), weights(trained))


# -- TorchScript and export -----------------------------------------------------------------------------------------


class Scriptable(OptimizerMixin, L.LightningModule):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.layer = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.layer(x)


def test_to_torchscript_and_export_work():
    module = Scriptable(optim="apollo_adamw", optim_target_modules="layer", learning_rate=1e-3)
    x = torch.randn(3, 4)
    with warnings.catch_warnings():  # (Lightning 2.6 deprecates TorchScript with a warning; it still has to work)
        warnings.simplefilter("ignore")
        scripted = module.to_torchscript()
    assert torch.equal(scripted(x), module(x))
    exported = torch.export.export(module, (x,))
    assert torch.equal(exported.module()(x), module(x))
    assert module.learning_rate == 1e-3  # the settings still read after scripting


# -- hooks overridden without super() -------------------------------------------------------------------------------


class NoSuper(LlamaModule):
    """A working module's own hooks, none of which calls super()."""

    def setup(self, stage):
        self.stages = [*getattr(self, "stages", []), stage]

    def on_train_start(self):
        self.started = True

    def on_save_checkpoint(self, checkpoint):
        checkpoint["mine"] = 1

    def on_load_checkpoint(self, checkpoint):
        self.loaded = checkpoint["mine"]

    def configure_callbacks(self):
        return [Callback()]


class WithSuper(LlamaModule):
    def setup(self, stage):
        super().setup(stage)

    def on_train_start(self):
        super().on_train_start()

    def on_save_checkpoint(self, checkpoint):
        super().on_save_checkpoint(checkpoint)
        checkpoint["mine"] = 1

    def on_load_checkpoint(self, checkpoint):
        super().on_load_checkpoint(checkpoint)

    def configure_callbacks(self):
        return [*super().configure_callbacks(), Callback()]


FAMILIES = {
    "lomo": dict(optim="lomo", learning_rate=1e-2),
    "schedule_free": dict(optim="schedule_free_adamw", learning_rate=1e-2, lr_scheduler_type="constant"),
    "adamw": dict(optim="adamw_torch", learning_rate=1e-2),
}


def fit_and_resume(cls: type, settings: dict, tmp_path, resumed_settings: dict | None = None) -> dict:
    """4 steps (2 epochs of 2 batches) with a checkpoint at the end of the first epoch (step 2), then a fresh module
    and Trainer resumed from it to step 4."""
    first = cls(model=tiny_llama(), **settings)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1, filename="{step}")
    # (max_epochs, not max_steps: resuming a max_steps-only fit from an epoch-end checkpoint is not exact in
    # Lightning itself, measured 3.4e-3 with a plain LightningModule and torch's AdamW)
    lightning_trainer(-1, max_epochs=2, callbacks=[checkpoint], enable_checkpointing=True).fit(first, loader(n=8))
    second = cls(model=tiny_llama(seed=5), **(resumed_settings or settings))
    lightning_trainer(-1, max_epochs=2).fit(second, loader(n=8), ckpt_path=str(tmp_path / "step=2.ckpt"))
    return {"uninterrupted": weights(first), "resumed": weights(second)}


@pytest.mark.parametrize("family", FAMILIES)
def test_hooks_overridden_without_super_train_and_resume_as_with_super(family, tmp_path):
    settings = FAMILIES[family]
    ours = fit_and_resume(NoSuper, settings, tmp_path / "no_super")
    theirs = fit_and_resume(WithSuper, settings, tmp_path / "with_super")
    for key in ("uninterrupted", "resumed"):
        assert_equal_weights(ours[key], theirs[key])
    assert_equal_weights(ours["resumed"], ours["uninterrupted"])
    # a learning_rate changed on resume is applied as with super(): the two differ from the unchanged resume alike
    doubled = {**settings, "learning_rate": 2e-2}
    ours = fit_and_resume(NoSuper, settings, tmp_path / "no_super_lr", doubled)
    theirs = fit_and_resume(WithSuper, settings, tmp_path / "with_super_lr", doubled)
    assert_equal_weights(ours["resumed"], theirs["resumed"])
    assert any(not torch.equal(ours["resumed"][k], ours["uninterrupted"][k]) for k in ours["resumed"])


def test_the_resume_checks_run_without_super(tmp_path):
    fit_and_resume(NoSuper, FAMILIES["adamw"], tmp_path)
    other = NoSuper(model=tiny_llama(), optim="adafactor")
    with pytest.raises(MisconfigurationException, match="this checkpoint was written with optim='adamw_torch'"):
        lightning_trainer(-1, max_epochs=2).fit(other, loader(n=8), ckpt_path=str(tmp_path / "step=2.ckpt"))


def test_the_callbacks_are_attached_once_and_a_users_own_one_replaces_ours():
    from lightning_optims import ScheduleFreeCallback

    class Own(LlamaModule):
        def configure_callbacks(self):
            return [ScheduleFreeCallback(exact_resume=False)]

    module = Own(model=tiny_llama(), **FAMILIES["schedule_free"])
    trainer = run("fit", module)
    found = [c for c in trainer.callbacks if isinstance(c, ScheduleFreeCallback)]
    assert len(found) == 1 and found[0].exact_resume is False
    assert sum(isinstance(c, OptimizerCallback) for c in trainer.callbacks) == 1
    trainer.validate(module, loader(n=8))  # attached again: still once
    assert sum(isinstance(c, OptimizerCallback) for c in trainer.callbacks) == 1


# -- what plain Lightning does keeps working ------------------------------------------------------------------------


class IterModule(LlamaModule):
    """A training_step that takes the dataloader iterator (Lightning gives no batch to infer a batch size from)."""

    def training_step(self, dataloader_iter):
        batch, _, _ = next(dataloader_iter)  # (batch, batch_idx, dataloader_idx)
        return self.model(**batch).loss


@pytest.mark.parametrize("name", ALL)
def test_a_training_step_taking_the_dataloader_iter_trains(name):
    """Lightning refuses ``self.log`` without ``batch_size`` there: the package's own logs (grad_norm, the grokking
    signal) must not be what stops the fit (Lightning's test_training_loop_dataloader_iter_multiple_dataloaders)."""
    require_usable(name)
    module = IterModule(model=tiny_llama(), **settings(name))
    trainer = lightning_trainer(2)
    trainer.fit(module, loader())
    assert trainer.global_step == 2
    assert module.last_grad_norm is not None or get_spec(name).layerwise  # (layer-wise: no norm measured)


class CountingClip(LlamaModule):
    def clip_gradients(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.clip_calls = [*getattr(self, "clip_calls", []), (gradient_clip_val, gradient_clip_algorithm)]
        super().clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)


@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0])
@pytest.mark.parametrize("name", ["adamw_torch", "apollo_adamw", "schedule_free_adamw"])
def test_a_clip_gradients_override_is_called_at_every_step(name, max_grad_norm):
    """Plain Lightning calls clip_gradients at every optimizer step, with (None, None) where nothing clips
    (test_trainer_model_hook_system_fit); with the mixin too, with max_grad_norm where it clips."""
    module = CountingClip(model=tiny_llama(), **settings(name, max_grad_norm=max_grad_norm))
    lightning_trainer(3).fit(module, loader())
    expected = (max_grad_norm, "norm") if max_grad_norm else (None, None)
    assert module.clip_calls == [expected] * 3
