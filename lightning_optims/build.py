"""The pure layer: build the optimizer and scheduler transformers' Trainer would build, without Lightning."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import get_scheduler

from lightning_optims import compat
from lightning_optims.arguments import OptimizerArguments
from lightning_optims.distributed.placements import is_sharded
from lightning_optims.engines.layerwise import build_layerwise
from lightning_optims.engines.sharded import ShardedStepOptimizer
from lightning_optims.engines.sharded_layerwise import ShardedLayerwiseOptimizer
from lightning_optims.optim_args import OptimizerSettingError
from lightning_optims.param_groups import (
    all_params_group,
    decay_and_target_groups,
    decay_param_groups,
    low_rank_param_groups,
    target_parameter_names,
)
from lightning_optims.registry import get_spec
from lightning_optims.spec import BuildContext, load
from lightning_optims.warn import warn_user

__all__ = ["GreedyLRScheduler", "ScheduledGroupsLambdaLR", "create_optimizer", "create_scheduler", "num_warmup_steps"]


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
    ctx = BuildContext(
        args=args, optim_args=dict(args.parsed_optim_args), model=model, num_training_steps=num_training_steps
    )
    kwargs: dict[str, Any] = {"lr": args.learning_rate, **spec.kwargs(ctx)}
    params: Any
    if spec.params == "decay_groups":
        params = decay_param_groups(model, args.weight_decay)
    elif spec.needs_target_modules:
        assert spec.target_group_kwargs is not None  # register() guarantees it
        target_kwargs = spec.target_group_kwargs(ctx)
        targets = args.optim_target_modules
        assert targets is not None  # OptimizerArguments refuses a low-rank optim without optim_target_modules
        names = target_parameter_names(model, targets, spec.name)
        if spec.refine_targets is not None:
            names = spec.refine_targets(model, names)
        if spec.params == "low_rank":
            params = low_rank_param_groups(model, names, target_kwargs)
            _warn_if_rank_too_large(params[1], spec.name)
        else:
            params = decay_and_target_groups(model, names, target_kwargs, args.weight_decay)
        named = dict(model.named_parameters())
        if spec.check_targets is not None and (
            problem := spec.check_targets(target_kwargs, [(n, tuple(named[n].shape)) for n in names])
        ):
            raise OptimizerSettingError(problem)
        # frozen targets too: a group added during training (BaseFinetuning unfreezing them) projects them as well
        wanted = set(names)
        low_rank_targets = ([p for n, p in named.items() if n in wanted], target_kwargs)
    else:
        params = all_params_group(model)
    # sharded parameters (FSDP2, HSDP, tensor parallel, 2-D): what the spec's Sharding says
    sharding = spec.sharding if is_sharded([p for g in params for p in g["params"]]) else None
    optimizer: Any
    if sharding is not None and sharding.optimizer is not None:
        optimizer = load(sharding.optimizer)(params, **kwargs)  # the family's own sharded optimizer
    elif sharding is not None and sharding.part_step is not None:  # the family's step on each process's part
        engine = ShardedLayerwiseOptimizer if spec.layerwise else ShardedStepOptimizer  # (by FSDP2 group, or all)
        optimizer = engine(params, optimizer_cls, kwargs, sharding.part_step)
    elif spec.layerwise:
        optimizer = build_layerwise(optimizer_cls, params, kwargs)
    else:
        optimizer = optimizer_cls(params, **kwargs)
    if spec.needs_target_modules:
        optimizer.low_rank_targets = low_rank_targets
    if spec.post_build is not None:
        spec.post_build(optimizer, ctx)
    return optimizer


def _warn_if_rank_too_large(target_group: dict[str, Any], optim: str) -> None:
    rank = target_group.get("rank")
    if rank is None:
        return
    too_small = [tuple(p.shape) for p in target_group["params"] if rank >= min(p.shape)]  # (nn.Linear weights)
    if too_small:
        warn_user(
            f"optim_args rank={rank} for {optim} is not below the smaller dimension of {len(too_small)} target "
            f"matrices (e.g. {too_small[0]}): their projected optimizer state is no smaller than the matrix, so the "
            "low-rank method saves nothing there (benchmarks/optimizer_state.py: 4.6x AdamW's state for rank 256 on "
            "the 64-wide example model). Use a smaller rank or fewer target modules."
        )


def num_warmup_steps(args: OptimizerArguments, num_training_steps: int) -> int:
    """``TrainingArguments.get_warmup_steps``: an int is steps, a float in [0, 1) a ratio of the training steps."""
    w = args.warmup_steps
    return int(w) if w >= 1 else math.ceil(num_training_steps * w)


class ScheduledGroupsLambdaLR(torch.optim.lr_scheduler.LambdaLR):
    """transformers' ``LambdaLR`` schedules, tolerant of param groups added during training.

    torch's ``LambdaLR`` has one factor per group and raises (``zip() argument 2 is shorter than argument 1``) once a
    group is added, as Lightning's ``BaseFinetuning`` / ``BackboneFinetuning`` do when they unfreeze a backbone. Here
    the groups the optimizer was built with follow the schedule, and a group added later keeps the learning rate
    given to it by whoever added it (``BackboneFinetuning`` sets its backbone group's lr every epoch).
    """

    def scheduled_lrs(self) -> list[Any]:
        """The learning rates of the groups built with, at the current step."""
        return [base_lr * factor(self.last_epoch) for factor, base_lr in zip(self.lr_lambdas, self.base_lrs)]

    def get_lr(self) -> list[Any]:
        scheduled = self.scheduled_lrs()
        return scheduled + [group["lr"] for group in self.optimizer.param_groups[len(scheduled) :]]


def _greedy_lr_scheduler() -> Any:
    greedy = compat.FEATURES["greedy"].load()
    if greedy is None:
        return None

    # (GreedyLR's step / get_last_lr keep their own signatures: the LRScheduler base is only what Lightning checks for)
    class GreedyLRScheduler(greedy, torch.optim.lr_scheduler.LRScheduler):  # type: ignore[misc,valid-type]
        """transformers' ``GreedyLR`` as a Lightning-compatible scheduler (Lightning accepts only ``LRScheduler`` and
        ``ReduceLROnPlateau`` instances); the behaviour is ``GreedyLR``'s. Stepped with the monitored metric after
        each validation, as the Trainer steps it after each evaluation."""

    GreedyLRScheduler.__qualname__ = GreedyLRScheduler.__name__
    return GreedyLRScheduler


#: transformers' ``GreedyLR`` as a Lightning-compatible scheduler; None on a transformers without it (before 5.4,
#: where ``lr_scheduler_type='greedy'`` is refused with the versions)
GreedyLRScheduler: Any = _greedy_lr_scheduler()


def create_scheduler(
    optimizer: torch.optim.Optimizer, args: OptimizerArguments, num_training_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """``transformers.get_scheduler`` with the Trainer's warmup rule and ``lr_scheduler_kwargs``.

    The schedules built on ``LambdaLR`` become :class:`ScheduledGroupsLambdaLR` (same learning rates; a param group
    added later keeps its own), ``greedy`` a :class:`GreedyLRScheduler`.
    """
    if args.lr_scheduler_type == "greedy":
        return GreedyLRScheduler(optimizer, **(args.scheduler_kwargs or {}))
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=num_warmup_steps(args, num_training_steps),
        num_training_steps=num_training_steps,
        scheduler_specific_kwargs=args.scheduler_kwargs,
    )
    if type(scheduler) is torch.optim.lr_scheduler.LambdaLR:
        scheduler.__class__ = ScheduledGroupsLambdaLR  # same state; only get_lr differs, for added groups
    return scheduler
