"""What a fit may combine with an optimizer: one small rule per refusal, checked when ``fit`` builds the optimizer.

Each rule is a pure function of a :class:`Fit` (the Trainer, the module, its spec and settings) that returns its
message, or ``None`` when the fit may go on. :data:`RULES` lists them in the order they are checked;
``docs/compatibility.md`` is rendered from that table (``python -m lightning_optims.reference rules >
docs/compatibility.md``; a test keeps the page equal to it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, cast

from lightning.pytorch.callbacks import (
    BaseFinetuning,
    GradientAccumulationScheduler,
    StochasticWeightAveraging,
)
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.distributed.fsdp import FSDPModule

from lightning_optims import compat
from lightning_optims.arguments import DEFAULT_OPTIM, OptimizerArguments
from lightning_optims.distributed.layout import SHARDED_STRATEGIES, layout, plain_data_parallel
from lightning_optims.distributed.placements import is_sharded
from lightning_optims.registry import get_spec, registered_names
from lightning_optims.spec import OptimizerSpec

__all__ = ["METRIC_SCHEDULERS", "RULES", "Fit", "Rule", "check", "spans_steps"]

#: schedulers that step on a monitored metric after validation rather than every optimizer step
METRIC_SCHEDULERS = ("reduce_lr_on_plateau", "greedy")
#: the metric those schedulers step on (transformers' Trainer uses the evaluation loss)
METRIC_SCHEDULER_MONITOR = "val_loss"


def spans_steps(lr_scheduler_type: str) -> bool:
    """Whether the schedule is laid over the training steps (needs their number, is stepped every optimizer step)."""
    return lr_scheduler_type not in ("constant", *METRIC_SCHEDULERS)


@dataclasses.dataclass(frozen=True)
class Fit:
    """What the rules read: the Trainer, the module being fitted and its settings."""

    trainer: Any
    module: Any

    @property
    def args(self) -> OptimizerArguments:
        return self.module.optimizer_arguments

    @property
    def spec(self) -> OptimizerSpec:
        return get_spec(self.args.optim)

    @property
    def strategy(self) -> Any:
        return self.trainer.strategy

    @property
    def sharded_here(self) -> bool:
        """Under ModelParallelStrategy with an optimizer that runs on FSDP2's shards."""
        return isinstance(self.strategy, ModelParallelStrategy) and self.spec.runs_sharded

    def callbacks(self, *types: type) -> list[Any]:
        return [c for c in getattr(self.trainer, "callbacks", []) if isinstance(c, types)]


@dataclasses.dataclass(frozen=True)
class Rule:
    name: str
    check: Callable[[Fit], str | None]

    @property
    def refuses(self) -> str:
        """The rule's docstring, on one line: what it refuses."""
        return " ".join((self.check.__doc__ or "").split())


RULES: list[Rule] = []


def rule(check: Callable[[Fit], str | None]) -> Callable[[Fit], str | None]:
    RULES.append(Rule(check.__name__, check))
    return check


def check(trainer: Any, module: Any) -> None:
    """Raise the first rule's message as a ``MisconfigurationException`` (called when ``fit`` builds the optimizer)."""
    fit = Fit(trainer, module)
    for r in RULES:
        message = r.check(fit)
        if message is not None:
            raise MisconfigurationException(message)


# -- clipping -------------------------------------------------------------------------------------------------------


@rule
def trainer_clipping_in_backward(fit: Fit) -> str | None:
    """`Trainer(gradient_clip_val=...)` with an optimizer that updates during backward (LOMO, AdaLomo, layer-wise):
    no gradient is left for the Trainer to clip."""
    spec, args, clip = fit.spec, fit.args, fit.trainer.gradient_clip_val
    if not (spec.updates_in_backward and clip):
        return None
    if spec.layerwise:
        advice = (
            "remove gradient_clip_val (nothing can clip a layer-wise optimizer: each parameter is "
            "stepped as soon as its gradient exists)"
        )
    elif args.max_grad_norm > 0:
        advice = (
            f"remove gradient_clip_val: max_grad_norm={args.max_grad_norm!r} already clips the global "
            "gradient norm inside the fused backward"
        )
    else:
        advice = (
            f"remove gradient_clip_val and set max_grad_norm={clip!r} (the "
            "global-norm clipping inside the fused backward)"
        )
    return (
        f"Trainer(gradient_clip_val={clip!r}) cannot clip optim={spec.name!r}: it "
        f"updates each parameter during backward and leaves no gradient for the Trainer to clip; {advice}"
    )


@rule
def two_clippings(fit: Fit) -> str | None:
    """`Trainer(gradient_clip_val=...)` together with `max_grad_norm > 0`: one clipping setting, not two."""
    clip, max_norm = fit.trainer.gradient_clip_val, fit.args.max_grad_norm
    if not (clip and max_norm > 0):
        return None
    return (
        f"Trainer(gradient_clip_val={clip!r}) and max_grad_norm={max_norm!r} "
        "both ask for gradient clipping: keep max_grad_norm (transformers' setting, global L2 norm) and drop "
        "gradient_clip_val, or set max_grad_norm=0 to let the Trainer clip"
    )


# -- callbacks ------------------------------------------------------------------------------------------------------


@rule
def accumulation_scheduler_in_backward(fit: Fit) -> str | None:
    """`GradientAccumulationScheduler` with a factor other than 1, and an optimizer that keeps no gradient."""
    if not fit.spec.updates_in_backward:
        return None
    for callback in fit.callbacks(GradientAccumulationScheduler):
        factors = {k: v for k, v in callback.scheduling.items() if v != 1}
        if factors:
            return (
                f"{type(callback).__name__}(scheduling={factors}) cannot work with optim={fit.spec.name!r}: it "
                "updates each parameter during backward and keeps no gradient to accumulate. Remove the callback "
                f"(or use an optimizer that keeps gradients, e.g. {DEFAULT_OPTIM}, to accumulate)"
            )
    return None


@rule
def finetuning_under_fsdp2(fit: Fit) -> str | None:
    """A `BaseFinetuning` callback under `ModelParallelStrategy` (measured to hang, with or without this package)."""
    if not isinstance(fit.strategy, ModelParallelStrategy):
        return None
    for callback in fit.callbacks(BaseFinetuning):
        name = type(callback).__name__
        return (
            f"{name} cannot be used under ModelParallelStrategy (FSDP2) here: freezing and unfreezing "
            "parameters that FSDP2 shards is not supported (measured: a two-process fit with "
            "BackboneFinetuning hangs in its first epoch, with torch's AdamW and without this package as "
            f"with optim={fit.spec.name!r}). Use DDP or one device for {name}, or freeze nothing under FSDP2"
        )
    return None


@rule
def weight_averaging_with_train_eval_modes(fit: Fit) -> str | None:
    """`StochasticWeightAveraging` / `WeightAveraging` with a schedule-free optimizer, which already averages."""
    if not fit.spec.has_train_eval_modes:
        return None
    averaging = [StochasticWeightAveraging, compat.FEATURES["weight_averaging"].load()]  # (None: Lightning < 2.6)
    for callback in fit.callbacks(*(c for c in averaging if c is not None)):
        return (
            f"{type(callback).__name__} cannot be combined with optim={fit.spec.name!r}: an optimizer with train / "
            "eval modes already averages its iterates (its eval-mode weights are the average), and the weights that "
            "callback averages switch between the train and eval sequences (after each validation), while the "
            "optimizer's eval() at the end would move the averaged weights again. Remove the callback, or use a "
            f"scheduled optimizer (e.g. {DEFAULT_OPTIM}) with it"
        )
    return None


# -- the loop -------------------------------------------------------------------------------------------------------


@rule
def clipping_in_manual_optimization(fit: Fit) -> str | None:
    """`max_grad_norm > 0` with `automatic_optimization=False` (Lightning does not clip there)."""
    args = fit.args
    if getattr(fit.module, "automatic_optimization", True) or args.max_grad_norm <= 0 or fit.spec.updates_in_backward:
        return None
    return (
        f"max_grad_norm={args.max_grad_norm!r} with manual optimization (automatic_optimization=False): "
        "Lightning does not clip in manual optimization, so it would silently not apply. Set "
        "max_grad_norm=0 and clip in training_step before opt.step(): "
        f"self.clip_gradients(opt, gradient_clip_val={args.max_grad_norm!r}, gradient_clip_algorithm='norm')"
    )


def _runs_validation(trainer: Any, module: Any) -> bool:
    from lightning.pytorch.utilities.model_helpers import is_overridden

    if not is_overridden("validation_step", module) or trainer.limit_val_batches == 0:
        return False
    source = getattr(getattr(trainer.fit_loop.epoch_loop, "val_loop", None), "_data_source", None)
    return source is None or source.is_defined()


@rule
def metric_scheduler_without_validation(fit: Fit) -> str | None:
    """`lr_scheduler_type` `reduce_lr_on_plateau` / `greedy` in a fit that runs no validation."""
    kind = fit.args.lr_scheduler_type
    if kind not in METRIC_SCHEDULERS or _runs_validation(fit.trainer, fit.module):
        return None
    return (
        f"lr_scheduler_type={kind!r} steps on the logged {METRIC_SCHEDULER_MONITOR!r} after "
        f"each validation, and this fit runs no validation (no validation_step, no val dataloader, or "
        "limit_val_batches=0): give it validation that logs 'val_loss', or choose a schedule over steps "
        "(linear, cosine, constant, ...)"
    )


@rule
def accumulation_in_backward(fit: Fit) -> str | None:
    """`Trainer(accumulate_grad_batches > 1)` with an optimizer that keeps no gradient."""
    accumulate = fit.trainer.accumulate_grad_batches
    if not fit.spec.updates_in_backward or accumulate == 1:
        return None
    return (
        f"optim={fit.spec.name!r} updates each parameter during backward and keeps no gradient: "
        f"Trainer(accumulate_grad_batches={accumulate}) cannot work; use 1"
    )


# -- strategies and precision ---------------------------------------------------------------------------------------


@rule
def in_backward_strategy(fit: Fit) -> str | None:
    """An optimizer that updates in gradient hooks, under a strategy that owns the gradients (FSDP1, DeepSpeed; also
    ModelParallel for one that does not run sharded)."""
    spec = fit.spec
    if not spec.updates_in_backward or plain_data_parallel(fit.strategy) or fit.sharded_here:
        return None
    where = "ModelParallelStrategy (FSDP2, fully_shard in configure_model), " if spec.runs_sharded else ""
    return (
        f"optim={spec.name!r} updates parameters in gradient hooks, which strategy "
        f"{type(fit.strategy).__name__} does not support (it flattens or owns the parameters and their "
        f"gradients): use {where}a single device or DDP ('ddp', 'ddp_spawn', 'ddp_fork')"
    )


@rule
def whole_tensor_under_sharding(fit: Fit) -> str | None:
    """A whole-tensor optimizer under a sharding strategy where it does not run on the shards."""
    spec = fit.spec
    if not isinstance(fit.strategy, SHARDED_STRATEGIES) or spec.elementwise or fit.sharded_here:
        return None
    allowed = ", ".join(n for n in registered_names() if get_spec(n).elementwise)
    sharded = ", ".join(n for n in registered_names() if get_spec(n).runs_sharded)
    return (
        f"optim={spec.name!r} is not supported under {type(fit.strategy).__name__}: it shards or flattens "
        "the parameters, and this optimizer's update depends on whole tensors (a per-tensor norm, a "
        "factorisation, a projection, a parameter's index, or a hook on each parameter), so it would "
        f"silently compute something else. Use DDP for {spec.name!r}, or an elementwise optimizer here: "
        f"{allowed}; under ModelParallelStrategy (FSDP2) also {sharded}"
    )


def _runs_on(spec: OptimizerSpec, layout_name: str) -> bool:
    """Whether ``spec``'s sharded step runs on the layout :func:`~lightning_optims.distributed.layout.layout` named:
    every layout for the elementwise optimizers and the others with a sharded step (their own sharded optimizer, the
    in-backward engine, or the sharded engine's step on each process's part: all take any placement); the layer-wise
    names on any layout with FSDP2 groups (their steps wait for each group's post-backward), not on tensor
    parallelism alone."""
    if spec.elementwise or layout_name in ("FSDP2", "HSDP"):
        return True
    if spec.layerwise:
        return spec.runs_sharded and layout_name != "tensor parallel"
    return spec.runs_sharded


@rule
def sharded_optimizer_layout(fit: Fit) -> str | None:
    """A layer-wise name on tensor parallelism without FSDP2: its steps are batched per FSDP2 group (one group's
    sums in a few all-reduces); without groups each parameter would step alone, with its own collectives. (Every
    other optimizer that runs under ModelParallelStrategy steps any layout: FSDP2, HSDP, tensor parallel, 2-D.)"""
    if not fit.sharded_here or fit.spec.elementwise:
        return None
    found = layout(fit.module)
    if found is None or _runs_on(fit.spec, found[0]):
        return None
    name, where = found
    spec = fit.spec
    allowed = ", ".join(n for n in registered_names() if _runs_on(get_spec(n), name))
    return (
        f"optim={spec.name!r} cannot run on this layout: {name} ({where}). A layer-wise optimizer under "
        "ModelParallelStrategy steps each FSDP2 group's parameters together once the group's gradients are "
        "reduced (fully_shard on a 1-D mesh, HSDP, or tensor parallel with FSDP2); with tensor parallelism alone "
        "there is no group, and each parameter would step alone with its own collectives. Add fully_shard "
        f"(2-D) for {spec.name!r}, or with {name} alone use one of: {allowed}"
    )


@rule
def settings_without_a_sharded_step(fit: Fit) -> str | None:
    """`optim_args` for which the optimizer's sharded step has no step on a process's part, under
    ModelParallelStrategy (the family says which: GaLore's `proj_type='full'`, a projection on both sides of each
    matrix); no whole tensor is gathered instead."""
    if not fit.sharded_here or fit.spec.sharding is None:
        return None
    found = layout(fit.module)
    unsupported = fit.spec.sharding.unsupported(dict(fit.args.parsed_optim_args))
    if unsupported is None or found is None:
        return None
    name, where = found
    return (
        f"optim={fit.spec.name!r} with optim_args {unsupported.setting} cannot run on this layout: {name} ({where}). "
        f"Under ModelParallelStrategy each process steps its part of each parameter; {unsupported.why}, which has no "
        f"such step. {unsupported.instead} here, or {unsupported.setting} on one device or under DDP"
    )


@rule
def plain_and_distributed_tensors_in_one_kernel(fit: Fit) -> str | None:
    """Trainable parameters that mix `DTensor` s and plain tensors (tensor parallelism that leaves some layers
    unparallelised), with an optimizer whose step runs one fused / foreach kernel per param group (fused AdamW,
    schedule-free): torch refuses the mix at the first step."""
    from torch.distributed.tensor import DTensor

    if not fit.spec.one_kernel_per_group:
        return None
    params = [(n, p) for n, p in fit.module.optimized_module().named_parameters() if p.requires_grad]
    plain = [n for n, p in params if not isinstance(p, DTensor)]
    if not plain or len(plain) == len(params):
        return None
    distributed = next(n for n, p in params if isinstance(p, DTensor))
    others = [n for n in registered_names() if get_spec(n).elementwise and not get_spec(n).one_kernel_per_group]
    return (
        f"optim={fit.spec.name!r} steps each param group with one fused / foreach kernel, and this model mixes "
        f"DTensors ({distributed!r}, ...) with {len(plain)} plain tensors ({plain[0]!r}, ...) that tensor "
        "parallelism left unparallelised: torch refuses the mix at the first step. Parallelise (or fully_shard) "
        f"every module, or use an optimizer that steps each tensor on its own: {', '.join(others)}"
    )


@rule
def grad_scaler_in_backward(fit: Fit) -> str | None:
    """A GradScaler (`precision='16-mixed'` on a GPU) with an optimizer that keeps no gradient to check."""
    if not fit.spec.updates_in_backward or getattr(fit.trainer.precision_plugin, "scaler", None) is None:
        return None
    return (
        f"precision={fit.trainer.precision!r} (a GradScaler) cannot drive optim={fit.spec.name!r}: the scaler checks "
        "gradients after backward and none is left. Use precision='bf16-mixed', or '16-true' (fp16 weights; "
        "where an optimizer with a loss scale of its own applies it)"
    )


@rule
def layerwise_under_ddp(fit: Fit) -> str | None:
    """A layer-wise optimizer with more than one process outside FSDP2 (DDP averages after the hook stepped)."""
    spec, trainer = fit.spec, fit.trainer
    if not spec.layerwise or trainer.world_size <= 1 or fit.sharded_here:
        return None
    return (
        f"optim={spec.name!r} steps each parameter inside backward, before DDP averages its gradient "
        f"(transformers refuses it under DDP too): strategy {type(fit.strategy).__name__} with "
        f"{trainer.world_size} processes is not supported; use the non-layerwise optimizer, or "
        "ModelParallelStrategy (FSDP2: each gradient is reduced before its parameter's hook steps it)"
    )


@rule
def steps_unknown(fit: Fit) -> str | None:
    """A schedule over steps when the Trainer cannot estimate the number of training steps."""
    kind = fit.args.lr_scheduler_type
    if not spans_steps(kind) or math.isfinite(fit.trainer.estimated_stepping_batches):
        return None
    return (
        f"lr_scheduler_type={kind!r} needs the number of training steps, and the "
        "Trainer cannot estimate it (an iterable dataset without a length?): set Trainer(max_steps=...)"
    )


@rule
def model_parallel_without_sharding(fit: Fit) -> str | None:
    """`ModelParallelStrategy` with several processes and no sharded parameter (nothing would average gradients)."""
    trainer, module = fit.trainer, fit.module
    if not isinstance(fit.strategy, ModelParallelStrategy) or trainer.world_size <= 1:
        return None
    if is_sharded([p for p in module.optimized_module().parameters() if p.requires_grad]):
        return None
    return (
        f"ModelParallelStrategy with {trainer.world_size} processes, and no parameter of "
        f"{type(module).__name__} is sharded: configure_model must call fully_shard (FSDP2) on the model "
        "(or parallelize it), otherwise no gradient is averaged across processes and each trains its own copy"
    )


@rule
def fsdp2_on_gloo_before_torch_2_13(fit: Fit) -> str | None:
    """FSDP2 (`fully_shard`) on the CPU with a torch that cannot average its gradients over gloo (< 2.13)."""
    needs = compat.missing("fsdp2_on_gloo")
    if needs is None or not isinstance(fit.strategy, ModelParallelStrategy):
        return None
    sharded = [m for m in fit.module.modules() if isinstance(m, FSDPModule)]
    if not any(p.device.type == "cpu" for m in sharded for p in cast(nn.Module, m).parameters()):
        return None
    return (
        f"ModelParallelStrategy on the CPU with fully_shard: {needs}. torch's own FSDP2 fails on gloo in 2.6 "
        "('Stream' object has no attribute 'record_event') and in 2.7 sums the gradients of the processes instead of "
        "averaging them (HSDP: 'Cannot use ReduceOp.AVG with Gloo'); 2.8 to 2.12 were not verified. Train on CUDA "
        "(NCCL), or upgrade torch"
    )
