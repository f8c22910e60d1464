"""Low-bit AdamW (torchao)."""

from __future__ import annotations

from lightning_optims.optim_args import Arg
from lightning_optims.spec import ADAM, WEIGHT_DECAY, BuildContext, OptimizerSpec

SPECS: list[OptimizerSpec] = []


def _torchao(ctx: BuildContext) -> dict:
    return {**ctx.optim_args, **ctx.adam_kwargs}


for _name, _cls in (("adamw_torch_4bit", "AdamW4bit"), ("adamw_torch_8bit", "AdamW8bit")):
    SPECS.append(
        OptimizerSpec(
            name=_name,
            target=f"torchao.optim:{_cls}",
            family="torchao",
            arguments=(Arg("block_size", int, 256), Arg("bf16_stochastic_round", bool, False)),
            kwargs=_torchao,
            uses=ADAM | WEIGHT_DECAY,
            packages=("torchao",),
            extra="torchao",
            description=f"torchao.optim.{_cls}",
        )
    )
