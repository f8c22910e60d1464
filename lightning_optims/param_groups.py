"""Parameter groups with transformers' semantics: weight-decay exclusion and target-module matching."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers.trainer_pt_utils import get_parameter_names
from transformers.trainer_utils import check_target_module_exists

from lightning_optims.optim_args import OptimizerSettingError

log = logging.getLogger(__name__)

# transformers.Trainer.get_decay_parameter_names
NO_DECAY_NAME_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


def decay_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters that get weight decay (not in ``nn.LayerNorm``, no bias / norm in the name)."""
    return get_parameter_names(model, [nn.LayerNorm], list(NO_DECAY_NAME_PATTERNS))


def decay_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """``[decay params with weight_decay, the rest with 0.0]``, trainable parameters only (Trainer.create_optimizer),
    named ``decay`` and ``no_decay`` (Lightning's ``LearningRateMonitor`` logs ``lr-AdamW/decay``)."""
    decay = set(decay_parameter_names(model))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if n in decay], "weight_decay": weight_decay, "name": "decay"},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0, "name": "no_decay"},
    ]


def is_all_linear(target_modules: Any) -> bool:
    return isinstance(target_modules, str) and target_modules.replace("_", "-") == "all-linear"


def target_parameter_names(model: nn.Module, target_modules: str | list[str], optim: str) -> list[str]:
    """Weights of the ``nn.Linear`` modules that ``target_modules`` selects, as transformers selects them.

    A str is a full-match regex; a list tries exact name, then substring, then full-match regex per item;
    ``"all-linear"`` (as a bare str) takes every ``nn.Linear``.
    """
    all_linear = is_all_linear(target_modules)
    names = []
    for module_name, module in model.named_modules():
        found, is_regex = check_target_module_exists(target_modules, module_name, return_is_regex=True)
        if not isinstance(module, nn.Linear):
            if found and not is_regex:
                log.warning("%s matched but ignored: %s only projects nn.Linear layers.", module_name, optim)
            continue
        if found or all_linear:
            names.append(module_name + ".weight")
    if not names:
        raise OptimizerSettingError(
            f"optim_target_modules={target_modules!r} selects no nn.Linear module of {type(model).__name__} "
            f"for {optim}; module names look like {_sample_linear_names(model)}"
        )
    return names


def _sample_linear_names(model: nn.Module) -> str:
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linear:
        return "(the model has no nn.Linear module)"
    return ", ".join(repr(n) for n in linear[:3]) + (", ..." if len(linear) > 3 else "")


def low_rank_param_groups(
    model: nn.Module, target_names: list[str], target_group_kwargs: dict[str, Any]
) -> list[dict[str, Any]]:
    """``[non-target params, target params + kwargs]`` (transformers' _setup_low_rank_optimizer) for the targets
    :func:`target_parameter_names` chose, trainable parameters only (transformers also puts frozen ones in these
    groups), named ``full_rank`` and ``low_rank``."""
    targets = set(target_names)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if n not in targets], "name": "full_rank"},
        {"params": [p for n, p in named if n in targets], **target_group_kwargs, "name": "low_rank"},
    ]


def decay_and_target_groups(
    model: nn.Module, target_names: list[str], target_group_kwargs: dict[str, Any], weight_decay: float
) -> list[dict[str, Any]]:
    """``[decay, no_decay, targets]``: the non-target parameters in the decay / no-decay groups of
    :func:`decay_param_groups`, the targets in a group with ``weight_decay`` and ``target_group_kwargs`` (its name
    ``targets`` unless they name it); trainable parameters only."""
    targets = set(target_names)
    decay = set(decay_parameter_names(model))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {
            "params": [p for n, p in named if n in decay and n not in targets],
            "weight_decay": weight_decay,
            "name": "decay",
        },
        {
            "params": [p for n, p in named if n not in decay and n not in targets],
            "weight_decay": 0.0,
            "name": "no_decay",
        },
        {
            "name": "targets",
            "params": [p for n, p in named if n in targets],
            "weight_decay": weight_decay,
            **target_group_kwargs,
        },
    ]


def all_params_group(model: nn.Module) -> list[dict[str, Any]]:
    """One group of every trainable parameter (a frozen one is in no group), named ``all``."""
    return [{"params": [p for p in model.parameters() if p.requires_grad], "name": "all"}]


def split_added_group(group: dict[str, Any], low_rank_targets: Any) -> list[dict[str, Any]]:
    """A param group added during training, as the build would have grouped it: its parameters that
    ``optim_target_modules`` selects get the target group's options (projection), the others none.

    ``low_rank_targets`` is ``(target parameters, target group options)`` (set by ``create_optimizer``). With both
    kinds present the result is ``[others, targets]``; the first has ``follows_group`` pointing at the second, whose
    learning rate it takes before every step (callbacks such as ``BackboneFinetuning`` set the lr of the group they
    added, the last one).
    """
    params = group["params"]
    params = [params] if isinstance(params, torch.Tensor) else list(params)
    if low_rank_targets is None or any(key in group for key in low_rank_targets[1] if key != "name"):
        return [{**group, "params": params}]
    targets, options = low_rank_targets
    target_ids = {id(p) for p in targets}
    chosen = [p for p in params if id(p) in target_ids]
    if not chosen:
        return [{**group, "params": params}]
    projected = {**group, **options, "params": chosen}
    if len(chosen) == len(params):
        return [projected]
    if "name" in group:  # (LearningRateMonitor refuses two groups of one name)
        projected["name"] = f"{group['name']}_low_rank"
    return [{**group, "params": [p for p in params if id(p) not in target_ids], "follows_group": None}, projected]


def follow_leader_lrs(param_groups: list[dict[str, Any]]) -> None:
    """Give each group split off an added group the learning rate of the part it was split from."""
    for group in param_groups:
        leader = group.get("follows_group")
        if leader is not None:
            group["lr"] = param_groups[leader]["lr"]
