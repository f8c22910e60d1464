"""The optim_args parser and settings validation under arbitrary input (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_optims import OptimizerArguments, OptimizerSettingError, get_spec
from lightning_optims.optim_args import Arg, parse_optim_args, split_optim_args

APOLLO = get_spec("apollo_adamw").arguments
KEYS = [a.name for a in APOLLO] + ["rnak", "", "x"]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.sampled_from(["channel", "tensor", "random", "svd", "True", "1e3"]),
)


def check_typed(parsed: dict) -> None:
    for arg in APOLLO:
        value = parsed[arg.name]
        assert type(value) is arg.type, (arg.name, value)
        if arg.choices:
            assert value in arg.choices


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("rankscale_typ=,.0123456789 -eEtruefalsTFchnl")), max_size=40))
def test_string_input_is_typed_or_refused(text):
    try:
        parsed = parse_optim_args(text, APOLLO, "apollo_adamw")
    except OptimizerSettingError:
        return
    check_typed(parsed)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.one_of(st.sampled_from(KEYS), st.integers()), scalars, max_size=4))
def test_mapping_input_is_typed_or_refused(mapping):
    try:
        parsed = parse_optim_args(mapping, APOLLO, "apollo_adamw")
    except OptimizerSettingError:
        return
    check_typed(parsed)


field_values = st.one_of(
    scalars, st.lists(st.text(max_size=5), max_size=2), st.dictionaries(st.text(max_size=5), scalars, max_size=2)
)


@settings(max_examples=300, deadline=None)
@given(
    optim=st.one_of(
        st.sampled_from(["adamw_torch", "apollo_adamw", "sgd", "grokadamw", "schedule_free_adamw", "lomo"]),
        st.text(max_size=8),
    ),
    overrides=st.dictionaries(
        st.sampled_from(
            [
                "optim_args",
                "optim_target_modules",
                "learning_rate",
                "weight_decay",
                "adam_beta1",
                "adam_beta2",
                "adam_epsilon",
                "lr_scheduler_type",
                "lr_scheduler_kwargs",
                "warmup_steps",
                "max_grad_norm",
            ]
        ),
        field_values,
        max_size=4,
    ),
)
def test_settings_are_accepted_or_refused_with_our_error(optim, overrides):
    """Any input: refused with our error naming a setting as the user wrote it (``key=...`` or ``key: ...``), or
    accepted as validated values that rebuild the same settings."""
    try:
        args = OptimizerArguments(optim=optim, **overrides)
    except OptimizerSettingError as error:
        named = [key for key in ("optim", *overrides) if f"{key}=" in str(error) or f"{key}:" in str(error)]
        assert named, f"the refusal names none of the settings given: {error}"
        return
    assert args.optim == optim and get_spec(optim).name == optim  # a registered name, as given
    for key, value in overrides.items():
        assert key in args.as_kwargs()
        if key in ("learning_rate", "weight_decay", "adam_epsilon", "max_grad_norm"):
            assert type(getattr(args, key)) is float and getattr(args, key) >= 0 and getattr(args, key) == value
    assert OptimizerArguments(**args.as_kwargs()) == args


@pytest.mark.parametrize(
    "text, expected",
    [
        ("rank=1, scale=128.0 ,scale_type=tensor", {"rank": 1, "scale": 128.0, "scale_type": "tensor"}),
        ("rank=1,", {"rank": 1}),
        ("", {}),
        ("update_proj_gap=1e3", {"update_proj_gap": 1000}),
    ],
)
def test_string_forms(text, expected):
    parsed = parse_optim_args(text, APOLLO, "apollo_adamw")
    for key, value in expected.items():
        assert parsed[key] == value and type(parsed[key]) is type(value)


def test_empty_fragments_are_skipped_not_the_end():
    assert split_optim_args("rank=1,,scale=2.0,") == {"rank": "1", "scale": "2.0"}


def test_an_argument_of_an_unsupported_type_is_a_registry_bug():
    with pytest.raises(TypeError, match=r"unsupported Arg type <class 'list'>"):
        Arg("x", list, None).convert("a", "some_optim")
