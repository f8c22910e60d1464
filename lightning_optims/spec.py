"""What the package knows about one ``optim`` name: :class:`OptimizerSpec`, and :class:`Sharding`, how it runs on
sharded parameters. A family module builds its specs from these; the registry (:mod:`lightning_optims.registry`)
collects them. Nothing below the registry asks an optimizer's name: it asks the spec.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from lightning_optims.optim_args import Arg
from lightning_optims.warn import quiet_upstream_noise

if TYPE_CHECKING:
    from torch import nn

    from lightning_optims.arguments import OptimizerArguments
    from lightning_optims.engines.sharded import PartStep, Unsupported

__all__ = ["ADAM", "ELEMENTWISE", "WEIGHT_DECAY", "BuildContext", "OptimizerSpec", "Sharding", "load"]


@dataclass(frozen=True)
class Sharding:
    """How an optimizer runs on sharded parameters (FSDP2, HSDP, tensor parallel, 2-D): the one object the build,
    the engines and the rules ask.

    Attributes:
        how: ``elementwise``: each element's update depends on that element alone, so the optimizer runs on shards and
            flattened parameters as it is (also under FSDP1 and DeepSpeed); ``optimizer``: a sharded optimizer of the
            family's own (:attr:`optimizer`) replaces it under ModelParallelStrategy; ``parts``: the sharded engines
            step each parameter on this process's part with the family's :attr:`part_step`; ``in_backward``: an
            in-backward optimizer whose updates run on each process's part in FSDP2's hooks, completing its sums over
            the placements.
        optimizer: ``"module:Class"`` of that optimizer (same arguments and state keys as the spec's ``target``).
        part_step: the family's :class:`~lightning_optims.engines.sharded.PartStep`.
        one_kernel_per_group: its step runs one foreach / fused kernel over each param group, which cannot take
            ``DTensor`` s and plain tensors together (tensor parallelism that leaves some parameters plain tensors):
            such a mix is refused when ``fit`` starts.
    """

    how: Literal["elementwise", "optimizer", "parts", "in_backward"]
    optimizer: str | None = None
    part_step: PartStep | None = None
    one_kernel_per_group: bool = False

    def __post_init__(self) -> None:
        if (self.how == "optimizer") != (self.optimizer is not None):
            raise ValueError("Sharding: how='optimizer' and only it names an optimizer")
        if (self.how == "parts") != (self.part_step is not None):
            raise ValueError("Sharding: how='parts' and only it has a part_step")

    def unsupported(self, options: dict[str, Any]) -> Unsupported | None:
        """Why these ``optim_args`` (or a group's options) have no sharded step, else ``None``."""
        return self.part_step.unsupported(options) if self.part_step is not None else None


ELEMENTWISE = Sharding("elementwise")

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
            ``low_rank`` (``[non-target, target + target_group_kwargs]``), ``decay_and_targets`` (the decay / no-decay
            groups of the non-target parameters, then ``target + target_group_kwargs``) or ``model`` (LOMO takes the
            model).
        uses: the general settings (``adam_beta1`` ... ``weight_decay``) that reach this optimizer in transformers;
            a non-default value of any other one is refused instead of being silently dropped.
        packages: import names that must be importable.
        extra: the pip extra of this package that installs them (``None``: a required dependency).
        device: ``"cuda"`` when it needs a CUDA device.
        has_train_eval_modes: the optimizer has ``train()`` / ``eval()`` (schedule-free).
        updates_in_backward: parameters are updated inside backward and no gradient survives it (LOMO, layerwise).
        layerwise: one inner optimizer per parameter, stepped by a post-accumulate-grad hook.
        sharding: how it runs on sharded parameters (a :class:`Sharding`), ``None``: it does not (refused under
            FSDP, DeepSpeed and ModelParallelStrategy).
        check_targets: for low-rank optimizers, called with the target group's keyword arguments and the
            ``(name, shape)`` of each target matrix when the optimizer is built (when ``fit`` starts): a message where
            upstream's step cannot take these options on one of them (a shape error at its first step), else ``None``;
            the message is raised as an :class:`~lightning_optims.optim_args.OptimizerSettingError`.
        refine_targets: called with the model and the names of the parameters ``optim_target_modules`` selected;
            returns those the optimizer takes (a warning names any it leaves to the other groups).
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
    params: Literal["decay_groups", "low_rank", "decay_and_targets", "model"] = "decay_groups"
    uses: frozenset[str] = field(default_factory=frozenset)
    packages: tuple[str, ...] = ()
    extra: str | None = None
    device: Literal["cuda"] | None = None
    has_train_eval_modes: bool = False
    updates_in_backward: bool = False
    layerwise: bool = False
    sharding: Sharding | None = None
    check_targets: Callable[[dict[str, Any], list[tuple[str, tuple[int, ...]]]], str | None] | None = None
    refine_targets: Callable[[nn.Module, list[str]], list[str]] | None = None
    post_build: Callable[[Any, BuildContext], None] | None = None
    callbacks: tuple[str, ...] = ()
    description: str = ""

    @property
    def elementwise(self) -> bool:
        """Each element's update depends on that element alone: it runs on shards and flattened parameters as it is."""
        return self.sharding is not None and self.sharding.how == "elementwise"

    @property
    def one_kernel_per_group(self) -> bool:
        """Its step runs one foreach / fused kernel over each param group (see :class:`Sharding`)."""
        return self.sharding is not None and self.sharding.one_kernel_per_group

    @property
    def runs_sharded(self) -> bool:
        """It runs under ModelParallelStrategy (FSDP2) with the numbers of one device through a sharded step of its
        own (besides the elementwise ones, which need none)."""
        return self.sharding is not None and self.sharding.how != "elementwise"

    @property
    def needs_target_modules(self) -> bool:
        return self.params in ("low_rank", "decay_and_targets")

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
        return load(self.target)

    def callback_classes(self) -> list[type]:
        return [load(target) for target in self.callbacks]


def load(target: str) -> Any:
    """The object a ``\"module:attribute\"`` string names (imported now; upstream's known import noise kept off the
    screen: :func:`~lightning_optims.warn.quiet_upstream_noise`)."""
    quiet_upstream_noise()
    module_name, _, attribute = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        obj = getattr(obj, part)
    return obj
