"""The pure layer: build the optimizer and scheduler transformers' Trainer would build, without Lightning."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn
from transformers import get_scheduler

from lightning_optims.arguments import OptimizerArguments
from lightning_optims.layerwise import build_layerwise
from lightning_optims.param_groups import decay_param_groups, low_rank_param_groups
from lightning_optims.registry import BuildContext, get_spec

__all__ = ["create_optimizer", "create_scheduler", "num_warmup_steps"]


def create_optimizer(
    model: nn.Module, args: OptimizerArguments, num_training_steps: int | None = None
) -> torch.optim.Optimizer:
    """The optimizer ``transformers.Trainer.create_optimizer()`` builds for ``model`` with these settings.

    Same class, parameter groups (decay / no-decay, or non-target / target for low-rank optimizers) and
    hyper-parameters. ``num_training_steps`` is needed only to resolve a ``warmup_steps`` ratio for optimizers that
    warm up themselves (schedule-free).
    """
    spec = get_spec(args.optim)
    optimizer_cls = spec.load_class()
    ctx = BuildContext(args=args, optim_args=dict(args.parsed_optim_args), model=model,
                       num_training_steps=num_training_steps)
    kwargs: dict[str, Any] = {"lr": args.learning_rate, **spec.kwargs(ctx)}
    params: Any
    if spec.params == "decay_groups":
        params = decay_param_groups(model, args.weight_decay)
    elif spec.params == "low_rank":
        assert spec.target_group_kwargs is not None  # register() guarantees it
        params = low_rank_param_groups(model, args.optim_target_modules, spec.name, spec.target_group_kwargs(ctx))
        _warn_if_rank_too_large(params[1], spec.name)
    else:
        params = model
    if spec.layerwise:
        return build_layerwise(optimizer_cls, params, kwargs)
    optimizer = optimizer_cls(params, **kwargs)
    if spec.post_build is not None:
        spec.post_build(optimizer, ctx)
    return optimizer


def _warn_if_rank_too_large(target_group: dict[str, Any], optim: str) -> None:
    rank = target_group.get("rank")
    if rank is None:
        return
    too_small = [tuple(p.shape) for p in target_group["params"] if p.dim() == 2 and rank >= min(p.shape)]
    if too_small:
        warnings.warn(
            f"optim_args rank={rank} for {optim} is not below the smaller dimension of {len(too_small)} target "
            f"matrices (e.g. {too_small[0]}): their projected optimizer state is no smaller than the matrix, so the "
            "low-rank method saves nothing there (benchmarks/optimizer_state.py: 4.6x AdamW's state for rank 256 on "
            "the 64-wide example model). Use a smaller rank or fewer target modules.",
            UserWarning, stacklevel=3,
        )


def num_warmup_steps(args: OptimizerArguments, num_training_steps: int) -> int:
    """``TrainingArguments.get_warmup_steps``: an int is steps, a float in [0, 1) a ratio of the training steps."""
    w = args.warmup_steps
    return int(w) if w >= 1 else math.ceil(num_training_steps * w)


def create_scheduler(
    optimizer: torch.optim.Optimizer, args: OptimizerArguments, num_training_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """``transformers.get_scheduler`` with the Trainer's warmup rule and ``lr_scheduler_kwargs``."""
    return get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=num_warmup_steps(args, num_training_steps),
        num_training_steps=num_training_steps,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs,
    )
