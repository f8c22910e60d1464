"""Low-rank optimizers that project the gradients of target modules: APOLLO (apollo-torch) and GaLore."""

from __future__ import annotations

from lightning_optims.optim_args import Arg
from lightning_optims.registry import ADAM, BuildContext, OptimizerSpec, register

_PROJ_TYPES = ("std", "reverse_std", "right", "left", "full")

# transformers' defaults (trainer_optimizer._get_apollo_optimizer)
APOLLO_ARGUMENTS = (
    Arg("rank", int, 128, help="projection rank (APOLLO: 256 recommended; APOLLO-Mini: 1)"),
    Arg("proj", str, "random", choices=("random", "svd")),
    Arg(
        "scale_type",
        str,
        "channel",
        choices=("channel", "tensor"),
        help="channel-wise (APOLLO) or tensor-wise (APOLLO-Mini) gradient scaling",
    ),
    Arg("update_proj_gap", int, 200),
    Arg("scale", float, 1.0, help="APOLLO-Mini: 128"),
    # ('full': apollo_torch raises NotImplementedError at the first step; refused here before training starts)
    Arg("proj_type", str, "std", choices=_PROJ_TYPES[:-1]),
)


def _apollo_target_group(ctx: BuildContext) -> dict:
    # transformers puts betas / eps into the target group only; the other group keeps APOLLOAdamW's defaults
    return {**ctx.optim_args, **ctx.adam_kwargs}


for _name, _layerwise in (("apollo_adamw", False), ("apollo_adamw_layerwise", True)):
    register(
        OptimizerSpec(
            name=_name,
            target="lightning_optims.optimizers:APOLLOAdamW",
            family="apollo",
            arguments=APOLLO_ARGUMENTS,
            params="low_rank",
            target_group_kwargs=_apollo_target_group,
            uses=ADAM,
            packages=("apollo_torch",),
            layerwise=_layerwise,
            updates_in_backward=_layerwise,
            shards_by_blocks=True,
            callbacks=("lightning_optims.callbacks.hooks:GradientHookCleanup",) if _layerwise else (),
            description="APOLLO (apollo-torch); APOLLO-Mini with rank=1,scale_type=tensor,scale=128",
        )
    )

# transformers' defaults (trainer_optimizer._get_galore_optimizer); it passes neither betas, eps nor weight_decay
GALORE_ARGUMENTS = (
    Arg("rank", int, 128),
    Arg("update_proj_gap", int, 200),
    Arg("scale", float, 0.25),
    Arg("proj_type", str, "std", choices=_PROJ_TYPES),
)


def _galore_target_group(ctx: BuildContext) -> dict:
    return dict(ctx.optim_args)


def _galore_adafactor(ctx: BuildContext) -> dict:
    return {"scale_parameter": False, "relative_step": False}


for _name, _cls in (
    ("galore_adamw", "GaLoreAdamW"),
    ("galore_adamw_8bit", "GaLoreAdamW8bit"),
    ("galore_adafactor", "GaLoreAdafactor"),
    ("galore_adamw_layerwise", "GaLoreAdamW"),
    ("galore_adamw_8bit_layerwise", "GaLoreAdamW8bit"),
    ("galore_adafactor_layerwise", "GaLoreAdafactor"),
):
    _layerwise = _name.endswith("_layerwise")
    register(
        OptimizerSpec(
            name=_name,
            target=f"lightning_optims.optimizers:{_cls}",
            family="galore",
            arguments=GALORE_ARGUMENTS,
            params="low_rank",
            target_group_kwargs=_galore_target_group,
            # transformers adds scale_parameter / relative_step for galore_adafactor only; without them its layerwise
            # form raises "Cannot combine manual `lr` and `relative_step=True`", so here both get them
            kwargs=_galore_adafactor if "adafactor" in _name else (lambda ctx: {}),
            packages=("galore_torch", "bitsandbytes") if "8bit" in _name else ("galore_torch",),
            extra="galore",
            device="cuda" if "8bit" in _name else None,  # galore_torch's 8-bit AdamW calls CUDA kernels
            layerwise=_layerwise,
            updates_in_backward=_layerwise,
            shards_by_blocks="8bit" not in _name,  # (8-bit: CUDA-only, untested sharded)
            callbacks=("lightning_optims.callbacks.hooks:GradientHookCleanup",) if _layerwise else (),
            description=f"galore_torch.{_cls}",
        )
    )
