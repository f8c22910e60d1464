"""The optimizer registry: one frozen :class:`OptimizerSpec` per ``optim`` name.

Everything below the registry asks a spec's flags (``updates_in_backward``, ``has_train_eval_modes``,
``needs_target_modules``, ...), never an optimizer's name. Adding an optimizer is one :func:`register` call in a
module of :mod:`lightning_optims.families`.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from lightning_optims.compat import FEATURES
from lightning_optims.optim_args import Arg, OptimizerSettingError, closest

if TYPE_CHECKING:
    from torch import nn

    from lightning_optims.arguments import OptimizerArguments

__all__ = [
    "BuildContext",
    "OptimizerAvailability",
    "OptimizerSpec",
    "available_optimizers",
    "get_spec",
    "register",
    "registered_names",
]

# The general TrainingArguments fields an optimizer may or may not read (transformers' handlers decide).
ADAM = frozenset({"adam_beta1", "adam_beta2", "adam_epsilon"})
WEIGHT_DECAY = frozenset({"weight_decay"})


@dataclass
class BuildContext:
    """What a spec's ``kwargs`` function sees when the optimizer is built."""

    args: OptimizerArguments
    optim_args: dict[str, Any]
    model: nn.Module
    num_training_steps: int | None = None

    @property
    def adam_kwargs(self) -> dict[str, Any]:
        return {"betas": (self.args.adam_beta1, self.args.adam_beta2), "eps": self.args.adam_epsilon}


def _no_kwargs(ctx: BuildContext) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class OptimizerSpec:
    """Everything the package knows about one ``optim`` name.

    Attributes:
        name: the ``optim`` value, as in transformers' ``OptimizerNames``.
        target: ``"module:attribute"`` of the optimizer class, imported only when it is built.
        family: a label for docs and tables (``torch``, ``apollo``, ``schedule_free``, ...).
        arguments: the accepted ``optim_args`` keys, with transformers' defaults.
        kwargs: optimizer keyword arguments (besides ``lr``) from the settings, as transformers' handler builds them.
        target_group_kwargs: for low-rank optimizers, the keyword arguments of the target-module group.
        params: how parameters are handed over: ``decay_groups`` (transformers' decay / no-decay groups),
            ``low_rank`` (``[non-target, target + target_group_kwargs]``) or ``model`` (LOMO takes the model).
        uses: the general settings (``adam_beta1`` ... ``weight_decay``) that reach this optimizer in transformers;
            a non-default value of any other one is refused instead of being silently dropped.
        packages: import names that must be importable.
        extra: the pip extra of this package that installs them (``None``: a required dependency).
        device: ``"cuda"`` when it needs a CUDA device.
        has_train_eval_modes: the optimizer has ``train()`` / ``eval()`` (schedule-free).
        updates_in_backward: parameters are updated inside backward and no gradient survives it (LOMO, layerwise).
        layerwise: one inner optimizer per parameter, stepped by a post-accumulate-grad hook.
        elementwise: the update of each element depends on that element alone (no per-tensor norm, factorisation,
            projection or index), so it is the same on a shard or a flattened parameter: such an optimizer may run
            under FSDP, DeepSpeed and ModelParallel; the others are refused there.
        shards_in_backward: its in-backward update runs on FSDP2's dim-0 shards, in the hooks FSDP2 runs after its
            reduce-scatter, completing every whole-tensor statistic (global norm, row / column means, RMS) with
            collectives: it may run under ModelParallelStrategy with the numbers of one device.
        shards_by_blocks: its update reads whole rows, columns or tensors (a projection, factored moments), and
            under ModelParallelStrategy it runs through :class:`~lightning_optims.sharded.ShardedStepOptimizer` (the
            family's block step on each process's part, its sums completed over the processes, the state sharded like
            the parameter), with the numbers of one device; a layer-wise one through
            :class:`~lightning_optims.sharded.ShardedLayerwiseOptimizer` (the same step, by FSDP2 group).
        sharded_target: ``"module:Class"`` of the optimizer that steps this one's update on each process's part of
            ``DTensor`` parameters in any layout (FSDP2, HSDP, tensor parallel, 2-D; plain tensors among them), same
            arguments and state keys as ``target``, its statistics completed with
            :mod:`~lightning_optims.placements`: under ModelParallelStrategy it replaces ``target``, with the numbers
            of one device and no gather.
        one_kernel_per_group: its step runs one foreach / fused kernel over each param group, which cannot take
            ``DTensor`` s and plain tensors together (tensor parallelism that leaves some parameters plain tensors):
            such a mix is refused when ``fit`` starts.
        check_targets: for low-rank optimizers, called with the target group's keyword arguments and the
            ``(name, shape)`` of each target matrix when the optimizer is built (when ``fit`` starts): a message where
            upstream's step cannot take these options on one of them (a shape error at its first step), else ``None``;
            the message is raised as an :class:`~lightning_optims.optim_args.OptimizerSettingError`.
        post_build: called with the new optimizer, for set-up transformers does after construction.
        callbacks: ``"module:Class"`` of the Lightning callbacks this optimizer needs at run time (the mixin adds
            each one unless the Trainer already has one of that class).
    """

    name: str
    target: str
    family: str
    arguments: tuple[Arg, ...] = ()
    # a key of lightning_optims.compat.FEATURES that optim_args need (refused with the versions where it is missing)
    optim_args_need: str | None = None
    kwargs: Callable[[BuildContext], dict[str, Any]] = _no_kwargs
    target_group_kwargs: Callable[[BuildContext], dict[str, Any]] | None = None
    params: Literal["decay_groups", "low_rank", "model"] = "decay_groups"
    uses: frozenset[str] = field(default_factory=frozenset)
    packages: tuple[str, ...] = ()
    extra: str | None = None
    device: Literal["cuda"] | None = None
    has_train_eval_modes: bool = False
    updates_in_backward: bool = False
    layerwise: bool = False
    elementwise: bool = False
    shards_in_backward: bool = False
    shards_by_blocks: bool = False
    sharded_target: str | None = None
    one_kernel_per_group: bool = False
    check_targets: Callable[[dict[str, Any], list[tuple[str, tuple[int, ...]]]], str | None] | None = None
    post_build: Callable[[Any, BuildContext], None] | None = None
    callbacks: tuple[str, ...] = ()
    description: str = ""

    @property
    def runs_sharded(self) -> bool:
        """It runs under ModelParallelStrategy (FSDP2) with the numbers of one device (besides elementwise ones)."""
        return self.shards_in_backward or self.shards_by_blocks or self.sharded_target is not None

    @property
    def needs_target_modules(self) -> bool:
        return self.params == "low_rank"

    @property
    def needs_model(self) -> bool:
        return self.params == "model"

    def unavailable_reason(self) -> str | None:
        """Why this optimizer cannot be built here, or ``None`` if it can."""
        for package in self.packages:
            if importlib.util.find_spec(package) is None:
                how = f'pip install "lightning_optims[{self.extra}]"' if self.extra else "pip install lightning_optims"
                return f"optim={self.name!r} needs the Python package {package!r}, which is not installed: run {how}"
        if self.device == "cuda" and not torch.cuda.is_available():
            return f"optim={self.name!r} needs a CUDA device, and none is available here"
        return None

    def check_available(self) -> None:
        reason = self.unavailable_reason()
        if reason is not None:
            if self.device == "cuda" and "CUDA" in reason:
                raise RuntimeError(reason)
            raise ImportError(reason)

    def load_class(self) -> Any:
        self.check_available()
        return _load(self.target)

    def callback_classes(self) -> list[type]:
        return [_load(target) for target in self.callbacks]


def _load(target: str) -> Any:
    module_name, _, attribute = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        obj = getattr(obj, part)
    return obj


_REGISTRY: dict[str, OptimizerSpec] = {}


def register(spec: OptimizerSpec) -> OptimizerSpec:
    """Add ``spec`` to the registry (its name must be new)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"optimizer {spec.name!r} is already registered")
    if spec.needs_target_modules and spec.target_group_kwargs is None:
        raise ValueError(f"low-rank optimizer {spec.name!r} needs target_group_kwargs")
    _REGISTRY[spec.name] = spec
    return spec


def _ensure_loaded() -> None:
    # the family modules register their specs on import
    import lightning_optims.families  # noqa: F401


def registered_names() -> list[str]:
    _ensure_loaded()
    return sorted(_REGISTRY)


def get_spec(name: str) -> OptimizerSpec:
    """The spec registered as ``name``; an unknown name lists the closest ones."""
    _ensure_loaded()
    key = getattr(name, "value", name)  # accept transformers' OptimizerNames members
    if not isinstance(key, str) or key not in _REGISTRY:
        hint = closest(str(key), list(_REGISTRY)) if isinstance(key, str) else ""
        raise OptimizerSettingError(
            f"optim={key!r} is not a known optimizer{hint} (accepted: {', '.join(sorted(_REGISTRY))})"
        )
    return _REGISTRY[key]


@dataclass(frozen=True)
class OptimizerAvailability:
    name: str
    family: str
    usable: bool
    reason: str | None
    extra: str | None
    needs: str | None = None  # what it needs beyond the package's floors (torch 2.6, Lightning 2.5, transformers 5.0)


def available_optimizers() -> list[OptimizerAvailability]:
    """Every registered name, whether it is usable here (package installed, device present), and what it needs
    beyond the floors."""
    _ensure_loaded()
    rows = []
    for name in sorted(_REGISTRY):
        spec = _REGISTRY[name]
        reason = spec.unavailable_reason()
        needs = None
        if spec.optim_args_need is not None:
            feature = FEATURES[spec.optim_args_need]
            needs = f"optim_args: {feature.package} >= {feature.version}"
        rows.append(OptimizerAvailability(name, spec.family, reason is None, reason, spec.extra, needs))
    return rows
