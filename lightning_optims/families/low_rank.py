"""Low-rank optimizers that project the gradients of target modules: APOLLO (apollo-torch) and GaLore."""

from __future__ import annotations

from typing import Any

from lightning_optims.optim_args import Arg
from lightning_optims.registry import ADAM, BuildContext, OptimizerSpec, register

#: the projections on one side of a matrix (a sharded block step exists for each); "full" projects both
ONE_SIDED = ("std", "reverse_std", "right", "left")
_PROJ_TYPES = (*ONE_SIDED, "full")

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
    Arg("proj_type", str, "std", choices=ONE_SIDED),
)


def projects_right(proj_type: str, m: int, n: int) -> bool:
    """Whether the projector (galore_torch's and apollo_torch's, same rule) projects ``[m, n]`` on the right
    (``G @ P.T``): ``std`` projects the smaller dimension (right when ``m >= n``), ``reverse_std`` the larger,
    ``right`` and ``left`` always that side."""
    return {"std": m >= n, "reverse_std": m < n, "right": True, "left": False}[proj_type]


def _apollo_channel_ratio(options: dict[str, Any], targets: list[tuple[str, tuple[int, ...]]]) -> str | None:
    """APOLLO's channel-wise ratio (``apollo_torch.APOLLOAdamW.step``) is the norms of the normalised and the projected
    gradient along ``norm_dim``, chosen by the shape as for ``proj_type='std'`` (1 when ``m >= n``): where the
    projection is on the other side, that dimension is the rank's, and the ``rank`` numbers scale the gradient's
    rows or columns, a shape error at the first step unless there is 1 of them or that dimension's size (``proj=svd``:
    at most ``min(m, n)``, the SVD's vectors)."""
    if options.get("scale_type", "channel") != "channel":
        return None
    rank, proj_type = options.get("rank", 128), options.get("proj_type", "std")
    for name, (m, n) in targets:
        if projects_right(proj_type, m, n) == projects_right("std", m, n):  # (std's side: the ratio follows it)
            continue
        size, what = (m, "rows") if m >= n else (n, "columns")
        ratio = min(rank, m, n) if options.get("proj") == "svd" else rank  # (an SVD has at most min(m, n) vectors)
        if ratio not in (1, size):
            return (
                f"optim_args scale_type='channel' with proj_type={proj_type!r} and rank={rank} cannot step "
                f"{name!r} {[m, n]}: its projection is on the other side than proj_type='std' takes, where APOLLO's "
                f"channel-wise ratio has {ratio} numbers for the matrix's {size} {what}, and apollo_torch fails with "
                "a shape error at the first step. Use proj_type='std', scale_type='tensor' or rank=1"
            )
    return None


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
            check_targets=_apollo_channel_ratio,
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


def _galore_projection_back(options: dict[str, Any], targets: list[tuple[str, tuple[int, ...]]]) -> str | None:
    """galore_torch's ``project_back`` for ``proj_type='reverse_std'`` picks its side from the projected gradient's
    shape: a wide matrix (``m < n``, projected on the right onto ``min(rank, m)`` columns) with ``rank >= m`` comes
    back square and is multiplied on the wrong side, a shape error at the first step."""
    rank = options.get("rank", 128)
    if options.get("proj_type", "std") != "reverse_std":
        return None
    for name, (m, n) in targets:
        if m < n and rank >= m:
            return (
                f"optim_args proj_type='reverse_std' with rank={rank} cannot step {name!r} {[m, n]}: galore_torch "
                f"projects it onto {m} columns and projects them back on the wrong side (a shape error at the first "
                f"step). Use a rank below {m}, or another proj_type"
            )
    return None


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
            check_targets=_galore_projection_back,
            callbacks=("lightning_optims.callbacks.hooks:GradientHookCleanup",) if _layerwise else (),
            description=f"galore_torch.{_cls}",
        )
    )
