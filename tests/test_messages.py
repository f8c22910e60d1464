"""Every refusal and warning of the settings layer, word for word: what a user reads when a setting is wrong. Each
names the setting as it was written and what is accepted; a change of wording is a change of this table."""

from __future__ import annotations

import re
import warnings

import pytest
from torch import nn
from transformers import TrainingArguments

from lightning_optims import OptimizerArguments, OptimizerSettingError, create_optimizer, get_spec
from lightning_optims.arguments import SCHEDULER_NAMES
from lightning_optims.optim_args import parse_optim_args
from lightning_optims.registry import registered_names
from tests.helpers import LlamaModule, tiny_llama

A = OptimizerArguments
APOLLO = get_spec("apollo_adamw").arguments
SGD = get_spec("sgd").arguments
TARGETED = dict(optim="apollo_adamw", optim_target_modules="all-linear")

REFUSALS = [
    (lambda: A(learning_rate="1e-3"), "learning_rate='1e-3': expected a number"),
    (lambda: A(learning_rate=float("nan")), "learning_rate=nan: expected a finite number"),
    (lambda: A(learning_rate=-1.0), "learning_rate=-1.0: expected a number >= 0"),
    (lambda: A(weight_decay=-0.1), "weight_decay=-0.1: expected a number >= 0"),
    (lambda: A(adam_epsilon=-1e-8), "adam_epsilon=-1e-08: expected a number >= 0"),
    (lambda: A(max_grad_norm=-1), "max_grad_norm=-1: expected a number >= 0"),
    (lambda: A(adam_beta1=1.0), "adam_beta1=1.0: expected a number in [0, 1)"),
    (lambda: A(adam_beta2=-0.1), "adam_beta2=-0.1: expected a number in [0, 1)"),
    (lambda: A(optim=3), "optim=3: expected an optimizer name (a string)"),
    (
        lambda: A(optim="adamw_torc"),
        "optim='adamw_torc' is not a known optimizer; did you mean 'adamw_torch' or 'adamw_torch_8bit' or "
        f"'adamw_torch_4bit'? (accepted: {', '.join(registered_names())})",
    ),
    (
        lambda: A(warmup_steps=-1),
        "warmup_steps=-1: expected an int number of steps >= 0 or a float ratio in [0, 1)",
    ),
    (
        lambda: A(warmup_steps=2.5),
        "warmup_steps=2.5: a float must be a ratio in [0, 1); give a number of steps as an int",
    ),
    (
        lambda: A(lr_scheduler_type="linaer"),
        f"lr_scheduler_type='linaer' is not a known scheduler; did you mean 'linear'? (accepted: "
        f"{', '.join(SCHEDULER_NAMES)})",
    ),
    (
        lambda: A(lr_scheduler_type="cosine", lr_scheduler_kwargs="{bad"),
        "lr_scheduler_kwargs='{bad': expected a mapping or a JSON object (Expecting property name enclosed in double "
        "quotes: line 1 column 2 (char 1))",
    ),
    (lambda: A(lr_scheduler_type="cosine", lr_scheduler_kwargs=[1]), "lr_scheduler_kwargs=[1]: expected a mapping"),
    (
        lambda: A(lr_scheduler_type="constant", lr_scheduler_kwargs={"x": 1}),
        "lr_scheduler_kwargs={'x': 1} has no effect with lr_scheduler_type='constant', which takes no extra arguments",
    ),
    (
        lambda: A(lr_scheduler_type="cosine", lr_scheduler_kwargs={"num_cycle": 0.5}),
        "lr_scheduler_kwargs: unknown key 'num_cycle' for lr_scheduler_type='cosine'; did you mean 'num_cycles'? "
        "(accepted: num_cycles, last_epoch)",
    ),
    (
        lambda: A(lr_scheduler_type="inverse_sqrt", lr_scheduler_kwargs={"x": 1}),
        "lr_scheduler_kwargs: unknown key 'x' for lr_scheduler_type='inverse_sqrt' (accepted: timescale, last_epoch)",
    ),
    (
        lambda: A(lr_scheduler_type="cosine_with_min_lr"),
        "lr_scheduler_type='cosine_with_min_lr' with lr_scheduler_kwargs=None: transformers' get_scheduler refuses it "
        "(One of min_lr or min_lr_rate should be set through the `lr_scheduler_kwargs`)",
    ),
    (
        lambda: A(lr_scheduler_type="warmup_stable_decay", lr_scheduler_kwargs={"min_lr_ratio": 0.1}),
        "lr_scheduler_type='warmup_stable_decay' with lr_scheduler_kwargs={'min_lr_ratio': 0.1}: transformers' "
        "get_scheduler refuses it",
    ),
    (
        lambda: A(lr_scheduler_type="constant", warmup_steps=3),
        "warmup_steps=3 has no effect with lr_scheduler_type='constant'; use 'constant_with_warmup' or another "
        "schedule with warmup, or set warmup_steps=0",
    ),
    (
        lambda: A(optim="adamw_torch", optim_target_modules="all-linear"),
        "optim_target_modules='all-linear' has no effect with optim='adamw_torch'; it is used by the low-rank "
        "optimizers (apollo_*, galore_*) only",
    ),
    (
        lambda: A(optim="apollo_adamw"),
        "optim_target_modules is required for optim='apollo_adamw': a regex string, a list of module names or "
        "regexes, or 'all-linear' (e.g. ['.*.attn.*', '.*.mlp.*'])",
    ),
    (
        lambda: A(optim="apollo_adamw", optim_target_modules=[]),
        "optim_target_modules=[]: expected a regex string, a non-empty list of strings, or 'all-linear'",
    ),
    (
        lambda: A(optim="apollo_adamw", optim_target_modules="(["),
        "optim_target_modules: '([' is not a valid regular expression (unterminated character set at position 1)",
    ),
    (
        lambda: A(optim="apollo_adamw", optim_target_modules=["q_proj", "(["]),
        "optim_target_modules: '([' is not a valid regular expression (unterminated character set at position 1)",
    ),
    (
        lambda: A(optim="lomo", weight_decay=0.1),
        "weight_decay=0.1 has no effect with optim='lomo', which transformers builds without it (it reads: "
        "learning_rate); remove it, or use optim_args where the optimizer accepts the key",
    ),
    (
        lambda: A(optim="sgd", adam_beta1=0.8),
        "adam_beta1=0.8 has no effect with optim='sgd', which transformers builds without it (it reads: "
        "learning_rate, weight_decay); remove it, or use optim_args where the optimizer accepts the key",
    ),
    (
        lambda: A(optim="lion_32bit", adam_epsilon=1e-6),
        "adam_epsilon=1e-06 has no effect with optim='lion_32bit', which transformers builds without it (it reads: "
        "learning_rate, adam_beta1, adam_beta2, weight_decay); remove it, or use optim_args where the optimizer "
        "accepts the key",
    ),
    (
        lambda: A(optim="apollo_adamw_layerwise", optim_target_modules="all-linear"),
        "max_grad_norm=1.0 has no effect with optim='apollo_adamw_layerwise': it updates each parameter during "
        "backward, before any clipping could see the gradients; set max_grad_norm=0",
    ),
    (
        lambda: A(**TARGETED, optim_args=3),
        "optim_args: expected a 'key=value,key=value' string or a mapping, got int",
    ),
    (
        lambda: parse_optim_args("rank", APOLLO, "apollo_adamw"),
        "optim_args: fragment 'rank' is not of the form key=value; expected key=value pairs separated by commas, "
        "e.g. 'rank=64,scale=2'",
    ),
    (
        lambda: parse_optim_args("rank=1=2", APOLLO, "apollo_adamw"),
        "optim_args: fragment 'rank=1=2' is not of the form key=value; expected key=value pairs separated by commas, "
        "e.g. 'rank=64,scale=2'",
    ),
    (lambda: parse_optim_args("=3", APOLLO, "apollo_adamw"), "optim_args: fragment '=3' has no key before '='"),
    (lambda: parse_optim_args("rank=1,rank=2", APOLLO, "apollo_adamw"), "optim_args: key 'rank' is given twice"),
    (lambda: parse_optim_args({1: 2}, APOLLO, "apollo_adamw"), "optim_args: key 1 is not a string"),
    (
        lambda: parse_optim_args("rnak=1", APOLLO, "apollo_adamw"),
        "optim_args: unknown key 'rnak' for apollo_adamw; accepted: rank, proj, scale_type, update_proj_gap, scale, "
        "proj_type; did you mean 'rank'?",
    ),
    (
        lambda: parse_optim_args("x=1", (), "adagrad_none"),
        "optim_args: unknown key 'x' for adagrad_none; it takes no optim_args",
    ),
    (
        lambda: parse_optim_args("rank=1.5", APOLLO, "apollo_adamw"),
        "optim_args: rank='1.5' for apollo_adamw: expected an integer",
    ),
    (
        lambda: parse_optim_args("rank=x", APOLLO, "apollo_adamw"),
        "optim_args: rank='x' for apollo_adamw: expected an integer",
    ),
    (
        lambda: parse_optim_args({"rank": 1.5}, APOLLO, "apollo_adamw"),
        "optim_args: rank=1.5 for apollo_adamw: expected an integer",
    ),
    (
        lambda: parse_optim_args({"rank": True}, APOLLO, "apollo_adamw"),
        "optim_args: rank=True for apollo_adamw: expected an integer",
    ),
    (
        lambda: parse_optim_args("scale=x", APOLLO, "apollo_adamw"),
        "optim_args: scale='x' for apollo_adamw: expected a number",
    ),
    (
        lambda: parse_optim_args({"scale": "x"}, APOLLO, "apollo_adamw"),
        "optim_args: scale='x' for apollo_adamw: expected a number",
    ),
    (
        lambda: parse_optim_args({"scale": True}, APOLLO, "apollo_adamw"),
        "optim_args: scale=True for apollo_adamw: expected a number",
    ),
    (
        lambda: parse_optim_args("scale=inf", APOLLO, "apollo_adamw"),
        "optim_args: scale='inf' for apollo_adamw: expected a finite number",
    ),
    (
        lambda: parse_optim_args("proj=gaussian", APOLLO, "apollo_adamw"),
        "optim_args: proj='gaussian' for apollo_adamw: accepted values are 'random', 'svd'",
    ),
    (
        lambda: parse_optim_args({"proj": 3}, APOLLO, "apollo_adamw"),
        "optim_args: proj=3 for apollo_adamw: expected a string",
    ),
    (
        lambda: parse_optim_args("nesterov=maybe", SGD, "sgd"),
        "optim_args: nesterov='maybe' for sgd: expected a boolean (true/false, 1/0, yes/no)",
    ),
    (
        lambda: parse_optim_args({"nesterov": 1}, SGD, "sgd"),
        "optim_args: nesterov=1 for sgd: expected a boolean (true/false)",
    ),
    (
        lambda: create_optimizer(tiny_llama(), A(optim="apollo_adamw", optim_target_modules="nothing")),
        "optim_target_modules='nothing' selects no nn.Linear module of LlamaForCausalLM for apollo_adamw; module "
        "names look like 'model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.k_proj', "
        "'model.layers.0.self_attn.v_proj', ...",
    ),
    (
        lambda: create_optimizer(nn.Sequential(nn.Linear(2, 2)), A(optim="apollo_adamw", optim_target_modules="x")),
        "optim_target_modules='x' selects no nn.Linear module of Sequential for apollo_adamw; module names look "
        "like '0'",
    ),
    (
        lambda: create_optimizer(linears(3), A(optim="apollo_adamw", optim_target_modules="x")),
        "optim_target_modules='x' selects no nn.Linear module of Sequential for apollo_adamw; module names look "
        "like '0', '1', '2'",
    ),
    (
        lambda: create_optimizer(linears(4), A(optim="apollo_adamw", optim_target_modules="x")),
        "optim_target_modules='x' selects no nn.Linear module of Sequential for apollo_adamw; module names look "
        "like '0', '1', '2', ...",
    ),
    (
        lambda: create_optimizer(tiny_llama(), A(**TARGETED, optim_args="rank=2,proj_type=reverse_std")),
        "optim_args scale_type='channel' with proj_type='reverse_std' and rank=2 cannot step "
        "'model.layers.0.self_attn.q_proj.weight' [16, 16]: its projection is on the other side than "
        "proj_type='std' takes, where APOLLO's channel-wise ratio has 2 numbers for the matrix's 16 rows, and "
        "apollo_torch fails with a shape error at the first step. Use proj_type='std', scale_type='tensor' or rank=1",
    ),
    (
        lambda: create_optimizer(
            tiny_llama(),
            A(optim="galore_adamw", optim_target_modules=["down_proj"], optim_args="rank=16,proj_type=reverse_std"),
        ),
        "optim_args proj_type='reverse_std' with rank=16 cannot step 'model.layers.0.mlp.down_proj.weight' [16, 32]: "
        "galore_torch projects it onto 16 columns and projects them back on the wrong side (a shape error at the "
        "first step). Use a rank below 16, or another proj_type",
    ),
    (
        lambda: create_optimizer(nn.Sequential(nn.ReLU()), A(optim="apollo_adamw", optim_target_modules="x")),
        "optim_target_modules='x' selects no nn.Linear module of Sequential for apollo_adamw; module names look "
        "like (the model has no nn.Linear module)",
    ),
]


def linears(n: int) -> nn.Sequential:
    return nn.Sequential(*[nn.Linear(2, 2) for _ in range(n)])


@pytest.mark.parametrize(("call", "message"), REFUSALS, ids=range(len(REFUSALS)))
def test_refusal_message(call, message):
    with pytest.raises(OptimizerSettingError) as error:
        call()
    if message.endswith("get_scheduler refuses it"):  # (transformers' own words follow, in parentheses)
        assert str(error.value).startswith(message + " (")
    else:
        assert str(error.value) == message


WARNINGS = [
    (
        lambda: A(optim="schedule_free_adamw", lr_scheduler_type="linear"),
        "optim='schedule_free_adamw' with lr_scheduler_type='linear': schedule-free optimizers replace the schedule; "
        "'constant' is recommended, other schedules work against the method",
    ),
    (
        lambda: A(optim="schedule_free_radam", lr_scheduler_type="constant_with_warmup", warmup_steps=3),
        "optim='schedule_free_radam' with lr_scheduler_type='constant_with_warmup': schedule-free optimizers replace "
        "the schedule; 'constant' is recommended, other schedules work against the method",
        "optim='schedule_free_radam' needs no warmup, and warmup_steps=3 applies a scheduler warmup to it",
    ),
    (
        lambda: create_optimizer(
            tiny_llama(), A(optim="apollo_adamw", optim_target_modules=["q_proj", "gate_proj"], optim_args="rank=16")
        ),
        "optim_args rank=16 for apollo_adamw is not below the smaller dimension of 4 target matrices (e.g. (16, 16)): "
        "their projected optimizer state is no smaller than the matrix, so the low-rank method saves nothing there "
        "(benchmarks/optimizer_state.py: 4.6x AdamW's state for rank 256 on the 64-wide example model). Use a "
        "smaller rank or fewer target modules.",
    ),
    (
        lambda: create_optimizer(tiny_llama(), A(**TARGETED, optim_args="rank=16")),
        "optim_args rank=16 for apollo_adamw is not below the smaller dimension of 15 target matrices (e.g. (16, 16)): "
        "their projected optimizer state is no smaller than the matrix, so the low-rank method saves nothing there "
        "(benchmarks/optimizer_state.py: 4.6x AdamW's state for rank 256 on the 64-wide example model). Use a "
        "smaller rank or fewer target modules.",
    ),
]


@pytest.mark.parametrize(("call", "messages"), [(w[0], w[1:]) for w in WARNINGS], ids=range(len(WARNINGS)))
def test_warning_message(call, messages):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    assert [str(w.message) for w in caught if w.category is UserWarning and _ours(w)] == list(messages)


@pytest.mark.parametrize("call", [w[0] for w in WARNINGS], ids=range(len(WARNINGS)))
def test_a_warning_points_at_the_callers_line(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    ours = [w for w in caught if w.category is UserWarning and _ours(w)]
    assert ours and all(w.filename == __file__ for w in ours)  # this file's lambda: the line that asked for it


def _ours(warning: warnings.WarningMessage) -> bool:
    """One of this package's warnings (not a dependency's)."""
    text = str(warning.message)
    return text.startswith(("optim=", "optim_args")) and "lightning_optims" not in warning.filename


def test_a_warning_through_the_mixin_points_at_the_users_module():
    with pytest.warns(UserWarning, match="schedule-free optimizers replace the schedule") as caught:
        LlamaModule(model=tiny_llama(), optim="schedule_free_adamw", lr_scheduler_type="linear")
    assert caught[0].filename.endswith("tests/helpers.py")  # LlamaModule.__init__, the user's super().__init__


@pytest.mark.parametrize(
    ("settings", "quiet"),
    [
        (dict(optim="schedule_free_adamw", lr_scheduler_type="constant"), True),
        (dict(optim="schedule_free_adamw", lr_scheduler_type="constant", warmup_steps=3), True),  # its own warmup
        (dict(optim="schedule_free_adamw", lr_scheduler_type="constant_with_warmup", warmup_steps=3), False),
        (dict(optim="adamw_torch", lr_scheduler_type="linear", warmup_steps=3), True),
        (dict(**TARGETED, optim_args="rank=15"), True),  # rank below every target matrix's smaller side (16)
    ],
)
def test_no_warning_where_the_settings_are_the_recommended_ones(settings, quiet):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        create_optimizer(tiny_llama(), A(**settings))
    ours = [str(w.message) for w in caught if w.category is UserWarning and _ours(w)]
    assert (ours == []) is quiet, ours


def test_enum_members_and_json_strings_are_read_as_the_trainer_reads_them():
    """TrainingArguments hands over enum members (OptimizerNames, SchedulerType) and may hold a JSON string."""
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    args = A(optim=OptimizerNames.ADAMW_TORCH, lr_scheduler_type=SchedulerType.COSINE, lr_scheduler_kwargs="")
    assert (type(args.optim), args.optim, type(args.lr_scheduler_type), args.lr_scheduler_type) == (
        str,
        "adamw_torch",
        str,
        "cosine",
    )
    assert args.lr_scheduler_kwargs is None
    args = A(lr_scheduler_type="cosine", lr_scheduler_kwargs='{"num_cycles": 0.25}')
    assert args.lr_scheduler_kwargs == {"num_cycles": 0.25} and args.scheduler_kwargs == {"num_cycles": 0.25}
    ta = TrainingArguments(output_dir="unused", optim="adamw_torch", lr_scheduler_type="cosine", report_to=[])
    from_ta = A.from_training_arguments(ta)
    assert (type(from_ta.optim), type(from_ta.lr_scheduler_type)) == (str, str)


@pytest.mark.parametrize(
    ("settings", "field", "value"),
    [
        (dict(adam_beta1=0.0, adam_beta2=0.0), "adam_beta1", 0.0),  # 0 is a valid beta
        (dict(warmup_steps=1.0), "warmup_steps", 1),  # a float >= 1 that is whole: a number of steps
        (dict(warmup_steps=0.5), "warmup_steps", 0.5),  # a ratio stays a ratio
        (dict(optim="apollo_adamw", optim_target_modules=("q_proj",)), "optim_target_modules", ["q_proj"]),
    ],
)
def test_values_at_the_edges_are_accepted_as_the_trainer_takes_them(settings, field, value):
    got = getattr(A(**settings), field)
    assert got == value and type(got) is type(value)


def test_every_message_names_the_setting_as_written():
    """A guard on the table itself: each refusal starts with the setting's name."""
    names = (
        "optim_args",
        "optim_target_modules",
        "optim",
        "learning_rate",
        "weight_decay",
        "adam_",
        "max_grad_norm",
        "warmup_steps",
        "lr_scheduler",
    )
    for _, message in REFUSALS:
        assert re.match("|".join(names), message), message


def test_a_whole_float_for_an_int_argument_is_that_int():
    parsed = parse_optim_args({"rank": 2.0, "update_proj_gap": "1e3"}, APOLLO, "apollo_adamw")
    assert (parsed["rank"], type(parsed["rank"]), parsed["update_proj_gap"]) == (2, int, 1000)
