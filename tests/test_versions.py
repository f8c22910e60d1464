"""What needs more than the floors (``lightning_optims.compat.FEATURES``): each feature's version is the one where the
installed packages really have it, and where they lack it the feature is refused naming the setting, the installed
version and the version it needs. CI runs this file at the newest releases and at the floors (.ci/run), so each
refusal is exercised for real at the floors and each feature works at the newest."""

from __future__ import annotations

import re

import pytest
import torch
from packaging.version import Version
from transformers import Trainer, TrainingArguments

from lightning_optims import OptimizerArguments, OptimizerSettingError, available_optimizers, compat, get_spec
from tests.helpers import tiny_llama

VERSIONS = {name: compat.installed_version(name) for name in ("torch", "lightning", "transformers")}


def test_the_installed_versions_are_within_the_floors():
    """(the floors this file's refusals are checked at: .ci/floors.txt)"""
    floors = {"torch": "2.6", "lightning": "2.5", "transformers": "5.0"}
    for name, floor in floors.items():
        assert VERSIONS[name] is not None and VERSIONS[name] >= Version(floor), (name, VERSIONS[name])


@pytest.mark.parametrize("key", [k for k, f in compat.FEATURES.items() if f.path is not None])
def test_a_features_version_is_where_its_object_appears(key):
    """The version a feature names is right for the installed release: the object is there exactly when it is met."""
    feature = compat.FEATURES[key]
    assert (feature.load() is not None) == (feature.missing() is None), (key, compat.installed_version(feature.package))


def test_fsdp2s_unused_parameters_switch_appears_at_its_version():
    from torch.distributed.fsdp import FSDPModule

    has = hasattr(FSDPModule, "set_reduce_scatter_unused_params")
    assert has == (compat.missing("reduce_scatter_unused_params") is None), VERSIONS["torch"]


def _message(key: str) -> str:
    feature = compat.FEATURES[key]
    return re.escape(
        f"{feature.what} needs {feature.package} >= {feature.version} "
        f"(installed: {feature.package} {compat.installed_version(feature.package)})"
    )


def test_greedy_where_transformers_lacks_it_is_refused_with_both_versions():
    if compat.missing("greedy"):
        with pytest.raises(OptimizerSettingError, match=_message("greedy")):
            OptimizerArguments(lr_scheduler_type="greedy")
    else:
        assert OptimizerArguments(lr_scheduler_type="greedy").lr_scheduler_type == "greedy"


def test_the_refusal_reads_the_installed_version(monkeypatch):
    """Wherever the suite runs: an installed transformers below 5.4 is what refuses greedy (not a missing import)."""
    real = compat.installed_version
    monkeypatch.setattr(
        compat, "installed_version", lambda name: Version("5.0.0") if name == "transformers" else real(name)
    )
    with pytest.raises(
        OptimizerSettingError,
        match=re.escape("lr_scheduler_type='greedy' needs transformers >= 5.4.0 (installed: transformers 5.0.0)"),
    ):
        OptimizerArguments(lr_scheduler_type="greedy")
    with pytest.raises(OptimizerSettingError, match=re.escape("needs transformers >= 5.3.0 (installed: transformers")):
        OptimizerArguments(optim="rmsprop", optim_args="momentum=0.5")
    assert OptimizerArguments(optim="rmsprop").optim == "rmsprop"  # (no optim_args: nothing to refuse)


@pytest.mark.parametrize("name", ["sgd", "adagrad", "rmsprop"])
def test_optim_args_of_torch_optimizers_follow_the_installed_trainer(tmp_path, name):
    """transformers' Trainer reads optim_args for these from 5.3 and ignores them before: where it reads them they
    take effect here too; where it ignores them they are refused (not ignored)."""
    key, value = {"sgd": ("momentum", 0.9), "adagrad": ("lr_decay", 0.01), "rmsprop": ("momentum", 0.5)}[name]
    ta = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, optim=name, optim_args=f"{key}={value}")
    trainer_reads_them = Trainer(model=tiny_llama(), args=ta).create_optimizer().param_groups[0][key] == value
    assert trainer_reads_them == (compat.missing(get_spec(name).optim_args_need or "") is None)
    if trainer_reads_them:
        assert OptimizerArguments(optim=name, optim_args=f"{key}={value}").parsed_optim_args[key] == value
    else:
        with pytest.raises(OptimizerSettingError, match=_message("torch_optim_args")):
            OptimizerArguments(optim=name, optim_args=f"{key}={value}")


def test_weight_averaging_rule_applies_where_lightning_has_it():
    """Below Lightning 2.6 there is no WeightAveraging: the rule refuses StochasticWeightAveraging alone, and the
    package imports (it imported WeightAveraging at module level before)."""
    import lightning.pytorch.callbacks as callbacks

    from lightning_optims import rules

    assert hasattr(callbacks, "WeightAveraging") == (compat.missing("weight_averaging") is None)
    assert rules.weight_averaging_with_train_eval_modes in [r.check for r in rules.RULES]


def test_available_optimizers_say_what_each_name_needs():
    rows = {r.name: r for r in available_optimizers()}
    for name in ("sgd", "adagrad", "rmsprop"):
        assert rows[name].needs == "optim_args: transformers >= 5.3.0", rows[name]
    assert rows["adamw_torch"].needs is None


def test_fused_adamw_default_follows_the_installed_torch():
    """transformers' default optim is adamw_torch_fused from torch 2.8 and adamw_torch before: the mixin's default
    is whatever the installed transformers picks for the installed torch."""
    from lightning_optims import DEFAULT_OPTIM

    expected = "adamw_torch_fused" if Version(torch.__version__.split("+")[0]) >= Version("2.8") else "adamw_torch"
    assert DEFAULT_OPTIM == expected


def test_the_unused_parameter_warning_offers_what_the_installed_torch_has():
    """Before FSDP2's reduce-scatter fails on a parameter another process used: the warning names the switch where
    torch has it (2.13), and what is missing where it does not (the FSDP2 group here is a stand-in: no process
    group is needed to build the message)."""
    from types import SimpleNamespace

    def fsdp_param(name: str, grad: torch.Tensor | None) -> SimpleNamespace:
        param = SimpleNamespace(requires_grad=True, grad=grad, shape=(2,))
        return SimpleNamespace(
            _unsharded_param=param, unsharded_param=param, unsharded_accumulated_grad=None, _param_fqn=name
        )

    group = SimpleNamespace(reduce_grads=True, fsdp_params=[fsdp_param("used", torch.ones(2)), fsdp_param("aux", None)])
    wrapped = compat._post_backward_naming_unused(group, lambda *args: None)
    with pytest.warns(UserWarning, match="FSDP2: parameter aux got no gradient on this process") as caught:
        wrapped()
    message = str(caught[0].message)
    switch = compat.missing("reduce_scatter_unused_params")
    assert (switch or "call self.model.set_reduce_scatter_unused_params(True) in configure_model") in message
