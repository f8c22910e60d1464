"""LOMO / AdaLomo: the fused-backward engine against lomo_optim, the applied lr, clipping, resume, refusals."""

from __future__ import annotations

import math
import warnings

import lightning as L
import lomo_optim
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from transformers import get_scheduler

from lightning_optims import OptimizerMixin
from lightning_optims.engines.in_backward import InBackwardOptimizer
from lightning_optims.errors import NonFiniteGradientError
from lightning_optims.families.lomo import AdaLomo, Lomo
from tests.helpers import LlamaModule, NanGradient, lightning_trainer, loader, tiny_llama
from tests.test_parity_transformers import cuda_calls_neutralised

STEPS, BATCH = 6, 4


def reference_run(
    name: str,
    lr: float,
    clip_grad_norm=None,
    clip_grad_value=None,
    weight_decay=0.0,
    checkpointing: bool = False,
    **options,
):
    """A hand-written lomo_optim loop over the same batches (AdaLomo's .cuda() neutralised on this CPU)."""
    model = tiny_llama()
    if checkpointing:
        model.gradient_checkpointing_enable()
    cls = lomo_optim.AdaLomo if name == "adalomo" else lomo_optim.Lomo
    with cuda_calls_neutralised():
        opt = cls(
            model,
            lr=lr,
            clip_grad_norm=clip_grad_norm,
            clip_grad_value=clip_grad_value,
            weight_decay=weight_decay,
            **options,
        )
    for i, batch in enumerate(loader(BATCH)):
        if i == STEPS:
            break
        loss = model(**batch).loss
        if clip_grad_norm is not None:
            opt.grad_norm(loss)
        opt.fused_backward(loss, lr)
    return model


def our_run(name: str, lr: float, max_grad_norm=0.0, optim_args=None, model=None, **trainer_kwargs):
    module = LlamaModule(
        model=model or tiny_llama(),
        optim=name,
        learning_rate=lr,
        lr_scheduler_type="constant",
        max_grad_norm=max_grad_norm,
        optim_args=optim_args,
    )
    lightning_trainer(STEPS, **trainer_kwargs).fit(module, loader(BATCH))
    return module


def assert_same_weights(ours: nn.Module, reference: nn.Module, atol: float = 1e-6) -> None:
    ref = reference.state_dict()
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, ref[key], atol=atol, rtol=0, msg=lambda m, key=key: f"{key}: {m}")


CASES = [
    dict(),
    dict(weight_decay=0.1),
    dict(clip_grad_value=0.01),
    dict(clip_grad_norm=0.5),
    dict(clip_grad_norm=0.5, clip_grad_value=0.02, weight_decay=0.05),
]


@pytest.mark.parametrize("bucket_mb", [8.0, 0.0], ids=["bucketed", "per-parameter"])
@pytest.mark.parametrize("name, lr", [("lomo", 1e-2), ("adalomo", 1e-2)])
@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "plain")
def test_same_weights_as_lomo_optim(name, lr, case, bucket_mb):
    reference = reference_run(name, lr, **case)
    optim_args = {k: v for k, v in case.items() if k in ("weight_decay", "clip_grad_value")}
    optim_args["bucket_mb"] = bucket_mb
    module = our_run(name, lr, max_grad_norm=case.get("clip_grad_norm", 0.0), optim_args=optim_args)
    assert_same_weights(module.model, reference)
    assert all(p.grad is None for p in module.parameters())  # no gradient held after the steps
    assert not torch.equal(module.model.state_dict()["lm_head.weight"], tiny_llama().state_dict()["lm_head.weight"])


@pytest.mark.parametrize("bucket_mb", [8.0, 0.0], ids=["bucketed", "per-parameter"])
def test_adalomo_update_clip_as_lomo_optim(bucket_mb):
    """``clip_threshold`` well below the updates' RMS: AdaLomo's clip (each update divided by ``max(1, RMS /
    clip_threshold)``) sets every step's size here, so leaving it out moves the weights far more than the 1e-6 the
    comparison allows (with the default threshold of 1.0 it moved them by 1.8e-6 to 4.3e-6 only)."""
    reference = reference_run("adalomo", 1e-2, clip_threshold=0.05)
    module = our_run("adalomo", 1e-2, optim_args={"clip_threshold": 0.05, "bucket_mb": bucket_mb})
    assert_same_weights(module.model, reference)


class ConstantGradient(OptimizerMixin, L.LightningModule):
    """loss = sum(w): every gradient element is 1, so each step moves w by exactly -lr."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.w = nn.Parameter(torch.zeros(4))
        self.applied: list[float] = []

    def training_step(self, batch, batch_idx):
        return self.w.sum() * 1.0

    def on_train_batch_start(self, batch, batch_idx):
        self._before = self.w.detach().clone()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.applied.append(float((self._before - self.w.detach())[0]))

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(40, 1), batch_size=1)


def test_applied_lr_follows_warmup_cosine():
    steps = 20
    module = ConstantGradient(
        optim="lomo", learning_rate=0.1, lr_scheduler_type="cosine", warmup_steps=5, max_grad_norm=0.0
    )
    lightning_trainer(steps).fit(module)
    # the expected schedule, from transformers' own scheduler on a dummy optimizer
    dummy = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = get_scheduler("cosine", dummy, num_warmup_steps=5, num_training_steps=steps)
    expected = []
    for _ in range(steps):
        expected.append(dummy.param_groups[0]["lr"])
        dummy.step()
        sched.step()
    assert expected[0] == 0.0 and max(expected) == pytest.approx(0.1)
    assert module.applied == pytest.approx(expected, abs=1e-7)


def test_state_dict_carries_adalomo_state():
    model = tiny_llama()
    opt = AdaLomo(model, lr=1e-3)
    batch = next(iter(loader(BATCH)))
    opt.fused_backward(model(**batch).loss)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["step"] == 1
    assert len(sd["state"]) == len(list(model.parameters()))
    assert {"exp_avg_sq_row", "exp_avg_sq_col"} <= set(sd["state"][0]) or "exp_avg_sq" in sd["state"][0]
    fresh = AdaLomo(tiny_llama(), lr=1e-3)
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["step"] == 1
    opt.remove_hooks()
    fresh.remove_hooks()


@pytest.mark.parametrize("name", ["lomo", "adalomo"])
def test_resume_equals_uninterrupted(tmp_path, name):
    def run(ckpt_path=None, dirpath=None):
        module = LlamaModule(
            model=tiny_llama(),
            optim=name,
            learning_rate=1e-2,
            lr_scheduler_type="cosine",
            warmup_steps=2,
            max_grad_norm=1.0,
        )
        cb = [ModelCheckpoint(dirpath=dirpath, save_top_k=-1, filename="{epoch}")] if dirpath else []
        lightning_trainer(-1, max_epochs=3, enable_checkpointing=bool(dirpath), callbacks=cb).fit(
            module, loader(BATCH, n=16), ckpt_path=ckpt_path
        )
        return module

    full = run(dirpath=tmp_path)
    ckpt = torch.load(tmp_path / "epoch=0.ckpt", weights_only=True)
    if name == "adalomo":
        assert ckpt["optimizer_states"][0]["param_groups"][0]["step"] == 4
        assert ckpt["optimizer_states"][0]["state"]  # the second moments travel with the checkpoint
    resumed = run(ckpt_path=str(tmp_path / "epoch=0.ckpt"))
    for key, value in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key


@pytest.mark.parametrize("name", ["lomo", "adalomo"])
def test_gradient_checkpointing(name):
    reference = reference_run(name, 1e-2)
    hf = tiny_llama()
    hf.gradient_checkpointing_enable()
    assert_same_weights(our_run(name, 1e-2, model=hf).model, reference)


class CheckpointedMLP(OptimizerMixin, L.LightningModule):
    def __init__(self, use_checkpoint: bool, **kwargs):
        super().__init__(**kwargs)
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3))
        self.use_checkpoint = use_checkpoint

    def training_step(self, batch, batch_idx):
        x = batch[0]
        for block in self.blocks:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False) if self.use_checkpoint else block(x)
        return x.pow(2).mean()


@pytest.mark.parametrize("name", ["lomo", "adalomo"])
def test_plain_torch_checkpoint(name):
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 8)), batch_size=4)
    weights = []
    for use in (False, True):
        module = CheckpointedMLP(use, optim=name, learning_rate=1e-2, lr_scheduler_type="constant", max_grad_norm=0.0)
        lightning_trainer(4).fit(module, data)
        weights.append(module.blocks.state_dict())
    for key in weights[0]:
        assert torch.equal(weights[1][key], weights[0][key]), key


@pytest.mark.parametrize(
    "trainer_kwargs, message",
    [
        (dict(accumulate_grad_batches=2), "accumulate_grad_batches=2"),
        (dict(gradient_clip_val=0.5), "max_grad_norm"),
    ],
)
def test_refused_at_setup(trainer_kwargs, message):
    module = LlamaModule(model=tiny_llama(), optim="lomo", max_grad_norm=0.0)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(MisconfigurationException, match=message):
        lightning_trainer(2, **trainer_kwargs).fit(module, loader())
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


class Poisoned(NanGradient):
    poison_batch = 2  # the third step


class BeforeThirdStep(Callback):
    """The weights and optimizer state as the third step starts."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == Poisoned.poison_batch:
            self.weights = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
            optimizer = trainer.optimizers[0]
            self.state = {
                n: {k: v.clone() for k, v in optimizer.state.get(p, {}).items()}
                for n, p in pl_module.named_parameters()
            }


@pytest.mark.parametrize("name, max_grad_norm", [("lomo", 0.0), ("adalomo", 0.0), ("lomo", 1.0)])
def test_non_finite_gradient_stops_with_the_step_named(name, max_grad_norm):
    """Only ``lm_head.weight[0, 0]`` gets a NaN gradient: that parameter and its state are left as they were (weight
    decay included); without clipping the other parameters were updated in the same backward, with clipping (its norm
    pass first) none was."""
    module = Poisoned(
        model=tiny_llama(), optim=name, learning_rate=1e-2, max_grad_norm=max_grad_norm, optim_args="weight_decay=0.1"
    )
    before = BeforeThirdStep()
    with pytest.raises(NonFiniteGradientError, match="fused step 3"):
        lightning_trainer(5, callbacks=[before]).fit(module, loader())
    assert all(torch.isfinite(p).all() for p in module.parameters())
    changed = {n for n, p in module.named_parameters() if not torch.equal(p, before.weights[n])}
    assert "model.lm_head.weight" not in changed
    state = module.trainer.optimizers[0].state.get(module.model.lm_head.weight, {})
    assert all(torch.equal(v, before.state["model.lm_head.weight"][k]) for k, v in state.items())
    assert len(changed) == (0 if max_grad_norm else len(before.weights) - 1)


def test_hooks_removed_after_fit_and_second_fit_works():
    module = LlamaModule(
        model=tiny_llama(), optim="lomo", learning_rate=1e-2, lr_scheduler_type="constant", max_grad_norm=0.0
    )
    lightning_trainer(3).fit(module, loader())
    assert all(not p._post_accumulate_grad_hooks for p in module.parameters())
    after_first = {k: v.clone() for k, v in module.state_dict().items()}
    lightning_trainer(3).fit(module, loader())  # a second fit: one update per step, not two
    reference = LlamaModule(
        model=tiny_llama(), optim="lomo", learning_rate=1e-2, lr_scheduler_type="constant", max_grad_norm=0.0
    )
    reference.load_state_dict(after_first)
    opt = Lomo(reference.model, lr=1e-2)
    for i, batch in enumerate(loader()):
        if i == 3:
            break
        opt.fused_backward(reference.model(**batch).loss)
    opt.remove_hooks()
    assert_same_weights(module.model, reference.model)


def test_bf16_mixed_trains():
    module = LlamaModule(model=tiny_llama(), optim="adalomo", learning_rate=1e-2, max_grad_norm=1.0)
    losses = []

    class Spy(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    lightning_trainer(8, precision="bf16-mixed", callbacks=[Spy()]).fit(module, loader(n=8))
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert isinstance(module.trainer.optimizers[0], InBackwardOptimizer)
    assert sum(losses[-2:]) < sum(losses[:2])


def test_per_parameter_mode_frees_each_gradient_during_backward():
    """bucket_mb=0: when the last gradient arrives, every earlier one was already applied and freed."""
    model = tiny_llama()
    opt = Lomo(model, lr=1e-3, bucket_bytes=0)
    held = []
    params = list(model.parameters())
    for p in params:
        p.register_post_accumulate_grad_hook(lambda _: held.append(sum(q.grad is not None for q in params)))
    opt.fused_backward(model(**next(iter(loader()))).loss)
    opt.remove_hooks()
    assert max(held) <= 1 and all(p.grad is None for p in params)


def test_fp16_dynamic_loss_scaling_skips_overflowed_steps():
    """16-true: fp16 weights and gradients. The first scales overflow the fp16 gradients: those steps are skipped
    with a warning and the scale halves, then training proceeds; the scaler's state is in the state_dict."""
    module = LlamaModule(
        model=tiny_llama(), optim="lomo", learning_rate=1e-2, max_grad_norm=1.0, optim_args={"init_loss_scale": 2.0**24}
    )
    before = {k: v.clone().half() for k, v in module.model.state_dict().items()}
    with pytest.warns(UserWarning, match="gradient overflow at fused step 1: step skipped, loss scale 1.67772e"):
        lightning_trainer(16, precision="16-true").fit(module, loader(n=64))
    opt = module.trainer.optimizers[0]
    scaler = opt.state_dict()["param_groups"][0]["loss_scaler"]
    assert scaler == opt.loss_scaler.state_dict()
    assert 1.0 < scaler["scale"] < 2.0**24 and 1 <= scaler["skipped"] < 16 and scaler["iter"] == 16
    weights = module.model.state_dict()
    assert all(v.dtype == torch.float16 and torch.isfinite(v).all() for v in weights.values())
    assert not torch.equal(weights["lm_head.weight"], before["lm_head.weight"])


def test_fp16_loss_scaler_state_is_restored_on_resume(tmp_path):
    """The loss scaler is an object with its own state_dict, carried by the optimizer's: a fit resumed from an
    epoch-end checkpoint (the scale halved by the first steps' overflows, then doubled every 3 steps without one)
    ends with the uninterrupted run's scaler state and weights, bit for bit. Without the scaler's state in the
    checkpoint the resumed fit starts again at 2**24 and skips steps the uninterrupted one took."""
    settings = dict(optim="lomo", learning_rate=1e-2, max_grad_norm=1.0)
    settings["optim_args"] = {"init_loss_scale": 2.0**24, "scale_window": 3}

    def fit(**kwargs):
        module = LlamaModule(model=tiny_llama(), **settings)
        callbacks = [ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{epoch}")]
        trainer = lightning_trainer(
            -1, max_epochs=2, precision="16-true", enable_checkpointing=True, callbacks=callbacks
        )
        with warnings.catch_warnings():  # (the overflows' warnings: tested above)
            warnings.simplefilter("ignore", UserWarning)
            trainer.fit(module, loader(n=64), **kwargs)
        return module, trainer.optimizers[0].loss_scaler.state_dict()

    full, full_scaler = fit()
    resumed, resumed_scaler = fit(ckpt_path=str(tmp_path / "epoch=0.ckpt"))
    saved = torch.load(tmp_path / "epoch=0.ckpt", weights_only=False)["optimizer_states"][0]
    assert saved["param_groups"][0]["loss_scaler"]["skipped"] >= 1  # the first epoch overflowed
    assert full_scaler["scale"] > 2.0**24 / 2 ** full_scaler["skipped"]  # it also grew back
    assert resumed_scaler == full_scaler
    for key, value in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
