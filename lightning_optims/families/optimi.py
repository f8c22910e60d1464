"""StableAdamW (torch-optimi)."""

from __future__ import annotations

from typing import Any

from lightning_optims.optim_args import Arg
from lightning_optims.registry import ADAM, WEIGHT_DECAY, BuildContext, OptimizerSpec, register


def _stable_adamw(ctx: BuildContext) -> dict:
    # transformers: weight_decay at optimizer level (the decay groups override it), then the three optim_args
    return {**ctx.adam_kwargs, "weight_decay": ctx.args.weight_decay, **ctx.optim_args}


def _no_triton_off_the_gpu(optimizer: Any, ctx: BuildContext | None) -> None:
    """optimi (0.3.0 to 0.3.3) decides a group's ``triton=None`` at its first step from the list of its parameters it
    has not filled yet: ``all()`` of nothing is true, so it picks its Triton kernels whenever triton is importable,
    also for CPU tensors, and on a machine with triton but no GPU (a CUDA build of torch) every step fails ("0 active
    drivers"). Before a group's first step, a group with a parameter off the GPU gets ``triton=False`` (optimi's own
    rule: Triton only where every parameter is on a CUDA / XPU device); on a GPU optimi decides as before."""

    def before(opt: Any, args: Any, kwargs: Any) -> None:
        for group in opt.param_groups:
            if group.get("setup") or group.get("triton") is not None or group.get("foreach") is not None:
                continue
            if any(not (p.is_cuda or getattr(p, "is_xpu", False)) for p in group["params"]):
                group["triton"] = False

    optimizer.register_step_pre_hook(before)


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
        post_build=_no_triton_off_the_gpu,
        description="optimi.StableAdamW",
    )
)
