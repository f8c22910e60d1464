"""``OptimizerArguments``: transformers' optimizer settings, validated once, when they are built."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from transformers import TrainingArguments
from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION
from transformers.trainer_utils import SchedulerType

from lightning_optims import compat
from lightning_optims.optim_args import OptimizerSettingError, closest, parse_optim_args
from lightning_optims.registry import get_spec
from lightning_optims.warn import warn_user

__all__ = ["DEFAULT_OPTIM", "OptimizerArguments"]

#: the default transformers picks for the installed torch (``adamw_torch_fused`` on torch >= 2.8)
DEFAULT_OPTIM: str = getattr(TrainingArguments.default_optim, "value", TrainingArguments.default_optim)

SCHEDULER_NAMES: tuple[str, ...] = tuple(s.value for s in SchedulerType)
# get_scheduler gives these no warmup and, for constant ones, none of lr_scheduler_kwargs either
_NO_WARMUP_SCHEDULERS = ("constant", "reduce_lr_on_plateau", "greedy")
_NO_KWARGS_SCHEDULERS = ("constant", "constant_with_warmup")
# keyword arguments get_scheduler fills itself
_FILLED_BY_GET_SCHEDULER = {"optimizer", "num_warmup_steps", "num_training_steps"}
# general settings that an optimizer may not read (see OptimizerSpec.uses)
_OPTIONAL_FIELDS = ("adam_beta1", "adam_beta2", "adam_epsilon", "weight_decay")


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptimizerSettingError(f"{name}={value!r}: expected a number")
    if not math.isfinite(value):
        raise OptimizerSettingError(f"{name}={value!r}: expected a finite number")
    return float(value)


@dataclass
class OptimizerArguments:
    """transformers' ``TrainingArguments`` optimizer fields, with their names and defaults.

    Every field is checked when the object is built; a bad value raises :class:`OptimizerSettingError` naming the
    field as written and what is accepted. ``optim_args`` is parsed against the chosen optimizer's table into
    :attr:`parsed_optim_args`.
    """

    optim: str = DEFAULT_OPTIM
    optim_args: str | dict[str, Any] | None = None
    optim_target_modules: str | list[str] | None = None
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_scheduler_type: str = "linear"
    lr_scheduler_kwargs: dict[str, Any] | str | None = None
    warmup_steps: float = 0
    max_grad_norm: float = 1.0
    parsed_optim_args: dict[str, Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.optim = getattr(self.optim, "value", self.optim)  # an OptimizerNames member
        if not isinstance(self.optim, str):
            raise OptimizerSettingError(f"optim={self.optim!r}: expected an optimizer name (a string)")
        spec = get_spec(self.optim)

        # each stored as the float it validates to (a YAML `learning_rate: 1` is an int: typed as declared)
        for name in ("learning_rate", "weight_decay", "adam_epsilon", "max_grad_norm"):
            if _number(name, getattr(self, name)) < 0:
                raise OptimizerSettingError(f"{name}={getattr(self, name)!r}: expected a number >= 0")
            setattr(self, name, float(getattr(self, name)))
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= _number(name, getattr(self, name)) < 1.0:
                raise OptimizerSettingError(f"{name}={getattr(self, name)!r}: expected a number in [0, 1)")
            setattr(self, name, float(getattr(self, name)))
        self._check_warmup()
        self._check_scheduler(spec)
        self._check_target_modules(spec)
        self.parsed_optim_args = parse_optim_args(self.optim_args, spec.arguments, spec.name)
        if self.optim_args and spec.optim_args_need and (needs := compat.missing(spec.optim_args_need)):
            raise OptimizerSettingError(
                f"optim_args={self.optim_args!r} for optim={spec.name!r}: {needs}, where transformers' Trainer "
                "ignores them; upgrade transformers, or leave optim_args unset"
            )
        self._check_used_by(spec)
        self._warn_against_recommendations(spec)

    # -- checks ---------------------------------------------------------------------------------------------------

    def _check_warmup(self) -> None:
        w = self.warmup_steps
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise OptimizerSettingError(
                f"warmup_steps={w!r}: expected an int number of steps >= 0 or a float ratio in [0, 1)"
            )
        if isinstance(w, float) and w >= 1:
            if not w.is_integer():
                raise OptimizerSettingError(
                    f"warmup_steps={w!r}: a float must be a ratio in [0, 1); give a number of steps as an int"
                )
            self.warmup_steps = int(w)

    def _check_scheduler(self, spec) -> None:
        name = getattr(self.lr_scheduler_type, "value", self.lr_scheduler_type)
        if name == "greedy" and (needs := compat.missing("greedy")):
            raise OptimizerSettingError(f"{needs}: upgrade transformers, or choose another lr_scheduler_type")
        if name not in SCHEDULER_NAMES:
            raise OptimizerSettingError(
                f"lr_scheduler_type={name!r} is not a known scheduler{closest(str(name), SCHEDULER_NAMES)} "
                f"(accepted: {', '.join(SCHEDULER_NAMES)})"
            )
        self.lr_scheduler_type = name
        kwargs = self.lr_scheduler_kwargs
        if isinstance(kwargs, str):
            # TrainingArguments accepts a JSON string here
            try:
                kwargs = json.loads(kwargs) if kwargs.strip() else {}
            except json.JSONDecodeError as err:
                raise OptimizerSettingError(
                    f"lr_scheduler_kwargs={self.lr_scheduler_kwargs!r}: expected a mapping or a JSON object ({err})"
                ) from None
        if kwargs is None:
            kwargs = {}
        if not isinstance(kwargs, Mapping):
            raise OptimizerSettingError(f"lr_scheduler_kwargs={self.lr_scheduler_kwargs!r}: expected a mapping")
        self.lr_scheduler_kwargs = dict(kwargs) or None
        if kwargs:
            if name in _NO_KWARGS_SCHEDULERS:
                raise OptimizerSettingError(
                    f"lr_scheduler_kwargs={dict(kwargs)!r} has no effect with lr_scheduler_type={name!r}, "
                    "which takes no extra arguments"
                )
            schedule = cast("Callable[..., Any]", TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)])
            params = inspect.signature(schedule).parameters
            if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
                accepted = [p for p in params if p not in _FILLED_BY_GET_SCHEDULER]
                for key in kwargs:
                    if key not in accepted:
                        raise OptimizerSettingError(
                            f"lr_scheduler_kwargs: unknown key {key!r} for lr_scheduler_type={name!r}"
                            f"{closest(str(key), accepted)} (accepted: {', '.join(accepted)})"
                        )
        self._check_scheduler_builds(name, dict(kwargs))
        if self.warmup_steps and name in _NO_WARMUP_SCHEDULERS and "warmup_steps" not in spec.uses:
            raise OptimizerSettingError(
                f"warmup_steps={self.warmup_steps!r} has no effect with lr_scheduler_type={name!r}; "
                "use 'constant_with_warmup' or another schedule with warmup, or set warmup_steps=0"
            )

    @staticmethod
    def _check_scheduler_builds(name: str, kwargs: dict[str, Any]) -> None:
        """Build the schedule once on a throw-away optimizer, so that what ``get_scheduler`` would refuse when
        ``fit`` starts (``cosine_with_min_lr`` without ``min_lr`` / ``min_lr_rate``, ``warmup_stable_decay`` without
        ``num_decay_steps``, a bad value) is refused now, naming the setting."""
        import torch
        from transformers import get_scheduler

        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        try:
            get_scheduler(
                name, optimizer, num_warmup_steps=1, num_training_steps=1000, scheduler_specific_kwargs=kwargs or None
            )
        except (TypeError, ValueError) as err:
            raise OptimizerSettingError(
                f"lr_scheduler_type={name!r} with lr_scheduler_kwargs={kwargs or None!r}: transformers' get_scheduler "
                f"refuses it ({err})"
            ) from None

    def _check_target_modules(self, spec) -> None:
        targets = self.optim_target_modules
        if not spec.needs_target_modules:
            if targets is not None:
                raise OptimizerSettingError(
                    f"optim_target_modules={targets!r} has no effect with optim={spec.name!r}; it is used by the "
                    "low-rank optimizers (apollo_*, galore_*) only"
                )
            return
        if targets is None:
            raise OptimizerSettingError(
                f"optim_target_modules is required for optim={spec.name!r}: a regex string, a list of module names "
                "or regexes, or 'all-linear' (e.g. ['.*.attn.*', '.*.mlp.*'])"
            )
        if isinstance(targets, tuple):
            targets = self.optim_target_modules = list(targets)
        if isinstance(targets, str):
            patterns = [targets]  # ('all-linear' compiles too)
        elif isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
            patterns = targets
        else:
            raise OptimizerSettingError(
                f"optim_target_modules={targets!r}: expected a regex string, a non-empty list of strings, "
                "or 'all-linear'"
            )
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as err:
                raise OptimizerSettingError(
                    f"optim_target_modules: {pattern!r} is not a valid regular expression ({err})"
                ) from None

    def _check_used_by(self, spec) -> None:
        defaults = {f.name: f.default for f in dataclasses.fields(OptimizerArguments)}
        for name in _OPTIONAL_FIELDS:
            value = getattr(self, name)
            if name not in spec.uses and value != defaults[name]:
                used = [f for f in _OPTIONAL_FIELDS if f in spec.uses]
                raise OptimizerSettingError(
                    f"{name}={value!r} has no effect with optim={spec.name!r}, which transformers builds without "
                    f"it (it reads: learning_rate{''.join(', ' + u for u in used)}); remove it, or use "
                    "optim_args where the optimizer accepts the key"
                )
        if self.max_grad_norm > 0 and spec.layerwise:
            raise OptimizerSettingError(
                f"max_grad_norm={self.max_grad_norm!r} has no effect with optim={spec.name!r}: it updates each "
                "parameter during backward, before any clipping could see the gradients; set max_grad_norm=0"
            )

    def _warn_against_recommendations(self, spec) -> None:
        if spec.has_train_eval_modes and self.lr_scheduler_type != "constant":
            warn_user(
                f"optim={spec.name!r} with lr_scheduler_type={self.lr_scheduler_type!r}: schedule-free optimizers "
                "replace the schedule; 'constant' is recommended, other schedules work against the method"
            )
        if spec.has_train_eval_modes and self.warmup_steps and "warmup_steps" not in spec.uses:
            warn_user(
                f"optim={spec.name!r} needs no warmup, and warmup_steps={self.warmup_steps!r} applies a scheduler "
                "warmup to it"
            )

    # -- conversions ----------------------------------------------------------------------------------------------

    @property
    def scheduler_kwargs(self) -> dict[str, Any] | None:
        """``lr_scheduler_kwargs`` as validated: a mapping (a JSON string was parsed), or ``None``."""
        return cast("dict[str, Any] | None", self.lr_scheduler_kwargs)

    def as_kwargs(self) -> dict[str, Any]:
        """The fields as keyword arguments (for ``OptimizerMixin.__init__`` or ``dataclasses.replace``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    @classmethod
    def from_training_arguments(cls, training_args: TrainingArguments) -> OptimizerArguments:
        """Copy the optimizer settings of a ``transformers.TrainingArguments``."""
        values = {}
        for f in dataclasses.fields(cls):
            if f.init:
                values[f.name] = getattr(training_args, f.name)  # (enum members are read in __post_init__)
        return cls(**values)
