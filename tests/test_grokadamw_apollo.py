"""GrokAdamW and APOLLO / GaLore: upstream's updates, checkpoints that load weights-only and resume exactly,
the grokking signal from the logged losses, layer-wise variants."""

from __future__ import annotations

import importlib.util

import grokadamw
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_optims import GrokkingSignalCallback, OptimizerArguments, create_optimizer
from lightning_optims.families.grokadamw import GrokAdamW, grokking_signal
from tests.helpers import LlamaModule, lightning_trainer, loader, tiny_llama

MINI = "proj=random,rank=1,scale=128.0,scale_type=tensor,update_proj_gap=2"
HAS_GALORE = importlib.util.find_spec("galore_torch") is not None


@pytest.mark.parametrize("optim_args", [None, "alpha_init=0.9,lamb=1.5,gamma=0.2,gradient_clipping=0.05"])
def test_grokadamw_equals_upstream_step_by_step(optim_args):
    args = OptimizerArguments(optim="grokadamw", learning_rate=1e-2, weight_decay=0.05, optim_args=optim_args)
    ours_model, ref_model = tiny_llama(), tiny_llama()
    ours = create_optimizer(ours_model, args)
    # upstream, built the way transformers' Trainer builds it (same groups and kwargs)
    groups = [
        {
            **{k: v for k, v in g.items() if k != "params"},
            "params": [
                dict(ref_model.named_parameters())[n]
                for n, p in ours_model.named_parameters()
                if any(p is q for q in g["params"])
            ],
        }
        for g in ours.param_groups
    ]
    ref = grokadamw.GrokAdamW(groups, **{k: v for k, v in ours.defaults.items() if k not in ("grokking_signal_fns",)})
    assert isinstance(ours, grokadamw.GrokAdamW) and type(ours) is GrokAdamW
    for step, batch in enumerate(loader()):
        for opt, model in ((ours, ours_model), (ref, ref_model)):
            for g in opt.param_groups:  # a signal that changes every step, and none at the first
                g["train_loss"], g["eval_loss"] = (None, None) if step == 0 else (1.0, 1.0 + 0.3 * step)
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
        for (n, a), b in zip(ours_model.named_parameters(), ref_model.parameters()):
            assert torch.equal(a, b), f"step {step} {n}: {(a - b).abs().max()}"
    # the state is in optimizer.state, on the parameter's device, and in the state_dict
    p = next(ours_model.parameters())
    assert ours.state[p]["exp_avg"].device == p.device and ours.state[p]["step"] == 8
    assert len(ours.state_dict()["state"]) == len(list(ours_model.parameters()))


class LoggedLosses(LlamaModule):
    """Logs training and validation losses chosen by the test (the real loss still trains the model)."""

    def __init__(self, train_value, val_value, **kwargs):
        super().__init__(**kwargs)
        self.train_value, self.val_value = train_value, val_value

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("train_loss", self.train_value(self.global_step))
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.val_value(self.global_step))


class SignalSpy(Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        group = trainer.optimizers[0].param_groups[0]
        cb = next(c for c in trainer.callbacks if isinstance(c, GrokkingSignalCallback))
        self.seen.append(
            (
                group.get("train_loss"),
                group.get("eval_loss"),
                cb.last_signal,
                trainer.callback_metrics.get("grokking_signal"),  # (logged where a logger writes)
            )
        )


def test_grokking_signal_follows_the_logged_losses(tmp_path):
    spy = SignalSpy()
    module = LoggedLosses(lambda step: 1.0 + step, lambda step: 10.0 + step, model=tiny_llama(), optim="grokadamw")
    trainer = lightning_trainer(
        6,
        limit_val_batches=1,
        val_check_interval=3,
        callbacks=[spy],
        logger=CSVLogger(str(tmp_path)),
        log_every_n_steps=1,
    )
    trainer.fit(module, loader(), loader())
    # steps 0-2: no validation yet -> signal 0; from step 3 on: the validation loss logged at step 3 (13.0)
    for step, (train, val, signal, logged) in enumerate(spy.seen):
        assert train == pytest.approx(1.0 + step)
        expected_val = None if step < 3 else 13.0
        assert val == expected_val
        assert signal == pytest.approx(grokking_signal(train, val)) == pytest.approx(float(logged))
    assert spy.seen[2][2] == 0.0 and spy.seen[3][2] == pytest.approx((13.0 - 4.0) / 13.0)
    # changing the losses changes the signal
    spy2 = SignalSpy()
    module2 = LoggedLosses(lambda step: 5.0, lambda step: 6.0, model=tiny_llama(), optim="grokadamw")
    lightning_trainer(6, limit_val_batches=1, val_check_interval=3, callbacks=[spy2]).fit(module2, loader(), loader())
    assert spy2.seen[4][2] == pytest.approx(1.0 / 6.0) != spy.seen[4][2]


def test_grokking_signal_functions_are_used():
    spy = SignalSpy()
    module = LlamaModule(model=tiny_llama(), optim="grokadamw")
    cb = GrokkingSignalCallback(signal_fns=[lambda: 0.25, lambda: 0.75])
    lightning_trainer(2, callbacks=[cb, spy]).fit(module, loader())
    assert [s[2] for s in spy.seen] == [0.5, 0.5]


def fit_with_checkpoints(name: str, tmp_path, ckpt_path=None, **kwargs):
    module = LlamaModule(model=tiny_llama(), optim=name, learning_rate=1e-2, **kwargs)
    dirpath = tmp_path / ("resumed" if ckpt_path else "full")
    trainer = lightning_trainer(
        -1,
        max_epochs=3,
        limit_val_batches=1,
        enable_checkpointing=True,
        callbacks=[ModelCheckpoint(dirpath=dirpath, save_top_k=-1, filename="{epoch}")],
    )
    trainer.fit(module, loader(n=16), loader(n=8), ckpt_path=ckpt_path)
    return module, dirpath


RESUMABLE = {
    "grokadamw": dict(weight_decay=0.01),
    "apollo_adamw": dict(optim_target_modules=[r".*.attn.*", r".*.mlp.*"], optim_args=MINI),
    "apollo_adamw_layerwise": dict(optim_target_modules="all-linear", optim_args=MINI, max_grad_norm=0.0),
}
if HAS_GALORE:
    RESUMABLE["galore_adamw"] = dict(optim_target_modules="all-linear", optim_args="rank=2,update_proj_gap=2")


@pytest.mark.parametrize("name", list(RESUMABLE))
def test_crash_and_resume_equals_uninterrupted(tmp_path, name):
    full, dirpath = fit_with_checkpoints(name, tmp_path, **RESUMABLE[name])
    ckpt = torch.load(dirpath / "epoch=0.ckpt", weights_only=True)  # loads without unpickling objects
    assert ckpt["optimizer_states"][0]["state"] or ckpt["optimizer_states"][0].get("inner")
    resumed, _ = fit_with_checkpoints(name, tmp_path, ckpt_path=str(dirpath / "epoch=0.ckpt"), **RESUMABLE[name])
    for key, value in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key


def test_upstream_apollo_checkpoint_needs_unpickling(tmp_path):
    """The fault fixed here: apollo_torch's projector objects make weights-only loading fail."""
    from apollo_torch import APOLLOAdamW as Upstream

    args = OptimizerArguments(optim="apollo_adamw", optim_target_modules="all-linear", optim_args=MINI)
    model, upstream_model = tiny_llama(), tiny_llama()
    ours = create_optimizer(model, args)
    upstream = Upstream(create_optimizer(upstream_model, args).param_groups)
    for opt, net in ((ours, model), (upstream, upstream_model)):
        net(**next(iter(loader()))).loss.backward()
        opt.step()
        opt.zero_grad()
    torch.save(upstream.state_dict(), tmp_path / "upstream.pt")
    torch.save(ours.state_dict(), tmp_path / "ours.pt")
    with pytest.raises(Exception, match=r"weights_only|Unsupported global"):
        torch.load(tmp_path / "upstream.pt", weights_only=True)
    sd = torch.load(tmp_path / "ours.pt", weights_only=True)
    fresh = create_optimizer(tiny_llama(), args)
    fresh.load_state_dict(sd)
    projectors = [s["projector"] for s in fresh.state.values() if "projector" in s]
    assert projectors and all(type(p).__name__ == "GradientProjector" for p in projectors)
    originals = [s["projector"] for s in ours.state.values() if "projector" in s]
    assert all(torch.equal(a.ortho_matrix, b.ortho_matrix) and a.seed == b.seed for a, b in zip(projectors, originals))


def test_checkpoint_naming_another_class_is_refused():
    from lightning_optims.families.projection import projector_from_state

    with pytest.raises(ValueError, match="not one of"):
        projector_from_state({"__projector__": "os:system", "rank": 1})


def test_apollo_layerwise_refusals():
    module = LlamaModule(
        model=tiny_llama(), optim="apollo_adamw_layerwise", optim_target_modules="all-linear", max_grad_norm=0.0
    )
    with pytest.raises(MisconfigurationException, match="accumulate_grad_batches=2"):
        lightning_trainer(2, accumulate_grad_batches=2).fit(module, loader())


def test_apollo_layerwise_hooks_removed_after_fit():
    module = LlamaModule(
        model=tiny_llama(), optim="apollo_adamw_layerwise", optim_target_modules="all-linear", max_grad_norm=0.0
    )
    lightning_trainer(2).fit(module, loader())
    assert all(not p._post_accumulate_grad_hooks for p in module.parameters())


class RecordInnerLrs(Callback):
    """The lr each layer-wise inner optimizer has when it steps, and the scheduled lr of that step (the outer group's,
    which Lightning's scheduler sets: read as the step's batch starts)."""

    def __init__(self) -> None:
        self.scheduled: list[float] = []
        self.applied: list[set[float]] = []

    def on_train_start(self, trainer, pl_module):
        for inner in trainer.optimizers[0].optimizer_dict.values():
            step = inner.step

            def recording_step(*args, _inner=inner, _step=step, **kwargs):
                self.applied[-1].add(_inner.param_groups[0]["lr"])
                return _step(*args, **kwargs)

            inner.step = recording_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.scheduled.append(trainer.optimizers[0].param_groups[0]["lr"])
        self.applied.append(set())


@pytest.mark.parametrize("name", ["apollo_adamw_layerwise", "galore_adamw_layerwise"])
def test_layerwise_inner_optimizers_apply_the_scheduled_lr(name):
    """Each parameter's optimizer steps with the lr the schedule gives that step (warmup, then linear decay), not
    the lr it was built with: the fault of transformers' layer-wise optimizers, which keep their first lr
    (tests/test_parity_transformers.py::test_trainer_layerwise_ignores_the_schedule)."""
    if name.startswith("galore") and not HAS_GALORE:
        pytest.skip("galore-torch is not installed")
    steps = 5
    module = LlamaModule(
        model=tiny_llama(),
        optim=name,
        optim_target_modules="all-linear",
        optim_args="rank=2",
        learning_rate=1e-2,
        lr_scheduler_type="linear",
        warmup_steps=2,
        max_grad_norm=0.0,
    )
    record = RecordInnerLrs()
    lightning_trainer(steps, callbacks=[record]).fit(module, loader())
    # warmup from 0, peak at step 2, then down: five different rates, each applied by every inner optimizer
    assert record.scheduled == pytest.approx([0.0, 5e-3, 1e-2, 1e-2 * 2 / 3, 1e-2 / 3])
    assert record.applied == [{lr} for lr in record.scheduled]
