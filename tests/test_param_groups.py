"""The param-group rules in isolation: decay exclusion, target matching, groups added during training (split into
projected and not, the unprojected part following its leader's lr), and the schedule over added groups."""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch
from torch import nn

from lightning_optims import OptimizerArguments, create_optimizer, create_scheduler
from lightning_optims.build import GreedyLRScheduler, ScheduledGroupsLambdaLR, num_warmup_steps
from lightning_optims.param_groups import (
    decay_param_groups,
    follow_leader_lrs,
    is_all_linear,
    split_added_group,
    target_parameter_names,
)
from tests.helpers import needs, tiny_llama

TARGETED = dict(optim="apollo_adamw", optim_target_modules=[r".*\.mlp\..*"], optim_args="rank=2")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.ln = nn.LayerNorm(4)  # no decay by its type, whatever its name
        self.head = nn.Linear(4, 2, bias=False)


def test_decay_groups_exclude_biases_norms_and_frozen_parameters():
    net = Net()
    net.head.weight.requires_grad_(False)
    (decay, no_decay) = decay_param_groups(net, 0.1)
    names = {id(p): n for n, p in net.named_parameters()}
    assert [names[id(p)] for p in decay["params"]] == ["body.weight"]
    assert [names[id(p)] for p in no_decay["params"]] == ["body.bias", "ln.weight", "ln.bias"]
    assert (decay["weight_decay"], no_decay["weight_decay"], decay["name"], no_decay["name"]) == (
        0.1,
        0.0,
        "decay",
        "no_decay",
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [("all-linear", True), ("all_linear", True), (["all-linear"], False), ("all-linears", False), (None, False)],
)
def test_all_linear_only_as_a_bare_string(value, expected):
    assert is_all_linear(value) is expected


def test_an_exact_name_of_a_non_linear_module_is_named_in_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="lightning_optims.param_groups"):
        names = target_parameter_names(tiny_llama(), ["model.layers.0.self_attn", "q_proj"], "apollo_adamw")
    # (a list item matches a module by exact name, then as a substring: the attention's linear layers match too)
    assert names == [f"model.layers.0.self_attn.{m}_proj.weight" for m in "qkvo"] + [
        "model.layers.1.self_attn.q_proj.weight"
    ]
    assert caplog.messages == [
        "model.layers.0.self_attn matched but ignored: apollo_adamw only projects nn.Linear layers."
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lightning_optims.param_groups"):
        target_parameter_names(tiny_llama(), r".*self_attn.*", "apollo_adamw")  # a regex over modules: no warning
    assert caplog.messages == []


def test_the_built_optimizer_knows_its_targets_for_groups_added_later():
    model = tiny_llama()
    optimizer = create_optimizer(model, OptimizerArguments(**TARGETED))
    targets, options = optimizer.low_rank_targets
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in targets) == sorted(
        f"model.layers.{i}.mlp.{m}.weight" for i in range(2) for m in ("gate_proj", "up_proj", "down_proj")
    )
    assert options["rank"] == 2 and options["proj"] == "random"
    assert [g["name"] for g in optimizer.param_groups] == ["full_rank", "low_rank"]
    assert {id(p) for p in optimizer.param_groups[1]["params"]} == {id(p) for p in targets}


def _added(params, **extra):
    return {"params": params, "lr": 0.5, **extra}


def test_an_added_group_is_split_into_its_targets_and_the_rest():
    a, b, c = (torch.nn.Parameter(torch.zeros(2, 2)) for _ in range(3))
    options = {"rank": 1, "proj": "random"}
    # without low-rank targets, or a group that already says how to project: as it is (a tensor becomes a list)
    assert split_added_group(_added(a), None) == [_added([a])]
    assert split_added_group(_added([a, b], rank=3), ([a], options)) == [_added([a, b], rank=3)]
    # no target among them: as it is; all targets: one projected group
    assert split_added_group(_added([b]), ([a], options)) == [_added([b])]
    assert split_added_group(_added([a]), ([a], options)) == [_added([a], **options)]
    # both: [the rest, following the projected part's lr, then the targets], names kept apart
    rest, projected = split_added_group(_added([a, b, c], name="backbone"), ([a, c], options))
    assert rest == _added([b], name="backbone", follows_group=None)
    assert projected == _added([a, c], name="backbone_low_rank", **options)
    rest, projected = split_added_group(_added([a, b]), ([a], options))
    assert "name" not in rest and "name" not in projected


def test_a_split_off_group_follows_its_leaders_lr():
    groups = [{"lr": 1.0}, {"lr": 0.1, "follows_group": 2}, {"lr": 0.3}, {"lr": 0.2, "follows_group": None}]
    follow_leader_lrs(groups)
    assert [g["lr"] for g in groups] == [1.0, 0.3, 0.3, 0.2]


def test_the_schedule_leaves_an_added_group_its_own_lr():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = create_scheduler(optimizer, OptimizerArguments(lr_scheduler_type="linear", warmup_steps=2), 10)
    assert isinstance(scheduler, ScheduledGroupsLambdaLR)
    optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.25})
    optimizer.step()
    scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == [0.5, 0.25]
    assert scheduler.get_lr() == [0.5, 0.25] and scheduler.scheduled_lrs() == [0.5]


def test_schedules_that_are_not_lambdas_keep_their_class():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = create_scheduler(optimizer, OptimizerArguments(lr_scheduler_type="reduce_lr_on_plateau"), 10)
    assert type(scheduler) is torch.optim.lr_scheduler.ReduceLROnPlateau


@needs("greedy")
def test_greedy_is_transformers_greedy_lr_for_lightning():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    greedy = create_scheduler(
        optimizer, OptimizerArguments(lr_scheduler_type="greedy", lr_scheduler_kwargs={"patience": 3}), 10
    )
    assert isinstance(greedy, GreedyLRScheduler) and greedy.optimizer is optimizer and greedy.patience == 3


@pytest.mark.parametrize(("warmup", "expected"), [(0, 0), (1, 1), (3, 3), (0.25, 3), (0.5, 5), (0.01, 1)])
def test_warmup_steps_and_ratios(warmup, expected):
    assert num_warmup_steps(OptimizerArguments(warmup_steps=warmup), 10) == expected


@pytest.mark.skipif(not importlib.util.find_spec("bitsandbytes"), reason="bitsandbytes is not installed")
def test_an_8bit_optimizer_keeps_the_embeddings_in_32bit_state():
    """transformers registers this override after building an 8-bit bitsandbytes optimizer; so does the build."""
    import bitsandbytes

    model = tiny_llama()
    create_optimizer(model, OptimizerArguments(optim="adamw_8bit"))
    overrides = bitsandbytes.optim.GlobalOptimManager.get_instance().module_weight_config_triple
    assert any(
        m is model.model.embed_tokens and name == "weight" and cfg == {"optim_bits": 32} for m, name, cfg in overrides
    )
    assert not any(m is model.lm_head for m, _, _ in overrides)
