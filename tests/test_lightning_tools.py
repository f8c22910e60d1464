"""Lightning's own tools with the mixin: each one does what Lightning documents, with every family, or is refused
in our words when fit starts (or when the tool acts).

Tools covered: the learning-rate finder (``Tuner.lr_find`` and the ``LearningRateFinder`` callback), finetuning
callbacks (``BackboneFinetuning``, which adds a param group mid-training), ``GradientAccumulationScheduler``,
``StochasticWeightAveraging`` / ``EMAWeightAveraging``, ``LearningRateMonitor``, ``BatchSizeFinder``, Trainer
clipping, and manual optimization.
"""

from __future__ import annotations

import math

import lightning as L
import lightning.pytorch.callbacks
import pytest
import torch
from lightning.pytorch.callbacks import (
    BackboneFinetuning,
    BatchSizeFinder,
    Callback,
    GradientAccumulationScheduler,
    LearningRateFinder,
    LearningRateMonitor,
    StochasticWeightAveraging,
)
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.tuner import Tuner
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_optims import OptimizerSettingError
from lightning_optims.build import ScheduledGroupsLambdaLR
from tests.helpers import LlamaModule, TokenDataset, lightning_trainer, loader, needs, tiny_llama
from tests.test_reliability import ALL, require_usable, settings

#: EMAWeightAveraging comes with WeightAveraging (Lightning 2.6); below it the rule has no class to refuse
EMAWeightAveraging = getattr(lightning.pytorch.callbacks, "EMAWeightAveraging", None)
needs_weight_averaging = needs("weight_averaging")

BACKBONE_FAMILIES = ALL  # every registered optimizer (the CUDA-only ones are skipped with the reason)


class BackboneModule(LlamaModule):
    """The decoder is the backbone (``BackboneFinetuning`` freezes it, then unfreezes it at an epoch)."""

    @property
    def backbone(self) -> torch.nn.Module:
        return self.model.model


class EpochSnapshots(Callback):
    def __init__(self) -> None:
        self.backbone: list[dict[str, torch.Tensor]] = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.backbone.append({k: v.detach().clone() for k, v in pl_module.backbone.state_dict().items()})


def _backbone_params(module: BackboneModule) -> set[int]:
    return {id(p) for p in module.backbone.parameters()}


# -- finetuning callbacks: a param group added during training --------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", BACKBONE_FAMILIES)
def test_backbone_finetuning_trains_the_unfrozen_backbone(name):
    require_usable(name)
    module = BackboneModule(model=tiny_llama(), **settings(name))
    initial = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    snapshots = EpochSnapshots()
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=1, lambda_func=lambda epoch: 2.0)
    trainer = lightning_trainer(-1, max_epochs=3, callbacks=[finetuning, snapshots])
    trainer.fit(module, loader(n=16))

    frozen_epoch, *later = snapshots.backbone
    assert all(torch.equal(frozen_epoch[k], initial[k]) for k in initial), f"{name}: the frozen backbone moved"
    final = later[-1]
    moved = [k for k in initial if not torch.equal(final[k], initial[k])]
    assert len(moved) == len(initial), f"{name}: unfrozen but never updated: {sorted(set(initial) - set(moved))}"

    optimizer = trainer.optimizers[0]
    backbone = _backbone_params(module)
    groups = [g for g in optimizer.param_groups if any(id(p) in backbone for p in g["params"])]
    # the lr BackboneFinetuning gave the backbone is the lr its group has (the schedule did not overwrite it)
    assert float(groups[-1]["lr"]) == pytest.approx(finetuning.previous_backbone_lr)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    if isinstance(scheduler, ScheduledGroupsLambdaLR):  # the groups built with still follow the schedule
        built = [float(lr) for lr in scheduler.scheduled_lrs()]  # (torchao keeps lr as a tensor)
        assert [float(g["lr"]) for g in optimizer.param_groups[: len(built)]] == pytest.approx(built)
    if name.startswith(("lomo", "adalomo")):
        assert all(p.grad is None for p in module.parameters())  # updated in backward, as the rest
    if name == "muon":  # the unfrozen hidden matrices step with Muon, the rest of the backbone with AdamW
        q_proj = module.model.model.layers[0].self_attn.q_proj.weight
        assert "momentum_buffer" in optimizer.state[q_proj]
        assert next(g for g in optimizer.param_groups if any(p is q_proj for p in g["params"]))["muon"]
        norm = module.model.model.layers[0].input_layernorm.weight
        assert not next(g for g in optimizer.param_groups if any(p is norm for p in g["params"])).get("muon")
    if name == "apollo_adamw":  # the unfrozen target matrices are projected like the others
        q_proj = module.model.model.layers[0].self_attn.q_proj.weight
        assert "projector" in optimizer.state[q_proj]
        group = next(g for g in optimizer.param_groups if any(p is q_proj for p in g["params"]))
        assert group["rank"] == 2


@pytest.mark.parametrize("name", BACKBONE_FAMILIES)
def test_frozen_parameters_are_in_no_group(name):
    require_usable(name)
    from lightning_optims import create_optimizer
    from lightning_optims.arguments import OptimizerArguments

    model = tiny_llama()
    frozen = [
        model.model.embed_tokens.weight,
        model.model.layers[0].self_attn.q_proj.weight,
        model.model.layers[1].input_layernorm.weight,
    ]
    for p in frozen:
        p.requires_grad_(False)
    optimizer = create_optimizer(model, OptimizerArguments(**settings(name)))
    grouped = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not grouped & {id(p) for p in frozen}
    assert grouped >= {id(p) for p in model.parameters() if p.requires_grad}
    getattr(optimizer, "remove_hooks", lambda: None)()


# -- settings on the module: the single source of truth -------------------------------------------------------


class HparamsModule(LlamaModule):
    def __init__(self, **kwargs) -> None:
        super().__init__(model=tiny_llama(), **kwargs)
        self.save_hyperparameters()


def test_settings_are_module_attributes_validated_and_kept_in_hparams():
    module = HparamsModule(optim="adamw_torch", learning_rate=1e-3, weight_decay=0.01)
    assert module.learning_rate == 1e-3 and module.hparams.learning_rate == 1e-3
    module.learning_rate = 3e-4
    assert module.optimizer_arguments.learning_rate == 3e-4 and module.hparams.learning_rate == 3e-4
    with pytest.raises(OptimizerSettingError, match="learning_rate=-1"):
        module.learning_rate = -1
    assert module.learning_rate == 3e-4  # a refused value changes nothing
    with pytest.raises(OptimizerSettingError, match="optim='adamw_trch'"):
        module.optim = "adamw_trch"
    module.weight_decay = 0.1
    assert module.hparams.weight_decay == 0.1
    trainer = lightning_trainer(1)
    trainer.fit(module, loader())
    assert trainer.optimizers[0].param_groups[0]["weight_decay"] == 0.1
    assert trainer.optimizers[0].param_groups[0]["initial_lr"] == 3e-4
    module.weight_decay, module.learning_rate = 0.2, 1e-3  # after fit: the next fit builds from them
    trainer = lightning_trainer(1)
    trainer.fit(module, loader())
    assert trainer.optimizers[0].param_groups[0]["weight_decay"] == 0.2
    assert trainer.optimizers[0].param_groups[0]["initial_lr"] == 1e-3


def test_a_setting_cannot_change_under_a_running_optimizer():
    class ChangeMidFit(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            pl_module.weight_decay = 0.5

    module = HparamsModule(optim="adamw_torch", learning_rate=1e-3)
    with pytest.raises(MisconfigurationException, match=r"weight_decay=0.5: this setting cannot change"):
        lightning_trainer(2, callbacks=[ChangeMidFit()]).fit(module, loader())


# -- the learning-rate finder -----------------------------------------------------------------------------------

LR_FAMILIES = ["adamw_torch", "apollo_adamw", "schedule_free_adamw", "lomo"]


def _first_lr(trainer: L.Trainer) -> float:
    return trainer.optimizers[0].param_groups[0]["initial_lr"]


class FirstAppliedLr(Callback):
    """The lr of the first group at each training batch start (the lr the coming step applies)."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.slow
@pytest.mark.parametrize("name", LR_FAMILIES)
def test_tuner_lr_find_suggestion_is_the_lr_trained_with(tmp_path, name):
    module = HparamsModule(**settings(name, learning_rate=1e-5, lr_scheduler_type="constant"))
    trainer = lightning_trainer(-1, max_epochs=1, default_root_dir=tmp_path)
    finder = Tuner(trainer).lr_find(module, train_dataloaders=loader(n=128), num_training=30, min_lr=1e-5, max_lr=1.0)
    suggestion = finder.suggestion()
    assert suggestion is not None and suggestion != 1e-5
    assert module.learning_rate == suggestion == module.hparams.learning_rate
    applied = FirstAppliedLr()
    trainer = lightning_trainer(3, callbacks=[applied])
    trainer.fit(module, loader())
    assert applied.lrs == pytest.approx([suggestion] * 3)


@pytest.mark.slow
@pytest.mark.parametrize("name", LR_FAMILIES)
def test_learning_rate_finder_callback_lr_is_the_lr_trained_with(tmp_path, name):
    """The callback runs the search inside fit, after the optimizer and the (warmup) schedule were built."""
    module = HparamsModule(**settings(name, learning_rate=1e-5, lr_scheduler_type="linear", warmup_steps=2))
    applied = FirstAppliedLr()
    finder = LearningRateFinder(num_training_steps=30, min_lr=1e-5, max_lr=1.0)
    trainer = lightning_trainer(-1, max_epochs=1, default_root_dir=tmp_path, callbacks=[finder, applied])
    trainer.fit(module, loader(n=128))
    suggestion = finder.optimal_lr.suggestion()
    assert suggestion is not None and module.learning_rate == suggestion == module.hparams.learning_rate
    total = trainer.global_step  # 32 steps: warmup 2, then linear decay to 0 at step 32
    expected = [suggestion * (s / 2 if s < 2 else (total - s) / (total - 2)) for s in range(total)]
    assert applied.lrs == pytest.approx(expected)


# -- schedulers: every accepted lr_scheduler_type trains under Lightning ----------------------------------------

from lightning_optims.arguments import SCHEDULER_NAMES  # noqa: E402

SCHEDULER_KWARGS = {
    "cosine_with_min_lr": {"min_lr": 1e-4},
    "cosine_warmup_with_min_lr": {"min_lr_rate": 0.1},
    "warmup_stable_decay": {"num_decay_steps": 3},
    "greedy": {"patience": 1, "min_lr": 1e-5},
    "reduce_lr_on_plateau": {"patience": 0},
}


class ValLosses(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.losses.append(float(trainer.callback_metrics["val_loss"]))


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_every_scheduler_trains_under_lightning(scheduler):
    from transformers import get_scheduler

    warmup = 0 if scheduler in ("constant", "reduce_lr_on_plateau", "greedy") else 2
    kwargs = SCHEDULER_KWARGS.get(scheduler)
    module = LlamaModule(
        model=tiny_llama(),
        optim="adamw_torch",
        learning_rate=1e-2,
        lr_scheduler_type=scheduler,
        lr_scheduler_kwargs=kwargs,
        warmup_steps=warmup,
    )
    applied, losses = FirstAppliedLr(), ValLosses()
    trainer = lightning_trainer(-1, max_epochs=3, limit_val_batches=2, callbacks=[applied, losses])
    trainer.fit(module, loader(n=16), loader(n=8, seed=2))
    assert trainer.global_step == 12
    scheduler_object = trainer.lr_scheduler_configs[0].scheduler
    if scheduler in ("reduce_lr_on_plateau", "greedy"):  # stepped on val_loss after each validation
        assert trainer.lr_scheduler_configs[0].interval == "epoch"
        assert scheduler_object.best == pytest.approx(min(losses.losses))
        assert len(losses.losses) == 3
    else:  # stepped after every optimizer step: the applied lrs are transformers' schedule
        reference = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
        ref = get_scheduler(
            scheduler, reference, num_warmup_steps=warmup, num_training_steps=12, scheduler_specific_kwargs=kwargs
        )
        expected = []
        for _ in range(12):
            expected.append(reference.param_groups[0]["lr"])
            reference.step()
            ref.step()
        assert applied.lrs == pytest.approx(expected)


@pytest.mark.parametrize("scheduler", ["reduce_lr_on_plateau", pytest.param("greedy", marks=needs("greedy"))])
def test_metric_schedulers_without_validation_are_refused(scheduler):
    module = LlamaModule(model=tiny_llama(), optim="adamw_torch", lr_scheduler_type=scheduler)
    with pytest.raises(
        MisconfigurationException,
        match=f"lr_scheduler_type='{scheduler}' steps on the logged 'val_loss'.*runs no validation",
    ):
        lightning_trainer(1).fit(module, loader())


def test_schedulers_that_transformers_cannot_build_are_refused_with_the_settings():
    with pytest.raises(OptimizerSettingError, match=r"lr_scheduler_type='cosine_with_min_lr'.*min_lr"):
        LlamaModule(model=tiny_llama(), lr_scheduler_type="cosine_with_min_lr")
    with pytest.raises(OptimizerSettingError, match=r"lr_scheduler_type='warmup_stable_decay'.*num_decay_steps"):
        LlamaModule(model=tiny_llama(), lr_scheduler_type="warmup_stable_decay")


# -- gradient accumulation, weight averaging, lr monitor, batch-size finder --------------------------------------


@pytest.mark.parametrize("name", ["lomo", "adalomo", "apollo_adamw_layerwise"])
def test_gradient_accumulation_scheduler_is_refused_for_in_backward_optimizers(name):
    module = LlamaModule(model=tiny_llama(), **settings(name))
    callback = GradientAccumulationScheduler(scheduling={1: 2})
    with pytest.raises(
        MisconfigurationException,
        match=r"GradientAccumulationScheduler\(scheduling=\{1: 2\}\) "
        f"cannot work with optim='{name}'",
    ):
        lightning_trainer(1, callbacks=[callback]).fit(module, loader())


@pytest.mark.parametrize("name", ["adamw_torch", "schedule_free_adamw", "apollo_adamw"])
def test_gradient_accumulation_scheduler_accumulates(name):
    module = LlamaModule(model=tiny_llama(), **settings(name))
    trainer = lightning_trainer(-1, max_epochs=2, callbacks=[GradientAccumulationScheduler(scheduling={1: 2})])
    trainer.fit(module, loader(n=16))
    assert trainer.global_step == 4 + 2  # 4 batches: 4 steps in epoch 0, 2 in epoch 1


@pytest.mark.parametrize(
    "callback",
    [
        lambda: StochasticWeightAveraging(swa_lrs=1e-3),
        pytest.param(lambda: EMAWeightAveraging(), marks=needs_weight_averaging, id="ema"),
    ],
)
@pytest.mark.parametrize("name", ["schedule_free_adamw", "schedule_free_sgd"])
def test_weight_averaging_is_refused_for_schedule_free(name, callback):
    module = LlamaModule(model=tiny_llama(), **settings(name))
    cb = callback()
    with pytest.raises(MisconfigurationException, match=f"{type(cb).__name__} cannot be combined with optim='{name}'"):
        lightning_trainer(1, callbacks=[cb]).fit(module, loader())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adamw_torch", "lomo", "apollo_adamw", "apollo_adamw_layerwise"])
def test_stochastic_weight_averaging_anneals_to_swa_lr_and_leaves_the_average(name):
    module = LlamaModule(model=tiny_llama(), **settings(name))
    applied = FirstAppliedLr()
    swa = StochasticWeightAveraging(swa_lrs=1e-3, swa_epoch_start=1, annealing_epochs=1)
    trainer = lightning_trainer(-1, max_epochs=3, callbacks=[applied, swa])
    trainer.fit(module, loader(n=16))
    # SWALR took over the schedule from epoch 1 and annealed to swa_lrs within one epoch (4 steps)
    assert applied.lrs[-4:] == pytest.approx([1e-3] * 4)
    assert all(g["lr"] == pytest.approx(1e-3) for g in trainer.optimizers[0].param_groups)
    averaged = dict(swa._average_model.named_parameters())  # a copy of the LightningModule
    for key, value in module.named_parameters():
        torch.testing.assert_close(value, averaged[key], atol=0, rtol=0)
    assert swa.n_averaged.item() >= 2


@pytest.mark.slow
@needs_weight_averaging
@pytest.mark.parametrize("name", ["adamw_torch", "lomo", "apollo_adamw"])
def test_ema_weight_averaging_leaves_the_average(name):
    module = LlamaModule(model=tiny_llama(), **settings(name))
    ema = EMAWeightAveraging(decay=0.5)
    trainer = lightning_trainer(6, callbacks=[ema])
    trainer.fit(module, loader())
    averaged = dict(ema._average_model.module.named_parameters())
    for key, value in module.named_parameters():
        torch.testing.assert_close(value, averaged[key], atol=0, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adamw_torch", "lomo", "apollo_adamw_layerwise", "schedule_free_adamw"])
def test_learning_rate_monitor_logs_the_applied_lr(tmp_path, name):
    module = LlamaModule(model=tiny_llama(), **settings(name, lr_scheduler_type="linear"))
    applied = FirstAppliedLr()
    trainer = lightning_trainer(
        6,
        logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
        callbacks=[LearningRateMonitor(logging_interval="step"), applied],
    )
    trainer.fit(module, loader())
    import csv

    rows = list(csv.DictReader(open(f"{trainer.logger.log_dir}/metrics.csv")))
    column = next(c for c in rows[0] if c.startswith("lr-"))
    logged = [float(r[column]) for r in rows if r[column]]
    assert logged == pytest.approx(applied.lrs)
    assert logged[0] > logged[-1]  # the linear schedule, as applied


class BatchSizeModule(LlamaModule):
    def __init__(self, **kwargs) -> None:
        super().__init__(model=tiny_llama(), **kwargs)
        self.batch_size = 2

    def train_dataloader(self):
        return torch.utils.data.DataLoader(TokenDataset(32), batch_size=self.batch_size)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(TokenDataset(8), batch_size=4)


@pytest.mark.slow
def test_batch_size_finder_schedule_spans_the_new_step_count(tmp_path):
    module = BatchSizeModule(optim="adamw_torch", learning_rate=1e-2, lr_scheduler_type="linear")
    applied = FirstAppliedLr()
    finder = BatchSizeFinder(mode="power", steps_per_trial=1, max_trials=2)
    trainer = lightning_trainer(-1, max_epochs=1, default_root_dir=tmp_path, callbacks=[finder, applied])
    trainer.fit(module)
    steps = 32 // module.batch_size
    assert module.batch_size > 2 and trainer.global_step == steps  # the finder changed it, and the step count
    # the schedule was built for 16 steps (batch 2); it decays over the steps of the batch size found
    assert applied.lrs == pytest.approx([1e-2 * (steps - s) / steps for s in range(steps)])


# -- clipping and manual optimization --------------------------------------------------------------------------


def test_lomo_gradient_clip_val_refusal_leads_to_a_working_setting():
    module = LlamaModule(model=tiny_llama(), optim="lomo", max_grad_norm=0.0)
    with pytest.raises(MisconfigurationException, match=r"remove gradient_clip_val and set max_grad_norm=0.5") as info:
        lightning_trainer(1, gradient_clip_val=0.5).fit(module, loader())
    assert "set max_grad_norm=0 " not in str(info.value)
    module = LlamaModule(model=tiny_llama(), optim="lomo", max_grad_norm=0.5)  # what it advised
    trainer = lightning_trainer(2)
    trainer.fit(module, loader())
    assert trainer.global_step == 2 and trainer.optimizers[0].clip_grad_norm == 0.5
    module = LlamaModule(model=tiny_llama(), optim="lomo")  # max_grad_norm=1.0 already clips
    with pytest.raises(MisconfigurationException, match=r"remove gradient_clip_val: max_grad_norm=1.0 already clips"):
        lightning_trainer(1, gradient_clip_val=0.5).fit(module, loader())


class ManualModule(LlamaModule):
    def __init__(self, step_scheduler: bool = True, clip: float = 0.0, **kwargs) -> None:
        super().__init__(model=tiny_llama(), **kwargs)
        self.automatic_optimization = False
        self.step_scheduler, self.clip = step_scheduler, clip

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        loss = self.model(**batch).loss
        self.manual_backward(loss)
        if self.clip:
            self.clip_gradients(opt, gradient_clip_val=self.clip, gradient_clip_algorithm="norm")
        opt.step()
        if self.step_scheduler:
            self.lr_schedulers().step()
        return loss


@pytest.mark.parametrize("name", ["adamw_torch", "lomo", "schedule_free_adamw"])
def test_manual_optimization_trains_with_the_schedule(name):
    extra = {} if name == "lomo" else {"max_grad_norm": 0.0}
    module = ManualModule(clip=0.0 if name == "lomo" else 1.0, **settings(name, lr_scheduler_type="linear", **extra))
    applied = FirstAppliedLr()
    trainer = lightning_trainer(4, callbacks=[applied])
    before = module.model.lm_head.weight.detach().clone()
    trainer.fit(module, loader())
    assert trainer.global_step == 4
    assert applied.lrs == pytest.approx([1e-2 * (4 - s) / 4 for s in range(4)])
    assert not torch.equal(before, module.model.lm_head.weight)


def test_manual_optimization_refuses_max_grad_norm_and_a_schedule_never_stepped():
    module = ManualModule(optim="adamw_torch", learning_rate=1e-2)  # max_grad_norm=1.0 by default
    with pytest.raises(
        MisconfigurationException,
        match=r"max_grad_norm=1.0 with manual optimization.*"
        r"self.clip_gradients\(opt, gradient_clip_val=1.0",
    ):
        lightning_trainer(1).fit(module, loader())
    module = ManualModule(step_scheduler=False, optim="adamw_torch", learning_rate=1e-2, max_grad_norm=0.0)
    trainer = lightning_trainer(4)
    with pytest.raises(
        MisconfigurationException,
        match=r"stepped 0 times in 1 optimizer steps.*"
        r"self.lr_schedulers\(\).step\(\)",
    ):
        trainer.fit(module, loader())
    assert trainer.global_step == 1  # refused after the first step, which used the first scheduled lr


# -- hooks overridden without super() ---------------------------------------------------------------------------

from lightning_optims.mixin import MIXIN_HOOKS  # noqa: E402

OVERRIDES = {
    "configure_optimizers": "def configure_optimizers(self):\n    return torch.optim.SGD(self.parameters(), lr=0.1)",
    "configure_gradient_clipping": "def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, "
    "gradient_clip_algorithm=None):\n    pass",
    "backward": "def backward(self, loss, *args, **kwargs):\n    loss.backward()",
}


WITH_SUPER = {
    "configure_optimizers": "def configure_optimizers(self):\n    return super().configure_optimizers()",
    "configure_gradient_clipping": "def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, "
    "gradient_clip_algorithm=None):\n    super().configure_gradient_clipping("
    "optimizer, gradient_clip_val, gradient_clip_algorithm)",
    "backward": "def backward(self, loss, *args, **kwargs):\n    super().backward(loss, *args, **kwargs)",
}


def _subclass(hook: str, with_super: bool) -> type:
    """A user's module overriding ``hook`` (defined in a class body, as a user writes it)."""
    source = (WITH_SUPER if with_super else OVERRIDES)[hook]
    body = "\n".join("    " + line for line in source.splitlines())
    namespace: dict = {}
    exec(f"class Override_{hook}(LlamaModule):\n{body}\n", {"torch": torch, "LlamaModule": LlamaModule}, namespace)
    return namespace[f"Override_{hook}"]


@pytest.mark.parametrize("hook", MIXIN_HOOKS)
def test_a_hook_overridden_without_super_is_refused_when_fit_starts(hook):
    module = _subclass(hook, with_super=False)(model=tiny_llama(), optim="lomo", max_grad_norm=0.0)
    before = module.model.lm_head.weight.detach().clone()
    trainer = lightning_trainer(2)
    with pytest.raises(
        MisconfigurationException,
        match=rf"Override_{hook}\.{hook} overrides a hook that "
        rf"OptimizerMixin implements, without calling super\(\)\.{hook}",
    ):
        trainer.fit(module, loader())
    assert trainer.global_step == 0 and torch.equal(before, module.model.lm_head.weight)


@pytest.mark.parametrize("hook", MIXIN_HOOKS)
def test_a_hook_overridden_with_super_trains(hook):
    module = _subclass(hook, with_super=True)(model=tiny_llama(), optim="lomo", max_grad_norm=0.0)
    before = module.model.lm_head.weight.detach().clone()
    trainer = lightning_trainer(2)
    trainer.fit(module, loader())
    assert trainer.global_step == 2 and not torch.equal(before, module.model.lm_head.weight)


def _fit_is_refused_naming(module: LlamaModule, owner: str, hook: str) -> None:
    before = module.model.lm_head.weight.detach().clone()
    trainer = lightning_trainer(2)
    with pytest.raises(MisconfigurationException, match=rf"{owner}\.{hook} overrides a hook that OptimizerMixin"):
        trainer.fit(module, loader())
    assert trainer.global_step == 0 and torch.equal(before, module.model.lm_head.weight)


@pytest.mark.parametrize("hook", MIXIN_HOOKS)
def test_a_hook_overridden_without_super_in_a_base_class_is_refused(hook):
    """The user's base class overrides the hook; the class fitted adds nothing: still refused, naming the base."""
    base = _subclass(hook, with_super=False)
    user = type("UserModule", (base,), {})
    _fit_is_refused_naming(user(model=tiny_llama(), optim="lomo", max_grad_norm=0.0), base.__name__, hook)


@pytest.mark.parametrize("hook", MIXIN_HOOKS)
def test_a_hook_that_calls_super_for_another_hook_is_refused(hook):
    """``super()`` appears in the override, for another hook: the mixin's ``hook`` is still never called."""
    other = "on_fit_start" if hook != "on_fit_start" else "on_fit_end"
    namespace: dict = {}
    body = f"    def {hook}(self, *args, **kwargs):\n        super().{other}()\n"
    exec(f"class Other_{hook}(LlamaModule):\n{body}", {"LlamaModule": LlamaModule}, namespace)
    module = namespace[f"Other_{hook}"](model=tiny_llama(), optim="lomo", max_grad_norm=0.0)
    _fit_is_refused_naming(module, f"Other_{hook}", hook)


def test_lomo_backward_that_skips_the_fused_backward_at_run_time_is_refused_before_any_update():
    class Conditional(LlamaModule):
        def backward(self, loss, *args, **kwargs):
            if self.global_step > 10:  # never: the static check sees super(), the run-time check catches it
                super().backward(loss, *args, **kwargs)
            loss.backward()

    module = Conditional(model=tiny_llama(), optim="lomo", max_grad_norm=0.0)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"backward ran outside fused_backward.*must call super\(\).backward"):
        lightning_trainer(2).fit(module, loader())
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_settings_properties_do_not_hide_the_learning_rate_from_the_tuner():
    """Lightning's tuner looks for 'lr' then 'learning_rate' on the module or its hparams."""
    from lightning.pytorch.utilities.parsing import lightning_hasattr

    module = LlamaModule(model=tiny_llama(), optim="adamw_torch")
    assert lightning_hasattr(module, "learning_rate") and not lightning_hasattr(module, "lr")
    assert math.isclose(module.learning_rate, 5e-5)
