"""The run-time half of ``OptimizerMixin``: what happens around the optimizer while a fit runs, kept in a callback so
that a module may override ``setup``, ``on_train_start``, ``on_save_checkpoint``, ``on_load_checkpoint`` and
``configure_callbacks`` without ``super()`` and train the same (Lightning's own extensions live this way)."""

from __future__ import annotations

import math
import types
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, Checkpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_optims.build import ScheduledGroupsLambdaLR, create_scheduler
from lightning_optims.rules import spans_steps

__all__ = [
    "MIXIN_HOOKS",
    "MIXIN_MARK",
    "OptimizerCallback",
    "attach_callbacks",
    "next_trainer_property",
    "scale_learning_rate",
]

CHECKPOINT_KEY = "lightning_optims"
#: the Lightning hooks the mixin implements on the module: an override must call ``super()``
MIXIN_HOOKS = ("configure_optimizers", "configure_gradient_clipping", "backward")
_HOOK_ROLES = {
    "configure_optimizers": "building the optimizer and scheduler from the settings",
    "configure_gradient_clipping": "clipping at max_grad_norm",
    "backward": "the finite-loss check and, for an optimizer that updates in backward, the update of every parameter",
}
#: the attribute that marks ``OptimizerMixin`` in a module's classes (this module does not import the mixin)
MIXIN_MARK = "_lightning_optims_mixin"


def mixin_class(module: Any) -> type:
    """The ``OptimizerMixin`` class among the module's bases."""
    return next(c for c in type(module).__mro__ if vars(c).get(MIXIN_MARK))


_TRAINER_PROPERTY: dict[type, Any] = {}


def next_trainer_property(cls: type) -> Any:
    """The ``trainer`` property of the class after the mixin in ``cls`` (LightningModule's), found once per class."""
    if cls not in _TRAINER_PROPERTY:
        mro = cls.__mro__
        after = mro[next(i for i, c in enumerate(mro) if vars(c).get(MIXIN_MARK)) + 1 :]
        _TRAINER_PROPERTY[cls] = next(vars(c)["trainer"] for c in after if "trainer" in vars(c))
    return _TRAINER_PROPERTY[cls]


def _leads_to(function: Any, target: Any) -> bool:
    """Whether ``function`` is ``target`` or wraps it: a bound method, ``functools.partial`` / ``update_wrapper``
    (``__wrapped__``), or ``mock.patch.object(..., wraps=...)``."""
    seen, todo = set(), [function]
    while todo:
        f = todo.pop()
        if f is None or id(f) in seen:
            continue
        if f is target:
            return True
        seen.add(id(f))
        todo += [getattr(f, a, None) for a in ("__wrapped__", "__func__", "func")]
        todo.append(getattr(f, "_mock_wraps", None) if "_mock_wraps" in getattr(f, "__dict__", {}) else None)
    return False


def _calls_super(function: Any, hook: str, mixin: type) -> bool:
    """Whether ``function``'s code (or a function nested in it) names ``super`` or ``OptimizerMixin`` and ``hook``:
    the mark of ``super().hook(...)`` / ``OptimizerMixin.hook(self, ...)``. A function without both cannot call the
    mixin's hook."""
    if _leads_to(function, vars(mixin)[hook]):
        return True  # (configure_optimizers = OptimizerMixin.configure_optimizers)
    code = getattr(function, "__code__", None)
    if code is None:
        return True  # not plain Python (a C function, a partial...): nothing to read, assume it does
    stack = [code]
    while stack:
        c = stack.pop()
        names = set(c.co_names) | set(c.co_freevars)
        if hook in names and ("super" in names or "OptimizerMixin" in names or "__class__" in c.co_freevars):
            return True
        stack.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    return False


def check_hook_overrides(module: Any) -> None:
    """Refuse an override of one of the mixin's module hooks that does not call ``super()``: the mixin's work there
    (LOMO's fused backward, clipping at ``max_grad_norm``, building the optimizer) would be skipped without a word."""
    mixin = mixin_class(module)
    for hook in MIXIN_HOOKS:
        for cls in type(module).__mro__:
            if cls is mixin:
                break
            function = vars(cls).get(hook)
            if function is not None and not _calls_super(function, hook, mixin):
                raise MisconfigurationException(
                    f"{cls.__name__}.{hook} overrides a hook that OptimizerMixin implements, without calling "
                    f"super().{hook}(...): {_HOOK_ROLES[hook]} would silently not happen. Call "
                    f"super().{hook}(...) in it (as in any cooperative mixin)"
                )


def check_configure_optimizers_kept(module: Any) -> None:
    """LightningCLI(--optimizer / --lr_scheduler) replaces ``configure_optimizers`` on the instance and only warns:
    refuse a replacement that does not lead to the class's own method (a wrapper that delegates to it is fine)."""
    replaced = vars(module).get("configure_optimizers")
    if replaced is None or _leads_to(replaced, getattr(type(module), "configure_optimizers", None)):
        return
    raise MisconfigurationException(
        f"configure_optimizers of {type(module).__name__} was replaced (LightningCLI --optimizer or "
        f"--lr_scheduler?), which would silently drop optim={module.optimizer_arguments.optim!r} and the other "
        "optimizer settings: set the optimizer through the model's settings (--model.optim=..., "
        "--model.learning_rate=..., --model.lr_scheduler_type=...) and remove --optimizer / --lr_scheduler"
    )


def scale_learning_rate(trainer: Any, ratio: float) -> None:
    """Multiply the learning rate of the running fit: the optimizer's groups and the scheduler's base rates."""
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            group["lr"] *= ratio
            if "initial_lr" in group:
                group["initial_lr"] *= ratio
    for config in trainer.lr_scheduler_configs:
        if hasattr(config.scheduler, "base_lrs"):
            config.scheduler.base_lrs = [lr * ratio for lr in config.scheduler.base_lrs]


def _resync_schedule(trainer: Any, module: Any) -> None:
    """Before the first step of a fit, make the schedule agree with what happened since configure_optimizers:

    - ``BatchSizeFinder`` changed the batch size, and with it the number of training steps the schedule spans:
      it is rebuilt over the new count (nothing has been trained yet: the finder restores the weights);
    - ``LearningRateFinder`` wrote its suggestion into every group's lr (warmup included): the groups get the
      scheduled lr of the current step again, now from the new base rate.
    """
    optimizer = module._built_optimizer
    if optimizer is None or optimizer not in trainer.optimizers:
        return
    configs = [c for c in trainer.lr_scheduler_configs if c.scheduler is module._built_scheduler]
    if not configs:
        return  # not our schedule (the learning-rate finder's trial run has its own)
    config = configs[0]
    if trainer.global_step == 0 and module._built_total_steps is not None:
        total = trainer.estimated_stepping_batches
        if math.isfinite(total) and int(total) != module._built_total_steps:
            module._built_total_steps = int(total)
            config.scheduler = create_scheduler(optimizer, module.optimizer_arguments, int(total))
            module._built_scheduler = config.scheduler
    if isinstance(config.scheduler, ScheduledGroupsLambdaLR):
        for group, lr in zip(optimizer.param_groups, config.scheduler.scheduled_lrs()):
            group["lr"] = lr


def _settings(module: Any) -> dict[str, Any]:
    return module.optimizer_arguments.as_kwargs()


def _is_ours(module: Any) -> bool:
    return hasattr(module, "optimizer_arguments") and hasattr(module, "_built_optimizer")


class OptimizerCallback(Callback):
    """Added by ``OptimizerMixin`` to every Trainer it is attached to (once). For a module with the mixin it:

    - refuses, when ``fit`` sets up, a module hook the mixin implements overridden without ``super()``, and a
      ``configure_optimizers`` replaced on the instance (LightningCLI's ``--optimizer``);
    - records the settings in every checkpoint (``checkpoint["lightning_optims"]``), and on resume refuses another
      ``optim`` or changed settings (only ``learning_rate`` may change: it is applied when training starts);
    - before the first step, rescales the learning rates for a ``learning_rate`` changed on resume and makes the
      schedule agree with ``BatchSizeFinder`` / ``LearningRateFinder``.

    It does nothing for other modules, so a Trainer reused for them is not affected.
    """

    def __init__(self) -> None:
        self._resume_lr_ratio = 1.0

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and _is_ours(pl_module):
            check_hook_overrides(pl_module)
            check_configure_optimizers_kept(pl_module)

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if _is_ours(pl_module):
            checkpoint[CHECKPOINT_KEY] = {"settings": _settings(pl_module)}

    @override
    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # (Lightning calls it when fit resumes, not for validate / test / predict or load_from_checkpoint)
        saved = checkpoint.get(CHECKPOINT_KEY, {}).get("settings")
        if saved is None or not _is_ours(pl_module):
            return
        current = _settings(pl_module)
        if saved.get("optim") != current["optim"]:
            raise MisconfigurationException(
                f"this checkpoint was written with optim={saved.get('optim')!r}, and {type(pl_module).__name__} is "
                f"configured with optim={current['optim']!r}: that optimizer's state cannot be loaded into this "
                f"one. Resume with optim={saved.get('optim')!r}, or start a new fit from the weights only "
                "(load_from_checkpoint, or Trainer.fit without ckpt_path)"
            )
        changed = [k for k in current if k != "learning_rate" and saved.get(k) != current[k]]
        if changed:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
            raise MisconfigurationException(
                f"resuming changes optimizer settings that the checkpoint's optimizer state would silently "
                f"override ({details}); only learning_rate may change on resume"
            )
        self._resume_lr_ratio = current["learning_rate"] / saved["learning_rate"] if saved["learning_rate"] else 1.0

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after the optimizer and scheduler states were restored: apply a learning_rate changed on resume
        ratio, self._resume_lr_ratio = self._resume_lr_ratio, 1.0
        if not _is_ours(pl_module):
            return
        if ratio != 1.0:
            scale_learning_rate(trainer, ratio)
        _resync_schedule(trainer, pl_module)


def attach_callbacks(trainer: Any, module: Any) -> None:
    """Put the callbacks ``module`` needs into ``trainer.callbacks`` (once each), before any checkpoint callback as
    Lightning orders them. Called when the module is attached to the Trainer, before Lightning reads the module's
    ``configure_callbacks``: an override of that hook cannot drop them, and a callback of the same class returned
    there replaces ours, as Lightning does for callbacks given to the Trainer."""
    callbacks = getattr(trainer, "callbacks", None)
    if not isinstance(callbacks, list):
        return
    needed = [OptimizerCallback, *module.optimizer_spec.callback_classes()]
    if not getattr(module, "automatic_optimization", True) and spans_steps(
        module.optimizer_arguments.lr_scheduler_type
    ):
        from lightning_optims.callbacks.manual import ManualSchedulerCheck

        needed.append(ManualSchedulerCheck)
    for cls in needed:
        if not any(isinstance(c, cls) for c in callbacks):
            at = next((i for i, c in enumerate(callbacks) if isinstance(c, Checkpoint)), len(callbacks))
            callbacks.insert(at, cls())
