"""torch.optim's optimizers (AdamW, fused AdamW, SGD, Adagrad, RMSprop), as transformers' handlers build them; each
updates element by element, so it runs on shards and flattened parameters as it is."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from lightning_optims.optim_args import Arg
from lightning_optims.spec import ADAM, ELEMENTWISE, WEIGHT_DECAY, BuildContext, OptimizerSpec, Sharding

SPECS: list[OptimizerSpec] = []


def _adamw(ctx: BuildContext) -> dict:
    return ctx.adam_kwargs


def _adamw_fused(ctx: BuildContext) -> dict:
    return {**ctx.adam_kwargs, "fused": True}


def _from_optim_args(ctx: BuildContext) -> dict:
    return dict(ctx.optim_args)


def _adagrad_state_for_added_groups(optimizer: Any, ctx: BuildContext) -> None:
    """torch's Adagrad up to 2.11 fills its state (``sum``, ``step``) in ``__init__`` only, so a group added during
    training (Lightning's ``BaseFinetuning`` unfreezing a backbone) fails at its first step (``KeyError: 'sum'``;
    later releases fill it at the first step). A group added later gets the state torch's own ``__init__`` gives its
    parameters with its options, where torch left it empty: the same numbers the later releases start from."""
    add = optimizer.add_param_group
    accepted = set(inspect.signature(torch.optim.Adagrad).parameters) - {"params"}

    def add_param_group(param_group: dict[str, Any]) -> None:
        add(param_group)
        group = optimizer.param_groups[-1]
        empty = [p for p in group["params"] if not optimizer.state.get(p)]
        if empty:
            fresh = torch.optim.Adagrad(empty, **{k: v for k, v in group.items() if k in accepted})
            for p in empty:
                optimizer.state[p] = fresh.state[p]

    optimizer.add_param_group = add_param_group


SPECS.append(
    OptimizerSpec(
        name="adamw_torch",
        target="torch.optim:AdamW",
        family="torch",
        sharding=ELEMENTWISE,
        kwargs=_adamw,
        uses=ADAM | WEIGHT_DECAY,
        description="torch.optim.AdamW",
    )
)
SPECS.append(
    OptimizerSpec(
        name="adamw_torch_fused",
        target="torch.optim:AdamW",
        family="torch",
        sharding=Sharding("elementwise", one_kernel_per_group=True),
        kwargs=_adamw_fused,
        uses=ADAM | WEIGHT_DECAY,
        description="torch.optim.AdamW(fused=True); transformers' default on torch >= 2.8",
    )
)
# transformers also reads `weight_decay` from optim_args for these three, but its decay / no-decay groups override
# it, so it never takes effect there: it is not accepted here (use the weight_decay setting).
SPECS.append(
    OptimizerSpec(
        name="sgd",
        optim_args_need="torch_optim_args",
        target="torch.optim:SGD",
        family="torch",
        sharding=ELEMENTWISE,
        kwargs=_from_optim_args,
        uses=WEIGHT_DECAY,
        arguments=(Arg("momentum", float, 0.0), Arg("dampening", float, 0.0), Arg("nesterov", bool, False)),
        description="torch.optim.SGD",
    )
)
SPECS.append(
    OptimizerSpec(
        name="adagrad",
        optim_args_need="torch_optim_args",
        target="torch.optim:Adagrad",
        post_build=_adagrad_state_for_added_groups,
        family="torch",
        sharding=ELEMENTWISE,
        kwargs=_from_optim_args,
        uses=WEIGHT_DECAY,
        arguments=(Arg("lr_decay", float, 0.0), Arg("eps", float, 1e-10)),
        description="torch.optim.Adagrad",
    )
)
SPECS.append(
    OptimizerSpec(
        name="rmsprop",
        optim_args_need="torch_optim_args",
        target="torch.optim:RMSprop",
        family="torch",
        sharding=ELEMENTWISE,
        kwargs=_from_optim_args,
        uses=WEIGHT_DECAY,
        arguments=(
            Arg("momentum", float, 0.0),
            Arg("alpha", float, 0.99),
            Arg("eps", float, 1e-8),
            Arg("centered", bool, False),
        ),
        description="torch.optim.RMSprop",
    )
)
