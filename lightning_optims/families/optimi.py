"""StableAdamW (torch-optimi)."""

from __future__ import annotations

from lightning_optims.optim_args import Arg
from lightning_optims.registry import ADAM, WEIGHT_DECAY, BuildContext, OptimizerSpec, register


def _stable_adamw(ctx: BuildContext) -> dict:
    # transformers: weight_decay at optimizer level (the decay groups override it), then the three optim_args
    return {**ctx.adam_kwargs, "weight_decay": ctx.args.weight_decay, **ctx.optim_args}


register(
    OptimizerSpec(
        name="stable_adamw",
        target="optimi:StableAdamW",
        family="optimi",
        # transformers casts kahan_sum / decouple_lr with bool(), so "False" meant True there; here it means False
        arguments=(Arg("decouple_lr", bool, False), Arg("max_lr", float, None), Arg("kahan_sum", bool, None)),
        kwargs=_stable_adamw,
        uses=ADAM | WEIGHT_DECAY,
        packages=("optimi",),
        extra="optimi",
        sharded_target="lightning_optims.families.stable_adamw:ShardedStableAdamW",
        description="optimi.StableAdamW",
    )
)
