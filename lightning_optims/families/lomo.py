"""LOMO and AdaLomo: parameters updated inside the backward pass, by this package's engine (in_backward.py).

transformers builds ``lomo_optim.Lomo`` / ``AdaLomo`` from the model and the learning rate only. Here the same update
rules run in :mod:`lightning_optims.in_backward`; ``max_grad_norm`` becomes LOMO's two-pass global-norm clipping
(in transformers' Trainer it clips after the update, when no gradient is left, i.e. never), and the optimizers'
own options are ``optim_args`` keys (defaults: lomo_optim's).
"""

from __future__ import annotations

from lightning_optims.optim_args import Arg, OptimizerSettingError
from lightning_optims.registry import BuildContext, OptimizerSpec, register

_COMMON = (
    Arg("weight_decay", float, 0.0, help="decoupled weight decay, applied to every parameter (as lomo_optim)"),
    Arg("clip_grad_value", float, None, help="clamp each gradient element to [-v, v]"),
    Arg("bucket_mb", float, 8.0, help="gradients are applied and freed in buckets of this size; 0: one by one"),
)
_LOMO = (
    Arg("init_loss_scale", float, 2.0**32, help="fp16 (16-true) only: the first dynamic loss scale (lomo_optim's)"),
    Arg(
        "scale_window",
        int,
        1000,
        help="fp16 (16-true) only: the loss scale doubles after this many steps without overflow",
    ),
)
_ADALOMO = (
    Arg("loss_scale", float, 2.0**10, help="the loss is multiplied by this, the gradients divided by it"),
    Arg("clip_threshold", float, 1.0),
    Arg("decay_rate", float, -0.8),
    Arg("eps_sq", float, 1e-30, help="added to squared gradients (lomo_optim eps[0])"),
    Arg("eps_scale", float, 1e-3, help="lower bound of the parameter-RMS lr scale (lomo_optim eps[1])"),
)


def _kwargs(ctx: BuildContext) -> dict:
    kwargs = dict(ctx.optim_args)
    if "eps_sq" in kwargs:
        kwargs["eps"] = (kwargs.pop("eps_sq"), kwargs.pop("eps_scale"))
    bucket_mb = kwargs.pop("bucket_mb")
    if bucket_mb < 0:
        raise OptimizerSettingError(f"optim_args: bucket_mb={bucket_mb!r} for {ctx.args.optim}: expected a number >= 0")
    kwargs["bucket_bytes"] = int(bucket_mb * 2**20)
    if kwargs.get("scale_window", 1) < 1:
        raise OptimizerSettingError(
            f"optim_args: scale_window={kwargs['scale_window']!r} for {ctx.args.optim}: expected an integer >= 1"
        )
    kwargs["clip_grad_norm"] = ctx.args.max_grad_norm if ctx.args.max_grad_norm > 0 else None
    return kwargs


for _name, _cls, _arguments in (("lomo", "Lomo", _COMMON + _LOMO), ("adalomo", "AdaLomo", _COMMON + _ADALOMO)):
    register(
        OptimizerSpec(
            name=_name,
            target=f"lightning_optims.in_backward:{_cls}",
            family="lomo",
            params="model",
            arguments=_arguments,
            kwargs=_kwargs,
            updates_in_backward=True,
            shards_in_backward=True,
            callbacks=("lightning_optims.callbacks.hooks:GradientHookCleanup",),
            description=f"{_cls} (fused backward; lomo_optim's update rule)",
        )
    )
