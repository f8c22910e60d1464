"""Schedule-free AdamW / RAdam / SGD (schedulefree package): optimizers with train() / eval() modes."""

from __future__ import annotations

import math

from lightning_optims.optim_args import Arg, OptimizerSettingError
from lightning_optims.registry import ADAM, WEIGHT_DECAY, BuildContext, OptimizerSpec, register

# the optimizer warms up itself (besides the scheduler): warmup_steps takes effect even with a constant schedule
WARMUP = frozenset({"warmup_steps"})

SCHEDULE_FREE_ARGUMENTS = (Arg("weight_lr_power", float, 2.0), Arg("r", float, 0.0))


def optimizer_warmup_steps(ctx: BuildContext) -> int:
    """``warmup_steps`` as the optimizer's own warmup.

    transformers hands the raw setting to the optimizer, so a ratio such as 0.1 becomes "0.1 steps", which the
    optimizer turns into a 10x learning rate on the first step. Here a ratio is resolved to steps as the scheduler
    resolves it, which needs the number of training steps.
    """
    warmup = ctx.args.warmup_steps
    if warmup == 0 or warmup >= 1:
        return int(warmup)
    if ctx.num_training_steps is None:
        raise OptimizerSettingError(
            f"warmup_steps={warmup} is a ratio, and {ctx.args.optim} warms up inside the optimizer: pass "
            "num_training_steps to create_optimizer (the mixin does), or give warmup_steps as a number of steps"
        )
    return math.ceil(ctx.num_training_steps * warmup)


def _kwargs(with_adam: bool, with_warmup: bool):
    def build(ctx: BuildContext) -> dict:
        kwargs = dict(ctx.adam_kwargs) if with_adam else {}
        kwargs["weight_decay"] = ctx.args.weight_decay
        if with_warmup:
            kwargs["warmup_steps"] = optimizer_warmup_steps(ctx)
        kwargs.update(ctx.optim_args)
        return kwargs

    return build


for _name, _cls, _adam, _warmup in (
    ("schedule_free_adamw", "AdamWScheduleFree", True, True),
    ("schedule_free_radam", "RAdamScheduleFree", True, False),
    ("schedule_free_sgd", "SGDScheduleFree", False, True),
):
    register(
        OptimizerSpec(
            name=_name,
            target=f"schedulefree:{_cls}",
            family="schedule_free",
            arguments=SCHEDULE_FREE_ARGUMENTS,
            kwargs=_kwargs(_adam, _warmup),
            uses=(ADAM if _adam else frozenset()) | WEIGHT_DECAY | (WARMUP if _warmup else frozenset()),
            packages=("schedulefree",),
            has_train_eval_modes=True,
            one_kernel_per_group=True,  # (schedulefree's step: foreach over each group)
            elementwise=True,
            callbacks=("lightning_optims.callbacks.schedule_free:ScheduleFreeCallback",),
            description=f"schedulefree.{_cls}",
        )
    )
