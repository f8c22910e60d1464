"""Settings validation: every bad setting is refused when the arguments are built, naming the fault."""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from transformers import TrainingArguments

from lightning_optims import (
    DEFAULT_OPTIM,
    OptimizerArguments,
    OptimizerSettingError,
    available_optimizers,
    create_optimizer,
    get_spec,
)
from lightning_optims.spec import OptimizerSpec
from tests.helpers import LlamaModule, lightning_trainer, loader, tiny_llama

BAD_SETTINGS = [
    # (settings, substrings the message must contain)
    (dict(optim="adamw_trch"), ["optim='adamw_trch'", "did you mean 'adamw_torch'"]),
    (dict(optim="apolo_adamw"), ["did you mean 'apollo_adamw'"]),
    (dict(optim=3), ["optim=3", "expected an optimizer name"]),
    (dict(learning_rate=-1.0), ["learning_rate=-1.0", ">= 0"]),
    (dict(learning_rate="1e-3"), ["learning_rate='1e-3'", "expected a number"]),
    (dict(learning_rate=float("nan")), ["learning_rate=nan", "finite"]),
    (dict(weight_decay=-0.1), ["weight_decay=-0.1"]),
    (dict(adam_beta1=1.0), ["adam_beta1=1.0", "[0, 1)"]),
    (dict(adam_beta2=-0.5), ["adam_beta2=-0.5", "[0, 1)"]),
    (dict(adam_epsilon=-1e-8), ["adam_epsilon=-1e-08"]),
    (dict(max_grad_norm=-1), ["max_grad_norm=-1"]),
    (dict(warmup_steps=-3), ["warmup_steps=-3"]),
    (dict(warmup_steps=1.5), ["warmup_steps=1.5", "ratio in [0, 1)"]),
    (dict(warmup_steps=True), ["warmup_steps=True"]),
    (dict(lr_scheduler_type="cosin"), ["lr_scheduler_type='cosin'", "did you mean 'cosine'"]),
    (
        dict(lr_scheduler_type="cosine", lr_scheduler_kwargs={"num_cycle": 2}),
        ["lr_scheduler_kwargs", "'num_cycle'", "num_cycles"],
    ),
    (dict(lr_scheduler_type="constant", lr_scheduler_kwargs={"x": 1}), ["lr_scheduler_kwargs", "no effect"]),
    (dict(lr_scheduler_kwargs="{not json"), ["lr_scheduler_kwargs", "JSON"]),
    (dict(lr_scheduler_kwargs=[1, 2]), ["lr_scheduler_kwargs=[1, 2]", "mapping"]),
    (dict(lr_scheduler_type="constant", warmup_steps=10), ["warmup_steps=10", "constant_with_warmup"]),
    (dict(optim="apollo_adamw"), ["optim_target_modules is required", "apollo_adamw"]),
    (dict(optim="apollo_adamw", optim_target_modules=[]), ["optim_target_modules=[]"]),
    (dict(optim="apollo_adamw", optim_target_modules=["attn", 3]), ["optim_target_modules=['attn', 3]"]),
    (dict(optim="apollo_adamw", optim_target_modules="(attn"), ["'(attn'", "not a valid regular expression"]),
    (dict(optim="adamw_torch", optim_target_modules="all-linear"), ["optim_target_modules='all-linear'", "no effect"]),
    (
        dict(optim="apollo_adamw", optim_target_modules="all-linear", optim_args="rnak=4"),
        ["unknown key 'rnak' for apollo_adamw", "accepted: rank, proj", "did you mean 'rank'"],
    ),
    (
        dict(optim="apollo_adamw", optim_target_modules="all-linear", optim_args="proj=random,rank=1,scaletype=tensor"),
        ["unknown key 'scaletype'", "did you mean 'scale_type'"],
    ),
    (
        dict(optim="apollo_adamw", optim_target_modules="all-linear", optim_args="scale_type=row"),
        ["scale_type='row'", "'channel', 'tensor'"],
    ),
    (
        dict(optim="apollo_adamw", optim_target_modules="all-linear", optim_args="rank=1.5"),
        ["rank='1.5'", "expected an integer"],
    ),
    (
        dict(optim="apollo_adamw", optim_target_modules="all-linear", optim_args="rank"),
        ["fragment 'rank'", "key=value"],
    ),
    (
        dict(optim="apollo_adamw", optim_target_modules="all-linear", optim_args={"scale": "big"}),
        ["scale='big'", "expected a number"],
    ),
    (
        dict(optim="apollo_adamw", optim_target_modules="all-linear", optim_args="rank=2,rank=3"),
        ["'rank' is given twice"],
    ),
    (dict(optim="sgd", optim_args="nesterov=maybe"), ["nesterov='maybe'", "boolean"]),
    (dict(optim="sgd", optim_args="weight_decay=0.1"), ["unknown key 'weight_decay' for sgd"]),
    (dict(optim="adamw_torch", optim_args="foo=1"), ["unknown key 'foo' for adamw_torch", "takes no optim_args"]),
    (dict(optim_args=42), ["optim_args", "string or a mapping"]),
    (dict(optim="grokadamw", adam_beta1=0.8), ["adam_beta1=0.8 has no effect with optim='grokadamw'"]),
    (
        dict(optim="apollo_adamw", optim_target_modules="all-linear", weight_decay=0.1),
        ["weight_decay=0.1 has no effect with optim='apollo_adamw'"],
    ),
    (dict(optim="lomo", adam_epsilon=1e-6), ["adam_epsilon=1e-06 has no effect with optim='lomo'"]),
    (dict(optim="apollo_adamw_layerwise", optim_target_modules="all-linear"), ["max_grad_norm=1.0 has no effect"]),
]


@pytest.mark.parametrize("settings, expected", BAD_SETTINGS, ids=[str(s) for s, _ in BAD_SETTINGS])
def test_bad_setting_is_refused_with_its_name(settings, expected):
    with pytest.raises(OptimizerSettingError) as info:
        OptimizerArguments(**settings)
    for text in expected:
        assert text in str(info.value), (text, str(info.value))


@pytest.mark.parametrize("settings, expected", BAD_SETTINGS[:8], ids=[str(s) for s, _ in BAD_SETTINGS[:8]])
def test_bad_setting_is_refused_by_the_mixin_before_training(settings, expected):
    with pytest.raises(OptimizerSettingError):
        LlamaModule(**settings)


def test_defaults_are_transformers_defaults():
    ta = TrainingArguments(output_dir="unused", report_to=[])
    ours = OptimizerArguments()
    assert OptimizerArguments.from_training_arguments(ta) == ours
    assert ours.optim == DEFAULT_OPTIM == ta.optim.value
    for name, value in ours.as_kwargs().items():
        theirs = getattr(ta, name)
        assert getattr(theirs, "value", theirs) == value, name


def test_from_training_arguments_copies_every_field():
    ta = TrainingArguments(
        output_dir="unused",
        report_to=[],
        optim="apollo_adamw",
        optim_target_modules=["attn", "mlp"],
        optim_args="proj=random,rank=1,scale=128.0,scale_type=tensor,update_proj_gap=200",
        learning_rate=1e-3,
        adam_beta1=0.8,
        adam_beta2=0.95,
        adam_epsilon=1e-6,
        lr_scheduler_type="cosine",
        lr_scheduler_kwargs='{"num_cycles": 0.4}',
        warmup_steps=0.1,
        max_grad_norm=0.5,
    )
    args = OptimizerArguments.from_training_arguments(ta)
    assert args.optim == "apollo_adamw" and args.lr_scheduler_type == "cosine"
    assert args.optim_target_modules == ["attn", "mlp"]
    assert args.lr_scheduler_kwargs == {"num_cycles": 0.4}
    assert args.parsed_optim_args == {
        "proj": "random",
        "rank": 1,
        "scale": 128.0,
        "scale_type": "tensor",
        "update_proj_gap": 200,
        "proj_type": "std",
    }
    assert (args.learning_rate, args.adam_beta1, args.adam_beta2, args.adam_epsilon) == (1e-3, 0.8, 0.95, 1e-6)
    assert (args.warmup_steps, args.max_grad_norm) == (0.1, 0.5)


def test_integer_valued_float_warmup_is_steps():
    assert OptimizerArguments(warmup_steps=5.0).warmup_steps == 5


def test_optim_args_as_mapping_equals_string():
    s = OptimizerArguments(optim="stable_adamw", optim_args="max_lr=0.01,kahan_sum=True")
    m = OptimizerArguments(optim="stable_adamw", optim_args={"max_lr": 0.01, "kahan_sum": True})
    assert s.parsed_optim_args == m.parsed_optim_args
    assert s.parsed_optim_args["max_lr"] == 0.01 and s.parsed_optim_args["kahan_sum"] is True


def test_false_string_is_false():
    # transformers casts with bool() in places: bool("False") is True
    args = OptimizerArguments(optim="stable_adamw", optim_args="kahan_sum=False,decouple_lr=false")
    assert args.parsed_optim_args["kahan_sum"] is False and args.parsed_optim_args["decouple_lr"] is False


def test_every_registered_name_validates_with_defaults():
    """No optim_args: every declared key takes its documented default (transformers'), and nothing else is set."""
    for row in available_optimizers():
        spec = get_spec(row.name)
        extra = {"optim_target_modules": "all-linear"} if spec.needs_target_modules else {}
        if spec.layerwise:
            extra["max_grad_norm"] = 0.0
        args = OptimizerArguments(optim=row.name, **extra)
        assert args.optim == row.name and args.optim_args is None
        assert args.parsed_optim_args == {a.name: a.default for a in spec.arguments}, row.name


def test_missing_package_names_the_extra(monkeypatch):
    spec = get_spec("galore_adamw")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "galore_torch" else real_find_spec(n, *a)
    )
    assert not {r.name: r for r in available_optimizers()}["galore_adamw"].usable
    with pytest.raises(ImportError, match=r"galore_adamw.*galore_torch.*lightning_optims\[galore\]"):
        spec.load_class()


def test_cuda_only_optimizer_names_the_device(monkeypatch):
    import dataclasses

    spec = dataclasses.replace(get_spec("adamw_torch"), device="cuda")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert isinstance(spec, OptimizerSpec)
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        spec.load_class()


def test_no_matching_target_module_names_examples():
    args = OptimizerArguments(optim="apollo_adamw", optim_target_modules=["nothing_here"])
    with pytest.raises(OptimizerSettingError, match=r"selects no nn.Linear.*'model.layers.0.self_attn.q_proj'"):
        create_optimizer(tiny_llama(), args)


def test_warmup_ratio_for_schedule_free_needs_the_step_count():
    args = OptimizerArguments(optim="schedule_free_adamw", warmup_steps=0.1, lr_scheduler_type="constant")
    with pytest.raises(OptimizerSettingError, match=r"warmup_steps=0\.1 is a ratio"):
        create_optimizer(tiny_llama(), args)
    # transformers passes 0.1 itself (a 10x lr on step 1); here it becomes ceil(0.1 * 50) = 5 steps
    assert create_optimizer(tiny_llama(), args, num_training_steps=50).defaults["warmup_steps"] == 5


def test_trainer_gradient_clip_val_with_max_grad_norm_is_refused():
    module = LlamaModule(optim="adamw_torch")
    with pytest.raises(MisconfigurationException, match=r"gradient_clip_val=0.5.*max_grad_norm=1.0"):
        lightning_trainer(1, gradient_clip_val=0.5).fit(module, loader())


def test_trainer_gradient_clip_val_alone_clips(monkeypatch):
    """With max_grad_norm=0 the Trainer's clipping applies (once, with the Trainer's value)."""
    import torch

    calls = []
    # Lightning clips with clip_grad_norm_; the mixin computes the norm once (it logs it) and clips with it
    for name in ("clip_grad_norm_", "clip_grads_with_norm_"):
        real = getattr(torch.nn.utils, name)
        monkeypatch.setattr(
            torch.nn.utils,
            name,
            lambda p, max_norm, *a, _real=real, **k: calls.append(max_norm) or _real(p, max_norm, *a, **k),
        )
    lightning_trainer(2, gradient_clip_val=0.25).fit(LlamaModule(optim="adamw_torch", max_grad_norm=0.0), loader())
    assert calls == [0.25, 0.25]
    calls.clear()
    lightning_trainer(2).fit(LlamaModule(optim="adamw_torch", max_grad_norm=0.5), loader())
    assert calls == [0.5, 0.5]
    calls.clear()
    lightning_trainer(2).fit(LlamaModule(optim="adamw_torch", max_grad_norm=0.0), loader())
    assert calls == []


def test_rank_not_below_the_matrix_size_warns():
    args = OptimizerArguments(optim="apollo_adamw", optim_target_modules="all-linear", optim_args="rank=64")
    with pytest.warns(UserWarning, match=r"rank=64 for apollo_adamw is not below the smaller dimension"):
        create_optimizer(tiny_llama(), args)  # hidden size 16: rank 64 is larger than every target matrix


class OneMatrix(torch.nn.Module):
    def __init__(self, m: int, n: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(n, m, bias=False)  # (weight [m, n])


def _upstream_steps(optim: str, shape: tuple[int, int], options: dict) -> bool:
    """Whether the upstream optimizer (apollo_torch's, galore_torch's) takes two steps of this matrix."""
    import apollo_torch
    import galore_torch

    p = torch.nn.Parameter(torch.randn(*shape))
    group = {"params": [p], "update_proj_gap": 1, "scale": 1.0, **options}
    if optim == "apollo_adamw":
        upstream = apollo_torch.APOLLOAdamW([group], lr=1e-3)
    else:
        upstream = galore_torch.GaLoreAdamW([group], lr=1e-3, no_deprecation_warning=True)
    try:
        for _ in range(2):
            p.grad = torch.randn(*shape)
            upstream.step()
    except RuntimeError:
        return False
    return True


def test_a_projection_upstream_cannot_step_is_refused_when_the_optimizer_is_built():
    """APOLLO's channel-wise ratio where the projection is on the other side than ``std``'s, and GaLore's
    ``reverse_std`` at a rank that fills a wide matrix, fail in the upstream step with a shape error: refused when the
    optimizer is built (when ``fit`` starts), and only those (every combination run upstream beside ours)."""
    pytest.importorskip("galore_torch")
    grid = [
        ("apollo_adamw", {"proj": proj, "scale_type": scale, "proj_type": side, "rank": rank})
        for proj in ("random", "svd")
        for scale in ("channel", "tensor")
        for side in ("std", "reverse_std", "right", "left")
        for rank in (1, 2, 8, 16)
    ] + [
        ("galore_adamw", {"proj_type": side, "rank": rank})
        for side in ("std", "reverse_std", "right", "left", "full")
        for rank in (1, 2, 8, 16)
    ]
    mismatches, refused = [], 0
    for optim, options in grid:
        for shape in ((8, 16), (16, 8), (8, 8)):
            args = OptimizerArguments(
                optim=optim,
                optim_target_modules="all-linear",
                optim_args=",".join(f"{k}={v}" for k, v in options.items()),
            )
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # (the rank-not-below-the-matrix warning)
                    create_optimizer(OneMatrix(*shape), args)
                ours = True
            except OptimizerSettingError:
                ours, refused = False, refused + 1
            torch.manual_seed(0)
            if ours != _upstream_steps(optim, shape, options):
                mismatches.append((optim, options, shape, "refused" if not ours else "accepted"))
    assert mismatches == [], "\n".join(map(str, mismatches))
    assert refused == 28  # (of 312: APOLLO random 12, APOLLO proj=svd 14, GaLore reverse_std on [8, 16] 2)


def test_a_projection_upstream_cannot_step_stops_fit_before_a_step(tmp_path):
    module = LlamaModule(
        optim="apollo_adamw", optim_target_modules="all-linear", optim_args="rank=2,proj_type=reverse_std"
    )
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = lightning_trainer(2, default_root_dir=tmp_path)
    with pytest.raises(OptimizerSettingError, match=r"optim_args scale_type='channel' with proj_type='reverse_std'"):
        trainer.fit(module, loader())
    assert trainer.global_step == 0
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
