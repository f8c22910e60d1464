"""Parity with transformers' real Trainer: the same optimizer, param groups, hyper-parameters, and training result."""

from __future__ import annotations

import contextlib

import pytest
import torch
from packaging.version import Version
from torch.utils.data import SequentialSampler
from transformers import Trainer, TrainingArguments

from lightning_optims import (
    OptimizerArguments,
    available_optimizers,
    compat,
    create_optimizer,
    create_scheduler,
    get_spec,
)
from lightning_optims.engines.layerwise import LayerwiseOptimizer
from lightning_optims.families import optimi as optimi_family
from tests.helpers import (
    LlamaModule,
    TokenDataset,
    assert_unavailable_for_its_reason,
    lightning_trainer,
    loader,
    tiny_llama,
)

# names of this package alone: transformers' Trainer has no such optim (tests/test_muon.py compares with torch's)
OURS_ONLY = {"muon"}
USABLE = [r.name for r in available_optimizers() if r.usable and r.name not in OURS_ONLY]
MISSING = [r for r in available_optimizers() if not r.usable]

OPTIM_ARGS = {
    "sgd": "momentum=0.9,dampening=0.1,nesterov=false",
    "adagrad": "lr_decay=0.01,eps=1e-9",
    "rmsprop": "momentum=0.5,alpha=0.9,eps=1e-7,centered=true",
    "apollo": "proj=random,rank=1,scale=128.0,scale_type=tensor,update_proj_gap=200",
    "galore": "rank=4,update_proj_gap=50,scale=0.5,proj_type=std",
    "grokadamw": "alpha_init=0.9,lamb=1.5,gamma=0.2,grokking_signal_decay_rate=0.2,gradient_clipping=0.5",
    "schedule_free": "weight_lr_power=1.5,r=0.5",
    "ademamix": "beta3=0.999,alpha=4.0,t_alpha=100",
    "rmsprop_bnb": "alpha=0.9,momentum=0.5",
    "torchao": "block_size=128",
    "stable_adamw": "max_lr=0.01",
}


def settings_for(name: str) -> dict:
    """Non-default values for every setting that reaches this optimizer in transformers."""
    spec = get_spec(name)
    settings: dict = {"learning_rate": 1e-3, "lr_scheduler_type": "linear", "warmup_steps": 2}
    if "weight_decay" in spec.uses:
        settings["weight_decay"] = 0.05
    if "adam_beta1" in spec.uses:
        settings.update(adam_beta1=0.85, adam_beta2=0.95)
    if "adam_epsilon" in spec.uses:
        settings["adam_epsilon"] = 1e-7
    for key in (name, name.split("_")[0], spec.family):
        if key in OPTIM_ARGS and not (spec.optim_args_need and compat.missing(spec.optim_args_need)):
            settings["optim_args"] = OPTIM_ARGS[key]
            break
    if name.startswith("rmsprop_bnb"):
        settings.pop("optim_args", None)  # transformers passes them as strings and crashes: see the test below
    if "ademamix" in name:
        settings["optim_args"] = OPTIM_ARGS["ademamix"]
    if spec.needs_target_modules:
        settings["optim_target_modules"] = [".*.self_attn.*", ".*.mlp.*"]
    if spec.layerwise or spec.family == "lomo":
        # layer-wise: refused otherwise; LOMO: the Trainer's clipping runs after the fused update and never acts
        # (ours would clip: tests/test_lomo.py compares that with lomo_optim's two-pass clipping)
        settings["max_grad_norm"] = 0.0
    return settings


def training_arguments(tmp_path, name: str, **overrides) -> TrainingArguments:
    settings = {**settings_for(name), **overrides}
    return TrainingArguments(output_dir=str(tmp_path), use_cpu=True, optim=name, report_to=[], **settings)


@contextlib.contextmanager
def cuda_calls_neutralised():
    """lomo_optim.AdaLomo calls .cuda() in __init__; on a CPU machine make that a no-op for the reference."""
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda = original  # type: ignore[method-assign]


# the key our groups add (for Lightning's LearningRateMonitor, tests/test_lightning_tools.py); every other is compared
GROUP_NAME = "name"


def options(group: dict) -> dict:
    return {k: v for k, v in group.items() if k not in ("params", GROUP_NAME)}


def named_groups(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> list[tuple[list[str], dict]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [([names[id(p)] for p in g["params"]], options(g)) for g in optimizer.param_groups]


def test_every_transformers_name_is_registered_or_explained():
    from transformers.training_args import OptimizerNames

    # (accelerator packages that do not install here; apex's fused AdamW left transformers' list after 5.0)
    not_here = {"adamw_torch_xla", "adamw_torch_npu_fused", "adamw_anyprecision", "adamw_apex_fused"}
    registered = {r.name for r in available_optimizers()}
    for member in OptimizerNames:
        assert member.value in registered or member.value in not_here, member.value


def test_the_names_of_this_package_alone_are_not_transformers_names():
    """``muon`` is a name of this package: the day transformers' ``OptimizerNames`` has it, this fails, and the
    package follows the Trainer's semantics for it (its parity tests then cover it)."""
    from transformers.training_args import OptimizerNames

    registered = {r.name for r in available_optimizers()}
    assert registered - {member.value for member in OptimizerNames} == OURS_ONLY


def test_missing_packages_are_listed():
    """The names these parity tests cannot check here are listed (in the output) with a reason, and the reason is
    true: the package it names is not importable, or it needs CUDA and there is none; every other name is checked."""
    print("optimizers not usable here:", [(r.name, r.reason) for r in MISSING] or "none")
    for row in MISSING:
        assert_unavailable_for_its_reason(row.name, row.reason)
    assert {r.name for r in available_optimizers()} == set(USABLE) | {r.name for r in MISSING} | OURS_ONLY
    assert not set(USABLE) & {r.name for r in MISSING}


@pytest.mark.parametrize("name", USABLE)
def test_construction_matches_trainer(tmp_path, name):
    ta = training_arguments(tmp_path, name)
    spec = get_spec(name)
    hf_model = tiny_llama()
    if name == "galore_adafactor_layerwise":
        # transformers omits relative_step=False here, and GaLore's Adafactor refuses the lr it is given
        with pytest.raises(ValueError, match="relative_step"):
            Trainer(model=hf_model, args=ta).create_optimizer()
        ours = create_optimizer(tiny_llama(), OptimizerArguments.from_training_arguments(ta))
        inner = next(iter(ours.optimizer_dict.values()))
        assert inner.defaults["relative_step"] is False and inner.defaults["scale_parameter"] is False
        ours.remove_hooks()
        return
    with cuda_calls_neutralised() if name == "adalomo" else contextlib.nullcontext():
        hf_opt = Trainer(model=hf_model, args=ta).create_optimizer()
        our_model = tiny_llama()
        ours = create_optimizer(our_model, OptimizerArguments.from_training_arguments(ta), num_training_steps=10)

    if spec.layerwise:
        assert isinstance(ours, LayerwiseOptimizer) and type(hf_opt).__name__ == "LayerWiseDummyOptimizer"
        assert ours.param_groups[0]["lr"] == hf_opt.defaults["lr"]
        hf_inner = {n: hf_opt.optimizer_dict[p] for n, p in hf_model.named_parameters()}
        our_inner = {n: ours.optimizer_dict[p] for n, p in our_model.named_parameters()}
        assert hf_inner.keys() == our_inner.keys()
        for n in hf_inner:
            assert isinstance(our_inner[n], type(hf_inner[n]))
            hf_groups = [options(g) for g in hf_inner[n].param_groups]
            our_groups = [options(g) for g in our_inner[n].param_groups]
            assert hf_groups == our_groups, n
        ours.remove_hooks()
        return

    if spec.family == "lomo":
        # our engine (same update rule as lomo_optim: tests/test_lomo.py compares the weights step by step);
        # transformers builds lomo_optim's class from the model and the lr alone
        assert type(ours).__name__ == type(hf_opt).__name__
        assert [n for g in named_groups(ours, our_model) for n in g[0]] == [n for n, _ in hf_model.named_parameters()]
        assert ours.param_groups[0]["lr"] == hf_opt.defaults["lr"] == ta.learning_rate
        assert ours.clip_grad_norm == (ta.max_grad_norm or None) and hf_opt.clip_grad_norm is None
        ours.remove_hooks()
        return
    # the same class, or (GrokAdamW, APOLLO, GaLore) a subclass with the same update whose state survives checkpoints
    assert isinstance(ours, type(hf_opt))
    assert named_groups(ours, our_model) == named_groups(hf_opt, hf_model)
    assert {k: v for k, v in ours.defaults.items()} == {k: v for k, v in hf_opt.defaults.items()}
    # each group is named after what sets it apart (LearningRateMonitor logs lr-<class>/<name>)
    expected = {"decay_groups": ["decay", "no_decay"], "low_rank": ["full_rank", "low_rank"], "model": ["all"]}[
        spec.params
    ]
    assert [g.get(GROUP_NAME) for g in ours.param_groups] == expected
    # low-rank: the target group holds exactly the projected linear weights
    if spec.needs_target_modules:
        target_names = named_groups(ours, our_model)[1][0]
        assert target_names and all(n.endswith("_proj.weight") for n in target_names)


@pytest.mark.skipif("rmsprop_bnb" not in USABLE, reason="bitsandbytes not installed")
def test_rmsprop_bnb_optim_args_are_typed(tmp_path):
    ta = training_arguments(tmp_path, "rmsprop_bnb", optim_args=OPTIM_ARGS["rmsprop_bnb"])
    with pytest.raises(TypeError):  # transformers hands "0.9" (a str) to bitsandbytes
        Trainer(model=tiny_llama(), args=ta).create_optimizer()
    ours = create_optimizer(tiny_llama(), OptimizerArguments.from_training_arguments(ta))
    assert ours.defaults["betas"] == (0.9, 0.5)  # bitsandbytes keeps (alpha, momentum) as betas


def _decay_groups_match_on_a_model_with_biases(tmp_path, name):
    ta = training_arguments(tmp_path, name, weight_decay=0.1)
    hf_model, our_model = tiny_llama(bias=True), tiny_llama(bias=True)
    hf_opt = Trainer(model=hf_model, args=ta).create_optimizer()
    ours = create_optimizer(our_model, OptimizerArguments.from_training_arguments(ta))
    assert named_groups(ours, our_model) == named_groups(hf_opt, hf_model)
    return named_groups(ours, our_model)


@pytest.mark.parametrize("name", ["adamw_torch", "adafactor", "grokadamw", "schedule_free_adamw", "sgd"])
def test_decay_groups_match_trainer_on_a_model_with_biases(tmp_path, name):
    """Llama has no biases: with them, the no-decay rules (bias, norms) are compared with the Trainer's too."""
    (decay, decay_options), (no_decay, no_decay_options) = _decay_groups_match_on_a_model_with_biases(tmp_path, name)
    biases = [n for n in no_decay if n.endswith(".bias")]
    assert len(biases) == 2 * 7 and not any(n.endswith(".bias") for n in decay)  # q/k/v/o, gate/up/down per layer
    assert decay_options["weight_decay"] == 0.1 and no_decay_options["weight_decay"] == 0.0


@pytest.mark.parametrize(
    "target_modules",
    [
        "all-linear",
        "all_linear",
        r".*\.mlp\..*",
        ["q_proj", "down_proj"],
        ["model.layers.0.self_attn.v_proj"],
        [r"model\.layers\.1\..*"],
    ],
)
def test_target_module_matching_matches_trainer(tmp_path, target_modules):
    ta = training_arguments(tmp_path, "apollo_adamw", optim_target_modules=target_modules)
    hf_model, our_model = tiny_llama(), tiny_llama()
    hf_opt = Trainer(model=hf_model, args=ta).create_optimizer()
    ours = create_optimizer(our_model, OptimizerArguments.from_training_arguments(ta))
    assert named_groups(ours, our_model) == named_groups(hf_opt, hf_model)


@pytest.mark.parametrize(
    "scheduler, kwargs, warmup",
    [
        ("linear", None, 3),
        ("cosine", {"num_cycles": 0.25}, 0.2),
        ("constant", None, 0),
        ("constant_with_warmup", None, 0.3),
        ("polynomial", {"power": 2.0, "lr_end": 1e-5}, 2),
        ("cosine_with_min_lr", {"min_lr_rate": 0.1}, 0.1),
        ("inverse_sqrt", None, 2),
    ],
)
def test_scheduler_matches_trainer(tmp_path, scheduler, kwargs, warmup):
    ta = TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        optim="adamw_torch",
        report_to=[],
        learning_rate=1e-2,
        lr_scheduler_type=scheduler,
        lr_scheduler_kwargs=kwargs,
        warmup_steps=warmup,
    )
    steps = 20
    hf = Trainer(model=tiny_llama(), args=ta)
    hf.create_optimizer_and_scheduler(num_training_steps=steps)
    args = OptimizerArguments.from_training_arguments(ta)
    our_sched = create_scheduler(create_optimizer(tiny_llama(), args), args, steps)
    hf_lrs, our_lrs = [], []
    for _ in range(steps):
        hf_lrs.append(hf.optimizer.param_groups[0]["lr"])
        our_lrs.append(our_sched.optimizer.param_groups[0]["lr"])
        hf.lr_scheduler.step()
        our_sched.step()
    assert our_lrs == hf_lrs


class _SequentialTrainer(Trainer):
    """The Trainer in batch order, as the Lightning DataLoader below (shuffle=False), minimizing the model's own mean
    loss, as the Lightning module does. (The loss is the user's, not the optimizer's: transformers 5.0's Trainer
    divides the summed token losses by the count of all labels, unshifted, 8/7 of the model's mean on these 8-token
    rows, where later releases count the shifted labels and so equal the model's mean.)"""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # (no num_items_in_batch: the model averages its own loss)

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


TRAINING_PARITY = [
    "adamw_torch",
    "adamw_torch_fused",
    "adafactor",
    "sgd",
    "rmsprop",
    "apollo_adamw",
    "grokadamw",
    "apollo_adamw_layerwise",
    "galore_adamw_layerwise",
    "galore_adamw",
    "stable_adamw",
    "lion_32bit",
    "lomo",
    "schedule_free_adamw",
    "schedule_free_sgd",
]


@pytest.mark.slow
def test_trainer_layerwise_ignores_the_schedule(tmp_path):
    """The fault documented above: after Trainer.train() the inner optimizers still have the initial lr, and no
    scheduler hook was registered (ours follow the schedule:
    tests/test_grokadamw_apollo.py::test_layerwise_inner_optimizers_apply_the_scheduled_lr)."""
    ta = training_arguments(
        tmp_path,
        "apollo_adamw_layerwise",
        max_steps=3,
        per_device_train_batch_size=4,
        save_strategy="no",
        lr_scheduler_type="linear",
        warmup_steps=2,
    )
    model = tiny_llama()
    trainer = _SequentialTrainer(model=model, args=ta, train_dataset=TokenDataset())
    trainer.train()
    inner = trainer.optimizer.optimizer.optimizer_dict
    # (from transformers 5.1; 5.0's Trainer stepped the inner optimizers' schedule: linear to 0 after 3 steps)
    ignores = compat.installed_version("transformers") >= Version("5.1")
    assert {o.param_groups[0]["lr"] for o in inner.values()} == ({ta.learning_rate} if ignores else {0.0})
    if ignores:  # (one hook per parameter: the step's, and no scheduler's)
        assert all(len(p._post_accumulate_grad_hooks) == 1 for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in TRAINING_PARITY if n in USABLE])
def test_training_matches_trainer(tmp_path, name):
    """A few steps of a tiny Llama: transformers' Trainer and a Lightning module with the mixin end equal."""
    steps, batch = 6, 4
    # transformers' layer-wise optimizers ignore the schedule (the Trainer builds it on accelerate's wrapper, which
    # hides the LayerWiseDummyOptimizer from get_scheduler): compare them where that makes no difference
    schedule = dict(lr_scheduler_type="constant", warmup_steps=0) if get_spec(name).layerwise else {}
    ta = training_arguments(
        tmp_path,
        name,
        max_steps=steps,
        per_device_train_batch_size=batch,
        logging_steps=100,
        save_strategy="no",
        seed=0,
        dataloader_drop_last=False,
        **schedule,
    )
    hf_model = tiny_llama()
    hf_trainer = _SequentialTrainer(model=hf_model, args=ta, train_dataset=TokenDataset())
    if name == "stable_adamw":
        # optimi picks Triton for CPU tensors where triton is installed without a GPU (a CUDA build of torch) and
        # fails: the reference gets the package's fix too (optimi's own non-Triton path, the same numbers)
        optimi_family._no_triton_off_the_gpu(hf_trainer.create_optimizer(), None)
    hf_trainer.train()
    if get_spec(name).has_train_eval_modes:
        # the Trainer leaves the training point in the model; ours ends at the averaged point: compare that one
        hf_trainer.optimizer.optimizer.eval()

    module = LlamaModule(model=tiny_llama(), **OptimizerArguments.from_training_arguments(ta).as_kwargs())
    lightning_trainer(steps).fit(module, loader(batch))

    ours = module.model.state_dict()
    for key, value in hf_model.state_dict().items():
        torch.testing.assert_close(ours[key], value, atol=1e-5, rtol=0, msg=lambda m, key=key: f"{name} {key}: {m}")
    # the run moved the weights: equal weights are not just the initial ones
    assert not torch.allclose(
        tiny_llama().state_dict()["model.layers.0.mlp.up_proj.weight"], ours["model.layers.0.mlp.up_proj.weight"]
    )


def test_lomo_max_grad_norm_takes_effect_here_not_in_the_trainer(tmp_path):
    ta = training_arguments(tmp_path, "lomo", max_grad_norm=0.5)
    hf_opt = Trainer(model=tiny_llama(), args=ta).create_optimizer()
    ours = create_optimizer(tiny_llama(), OptimizerArguments.from_training_arguments(ta))
    assert hf_opt.clip_grad_norm is None and ours.clip_grad_norm == 0.5
    ours.remove_hooks()
