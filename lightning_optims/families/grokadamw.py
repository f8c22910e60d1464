"""GrokAdamW (grokadamw package)."""

from __future__ import annotations

from lightning_optims.optim_args import Arg
from lightning_optims.registry import WEIGHT_DECAY, BuildContext, OptimizerSpec, register

# transformers' defaults (trainer_optimizer._get_grokadamw); transformers passes neither betas nor eps
GROKADAMW_ARGUMENTS = (
    Arg("alpha_init", float, 0.98),
    Arg("lamb", float, 2.0),
    Arg("gamma", float, 0.1),
    Arg("grokking_signal_decay_rate", float, 0.1),
    Arg("gradient_clipping", float, 1.0),
)


def _grokadamw(ctx: BuildContext) -> dict:
    return dict(ctx.optim_args)


register(
    OptimizerSpec(
        name="grokadamw",
        target="lightning_optims.optimizers:GrokAdamW",
        family="grokadamw",
        arguments=GROKADAMW_ARGUMENTS,
        kwargs=_grokadamw,
        uses=WEIGHT_DECAY,
        packages=("grokadamw",),
        sharded_target="lightning_optims.optimizers:ShardedGrokAdamW",
        callbacks=("lightning_optims.callbacks.grokking:GrokkingSignalCallback",),
        description="GrokAdamW (grokadamw's update, state in optimizer.state)",
    )
)
