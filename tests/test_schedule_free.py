"""Schedule-free optimizers: the right mode in every phase and checkpoint, exact weights, exact resume."""

from __future__ import annotations

import contextlib
import copy
import glob
import warnings
from pathlib import Path
from unittest import mock

import lightning as L
import pytest
import schedulefree
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_optims import OptimizerArguments, OptimizerMixin, ScheduleFreeCallback, create_optimizer
from lightning_optims.families import schedule_free as sf_callback
from lightning_optims.families.schedule_free import in_train_mode, is_schedule_free
from tests.collectives import AllocatedBytes
from tests.helpers import WEIGHTS_ONLY

VARIANTS = ["schedule_free_adamw", "schedule_free_radam", "schedule_free_sgd", "user_built"]
LR = 1e-2


def data(n: int = 64, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return TensorDataset(x, x @ torch.randn(8, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g))


def loader(n: int = 64) -> DataLoader:
    return DataLoader(data(n), batch_size=8, shuffle=False)


def net(batch_norm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(8, 256)] + ([nn.BatchNorm1d(256)] if batch_norm else []) + [nn.ReLU(), nn.Linear(256, 1)]
    return nn.Sequential(*layers)


class Recorder:
    """Records the optimizer's mode inside every step."""

    def _record(self, phase: str) -> None:
        if self.trainer.optimizers:  # a fresh Trainer that only tests has none
            self.modes.append((phase, in_train_mode(self.trainer.optimizers[0])))

    def _loss(self, batch):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def training_step(self, batch, batch_idx):
        self._record("train")
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self._record("sanity" if self.trainer.sanity_checking else "val")
        self.log("val_loss", self._loss(batch))

    def test_step(self, batch, batch_idx):
        self._record("test")

    def predict_step(self, batch, batch_idx):
        self._record("predict")
        return self.net(batch[0])


class MixinModule(Recorder, OptimizerMixin, L.LightningModule):
    def __init__(self, batch_norm: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.net = net(batch_norm)
        self.modes: list = []


class UserBuiltModule(Recorder, L.LightningModule):
    """No mixin: a user who wrote the schedulefree optimizer by hand."""

    def __init__(self, batch_norm: bool = False):
        super().__init__()
        self.net = net(batch_norm)
        self.modes = []

    def configure_optimizers(self):
        return schedulefree.AdamWScheduleFree(self.parameters(), lr=LR, warmup_steps=2)


def make_module(variant: str, batch_norm: bool = False) -> L.LightningModule:
    if variant == "user_built":
        return UserBuiltModule(batch_norm)
    warmup = 0 if variant == "schedule_free_radam" else 2
    return MixinModule(
        batch_norm,
        optim=variant,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=warmup,
        max_grad_norm=0.0,
    )


def reference_optimizer(variant: str, model: nn.Module):
    if variant == "user_built":
        return schedulefree.AdamWScheduleFree(model.parameters(), lr=LR, warmup_steps=2)
    module = make_module(variant)
    return create_optimizer(model, module.optimizer_arguments)


def eval_point(model: nn.Module, opt) -> dict[str, torch.Tensor]:
    """The averaged weights at this moment, without touching the run (eval() on a deep copy of both)."""
    model_copy, opt_copy = copy.deepcopy((model, opt))
    opt_copy.eval()
    return {k: v.clone() for k, v in model_copy.state_dict().items()}


def reference_run(variant: str, epochs: int, val_every: int | None, n: int = 64):
    """A hand-written schedulefree loop over the same batches; eval/train at the same validation points."""
    model = net()
    opt = reference_optimizer(variant, model)
    points, step = {}, 0
    for _ in range(epochs):
        for i, (x, y) in enumerate(loader(n)):
            opt.train()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            step += 1
            points[step] = eval_point(model, opt)
            if val_every and (i + 1) % val_every == 0:
                opt.eval()
                opt.train()
    opt.eval()
    return model, points


def trainer(tmp_path, **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


class SaveAt(Callback):
    """Calls trainer.save_checkpoint by hand in the middle of an epoch."""

    def __init__(self, step: int, path: str) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def assert_weights(actual: dict, expected: dict, atol: float = 0.0) -> None:
    """Equal weights: bit-identical unless a tolerance measured for the case is given."""
    assert actual.keys() >= expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, atol=atol, rtol=0, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_mode_in_every_phase_and_checkpoint(tmp_path, variant):
    module = make_module(variant)
    every_3 = ModelCheckpoint(dirpath=tmp_path / "steps", every_n_train_steps=3, save_top_k=-1, filename="{step}")
    on_val = ModelCheckpoint(dirpath=tmp_path / "val", save_top_k=-1, filename="{step}-val")
    callbacks = [every_3, on_val, SaveAt(5, str(tmp_path / "manual-step=5.ckpt"))]
    if variant == "user_built":
        callbacks.append(ScheduleFreeCallback())
    t = trainer(tmp_path, max_epochs=2, val_check_interval=0.5, num_sanity_val_steps=2, callbacks=callbacks)
    t.fit(module, loader(), loader(16))
    # the mixin added the callback by itself (a spec flag), exactly once
    assert sum(isinstance(c, ScheduleFreeCallback) for c in t.callbacks) == 1

    t.test(module, loader(16))
    t.predict(module, loader(16))
    phases = {p for p, _ in module.modes}
    assert phases == {"sanity", "train", "val", "test", "predict"}
    for phase, training in module.modes:
        assert training == (phase == "train"), (phase, training)

    # the module holds the averaged weights after fit, equal to a hand-written loop followed by eval()
    ref_model, points = reference_run(variant, epochs=2, val_every=4)
    # (the live run also went through eval()/train() lerps at each validation: rounding, measured at most 4.7e-10)
    assert_weights(module.net.state_dict(), ref_model.state_dict(), atol=1e-8)
    assert not in_train_mode(t.optimizers[0])

    # every checkpoint: averaged weights of its step, optimizer in eval mode
    files = glob.glob(str(tmp_path / "**" / "*.ckpt"), recursive=True)
    assert len(files) >= 8  # steps 3..15, every validation, the manual one
    for path in files:
        ckpt = torch.load(path, weights_only=True)
        groups = ckpt["optimizer_states"][0]["param_groups"]
        assert all(g["train_mode"] is False for g in groups), path
        weights = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items()}
        # the reference points come from the eval() lerp of a live run that goes on training (train() lerps back):
        # equal up to that rounding, measured at most 4.7e-10
        assert_weights(weights, points[ckpt["global_step"]], atol=1e-8)


@pytest.mark.parametrize("variant", VARIANTS)
def test_checkpoints_do_not_change_the_trajectory(tmp_path, variant):
    """Saving in train mode moves no weight of the running fit: bit-equal to a fit without checkpoints."""
    runs = []
    for ckpt in (False, True):
        module = make_module(variant)
        callbacks = (
            [ModelCheckpoint(dirpath=tmp_path / str(ckpt), every_n_train_steps=1, save_top_k=-1)] if ckpt else []
        )
        if variant == "user_built":
            callbacks.append(ScheduleFreeCallback())
        trainer(tmp_path, max_epochs=2, limit_val_batches=0, enable_checkpointing=ckpt, callbacks=callbacks).fit(
            module, loader()
        )
        runs.append(module.net.state_dict())
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("with_validation", [False, True], ids=["train-mode-ckpt", "after-validation-ckpt"])
def test_resume_equals_uninterrupted(tmp_path, variant, with_validation):
    val = dict(val_dataloaders=loader(16)) if with_validation else {}
    limit = {} if with_validation else dict(limit_val_batches=0)

    def callbacks(dirpath):
        cbs = [ModelCheckpoint(dirpath=dirpath, save_top_k=-1, every_n_epochs=1, filename="{epoch}")]
        return cbs + ([ScheduleFreeCallback()] if variant == "user_built" else [])

    full = make_module(variant)
    trainer(tmp_path, max_epochs=3, callbacks=callbacks(tmp_path / "full"), **limit).fit(full, loader(), **val)

    resumed = make_module(variant)  # fresh module, fresh Trainer
    trainer(tmp_path, max_epochs=3, callbacks=callbacks(tmp_path / "resumed"), **limit).fit(
        resumed, loader(), ckpt_path=str(tmp_path / "full" / "epoch=0.ckpt"), **val
    )
    for key, value in full.net.state_dict().items():
        assert torch.equal(resumed.net.state_dict()[key], value), key  # bit-exact


def test_resume_without_stored_train_weights_is_close(tmp_path):
    """exact_resume=False: the train point is re-derived from the averaged one (equal up to rounding)."""
    full = make_module("schedule_free_adamw")

    def cbs(d):
        return [ModelCheckpoint(dirpath=d, save_top_k=-1, filename="{epoch}"), ScheduleFreeCallback(exact_resume=False)]

    trainer(tmp_path, max_epochs=3, limit_val_batches=0, callbacks=cbs(tmp_path / "a")).fit(full, loader())
    ckpt = torch.load(tmp_path / "a" / "epoch=0.ckpt", weights_only=True)
    assert [v["train_weights"] for k, v in ckpt["callbacks"].items() if k.startswith("ScheduleFree")] == [None]
    resumed = make_module("schedule_free_adamw")
    trainer(tmp_path, max_epochs=3, limit_val_batches=0, callbacks=cbs(tmp_path / "b")).fit(
        resumed, loader(), ckpt_path=str(tmp_path / "a" / "epoch=0.ckpt")
    )
    for key, value in full.net.state_dict().items():
        torch.testing.assert_close(resumed.net.state_dict()[key], value, atol=1e-5, rtol=0)


def test_standalone_test_after_fit_sees_averaged_weights(tmp_path):
    module = make_module("schedule_free_adamw")
    trainer(
        tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[ModelCheckpoint(dirpath=tmp_path, filename="last")]
    ).fit(module, loader())
    ref_model, _ = reference_run("schedule_free_adamw", epochs=1, val_every=None)
    loaded = MixinModule.load_from_checkpoint(tmp_path / "last.ckpt", **WEIGHTS_ONLY)
    assert_weights(loaded.net.state_dict(), ref_model.state_dict())
    fresh = trainer(tmp_path)
    fresh.test(loaded, loader(16))  # a new Trainer without optimizers: nothing to switch, weights averaged
    assert_weights(loaded.net.state_dict(), ref_model.state_dict())


def test_batch_norm_recalibration(tmp_path):
    module = make_module("schedule_free_adamw", batch_norm=True)
    trainer(
        tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[ScheduleFreeCallback(bn_recalibration_batches=3)]
    ).fit(module, loader())
    bn = module.net[1]
    # statistics of the averaged weights on the first 3 training batches (what the authors' recipe computes)
    expected = copy.deepcopy(module.net)
    expected[1].reset_running_stats()
    expected[1].momentum = None
    expected.train()
    with torch.no_grad():
        for i, (x, _) in enumerate(loader()):
            if i == 3:
                break
            expected(x)
    torch.testing.assert_close(bn.running_mean, expected[1].running_mean)
    torch.testing.assert_close(bn.running_var, expected[1].running_var)
    assert bn.momentum == 0.1  # restored

    # without recalibration the statistics are those of the training weights, and a warning says so
    plain = make_module("schedule_free_adamw", batch_norm=True)
    with pytest.warns(UserWarning, match="BatchNorm"):
        trainer(tmp_path, max_epochs=1, limit_val_batches=0).fit(plain, loader())
    assert not torch.allclose(plain.net[1].running_mean, expected[1].running_mean, atol=1e-4)


def test_recommendation_warnings():
    with pytest.warns(UserWarning, match="'constant' is recommended"):
        OptimizerArguments(optim="schedule_free_adamw", lr_scheduler_type="linear")
    with pytest.warns(UserWarning, match="needs no warmup"):
        OptimizerArguments(optim="schedule_free_radam", lr_scheduler_type="constant_with_warmup", warmup_steps=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        OptimizerArguments(optim="schedule_free_adamw", lr_scheduler_type="constant", warmup_steps=5)


def test_wrapper_is_recognised():
    model = net()
    wrapper = schedulefree.ScheduleFreeWrapper(torch.optim.SGD(model.parameters(), lr=0.1), momentum=0.9)
    assert is_schedule_free(wrapper) and not in_train_mode(wrapper)
    wrapper.train()
    assert in_train_mode(wrapper)
    assert not is_schedule_free(torch.optim.AdamW(model.parameters()))


# -- the callback shaped like Lightning's own -------------------------------------------------------------------------


def save_in_train_mode(tmp_path, variant: str, name: str, copying: bool = False, counter=None) -> dict:
    """A checkpoint saved by hand at step 5 (train mode); with ``copying``, through the path that moves the weights."""
    module = make_module(variant)
    path = tmp_path / f"{name}.ckpt"

    class Save(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 5:
                assert in_train_mode(trainer.optimizers[0])
                with counter or contextlib.nullcontext():
                    trainer.save_checkpoint(path)

    callbacks = [Save()] + ([ScheduleFreeCallback()] if variant == "user_built" else [])
    patch = mock.patch.object(sf_callback, "_eval_point_into", return_value=False)
    with patch if copying else contextlib.nullcontext():
        trainer(tmp_path, max_steps=6, limit_val_batches=0, callbacks=callbacks).fit(module, loader())
    return torch.load(path, weights_only=True)


def assert_same_tree(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}/{i}")
    else:
        assert a == b, where


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_train_mode_checkpoint_computed_out_of_place_equals_the_one_eval_writes(tmp_path, variant):
    """The averaged point computed into the checkpoint (lerp out of place) is bit for bit what eval() writes in
    place: weights, optimizer state (eval mode) and the stored train weights."""
    ours = save_in_train_mode(tmp_path, variant, "out_of_place")
    moving = save_in_train_mode(tmp_path, variant, "copying", copying=True)
    for key in ("state_dict", "optimizer_states", "callbacks"):
        assert_same_tree(ours[key], moving[key], key)
    assert all(g["train_mode"] is False for g in ours["optimizer_states"][0]["param_groups"])


def test_a_train_mode_save_makes_one_copy_of_the_averaged_parameters(tmp_path):
    averaged = sum(p.numel() * p.element_size() for p in net().parameters())  # (every parameter has a z)
    ours, moving = AllocatedBytes(), AllocatedBytes()
    save_in_train_mode(tmp_path, "schedule_free_adamw", "ours", counter=ours)
    save_in_train_mode(tmp_path, "schedule_free_adamw", "moving", copying=True, counter=moving)
    assert ours.bytes == averaged  # the averaged point, nothing else
    assert moving.bytes == 2 * averaged  # the train point copied, and the captured state copied


def test_state_dict_and_load_state_dict_hold_the_same_keys(tmp_path):
    callback = ScheduleFreeCallback()
    ckpt = save_in_train_mode(tmp_path, "schedule_free_adamw", "keys")
    (saved,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("ScheduleFreeCallback")]
    assert saved.keys() == callback.state_dict().keys() == {"train_weights"}
    callback.load_state_dict(saved)
    assert callback._resume_weights.keys() == {f"net.{k}" for k in net().state_dict()}


def test_the_batch_norm_warning_comes_from_the_first_process_only(tmp_path):
    from lightning_utilities.core.rank_zero import rank_zero_only

    def fit():
        module = make_module("schedule_free_adamw", batch_norm=True)
        trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(module, loader())

    with pytest.warns(UserWarning, match="has BatchNorm layers"):
        fit()
    with mock.patch.object(rank_zero_only, "rank", 1), warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*BatchNorm.*")
        fit()


class LoggingRecalibrated(MixinModule):
    """Logs in training_step, as most modules do; records how the recalibration ran it."""

    def training_step(self, batch, batch_idx):
        if not torch.is_grad_enabled():  # (the recalibration runs training_step without gradients)
            self.recalibration_calls = getattr(self, "recalibration_calls", 0) + 1
            assert "log" not in vars(self) and "log_dict" not in vars(self)  # the module's own log methods
            self.log("probe", 1000.0)
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss)
        return loss


def test_batch_norm_recalibration_discards_what_training_step_logs(tmp_path):
    module = LoggingRecalibrated(True, optim="schedule_free_adamw", learning_rate=LR, lr_scheduler_type="constant")
    t = trainer(
        tmp_path,
        max_steps=4,
        val_check_interval=2,
        callbacks=[ScheduleFreeCallback(bn_recalibration_batches=2)],
        logger=L.pytorch.loggers.CSVLogger(tmp_path),
        log_every_n_steps=1,
    )
    t.fit(module, loader(), loader(16))
    assert module.recalibration_calls == 4  # 2 batches before each of the 2 validations (steps 2 and 4; fit ends
    # right after the second, already in eval mode: nothing to recalibrate again)
    assert "probe" not in t.callback_metrics and "probe" not in t.logged_metrics
    logged = (Path(t.logger.log_dir) / "metrics.csv").read_text()
    assert "probe" not in logged and "train_loss" in logged
