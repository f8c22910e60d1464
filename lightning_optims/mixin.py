"""``OptimizerMixin``: transformers' optimizer settings on a ``LightningModule``.

The mixin keeps on the module only what must be there (``configure_optimizers``, ``backward``,
``configure_gradient_clipping``); the run-time work (resume checks, the learning rate changed on resume, the checks
when ``fit`` starts) lives in :class:`~lightning_optims.callbacks.runtime.OptimizerCallback`, which the mixin puts
into the Trainer when it is attached, and the refusals in :mod:`lightning_optims.rules`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerStatus
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_optims import compat, finite, rules
from lightning_optims.arguments import DEFAULT_OPTIM, OptimizerArguments
from lightning_optims.build import create_optimizer, create_scheduler
from lightning_optims.callbacks.runtime import (
    MIXIN_HOOKS,
    MIXIN_MARK,
    attach_callbacks,
    next_trainer_property,
    scale_learning_rate,
)
from lightning_optims.compat import sync_unused_parameters
from lightning_optims.distributed.layout import plain_data_parallel
from lightning_optims.engines.in_backward import InBackwardOptimizer
from lightning_optims.engines.sharded_layerwise import ShardedLayerwiseOptimizer
from lightning_optims.errors import NonFiniteGradientError
from lightning_optims.grad_norm import clip_with_norm, gradient_norm, norm_value
from lightning_optims.registry import get_spec, registered_names
from lightning_optims.spec import OptimizerSpec

__all__ = ["MIXIN_HOOKS", "OptimizerMixin"]

SETTINGS = tuple(f.name for f in dataclasses.fields(OptimizerArguments) if f.init)


def _setting(name: str) -> property:
    def fget(self: Any) -> Any:
        return getattr(self.optimizer_arguments, name)

    def fset(self: Any, value: Any) -> None:
        self._set_settings(**{name: value})

    return property(fget, fset, doc=f"The ``{name}`` setting (validated when set; see OptimizerArguments).")


if TYPE_CHECKING:
    # (OptimizerLRSchedulerConfig: Lightning >= 2.6; a name for annotations only)
    from lightning.pytorch.utilities.types import LRSchedulerConfigType, OptimizerLRSchedulerConfig

if TYPE_CHECKING:  # the mixin is only ever used before LightningModule in a module's bases: type it as one
    from lightning.pytorch import LightningModule as _MixinBase
else:
    _MixinBase = object


class OptimizerMixin(_MixinBase):
    """Mix into a ``LightningModule`` (``class M(OptimizerMixin, L.LightningModule)``): every
    :class:`OptimizerArguments` field is a keyword argument (typed: LightningCLI shows them in ``--help`` and YAML);
    ``configure_optimizers`` builds the optimizer transformers' Trainer would build and ``transformers.get_scheduler``
    over ``trainer.estimated_stepping_batches`` (without a Trainer: ``configure_optimizers(num_training_steps=N)``).
    ``max_grad_norm`` (1.0, as transformers) clips the global norm after the precision plugin unscaled the gradients
    (through ``clip_gradients`` where the module overrides it); a non-finite loss or norm stops training before the
    step (one host sync per step: ``finite.py``); ``Trainer(gradient_clip_val=...)`` only with ``max_grad_norm=0``.
    Parameters come from :meth:`optimized_module` (``self`` by default): the names ``optim_target_modules`` and the
    decay rules see."""

    # TorchScript (to_torchscript) compiles properties not listed here: the settings are not part of the model
    __jit_unused_properties__: list[str] = [  # noqa: RUF012  # (a list, as LightningModule declares it)
        *LightningModule.__jit_unused_properties__,
        "optimizer_spec",
        *SETTINGS,
    ]

    def __init__(
        self,
        *args: Any,
        optim: str = DEFAULT_OPTIM,
        optim_args: str | dict[str, Any] | None = None,
        optim_target_modules: str | list[str] | None = None,
        learning_rate: float = 5e-5,
        weight_decay: float = 0.0,
        adam_beta1: float = 0.9,
        adam_beta2: float = 0.999,
        adam_epsilon: float = 1e-8,
        lr_scheduler_type: str = "linear",
        lr_scheduler_kwargs: dict[str, Any] | str | None = None,
        warmup_steps: float = 0,
        max_grad_norm: float = 1.0,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            optim: the optimizer name, as transformers' ``optim``; one of: {OPTIMIZER_NAMES}.
            optim_args: optimizer-specific settings: ``"rank=1,scale=128.0"`` or a mapping.
            optim_target_modules: modules a low-rank optimizer projects: a regex, a list, or ``"all-linear"``.
            learning_rate: the peak learning rate.
            weight_decay: decoupled weight decay (not applied to bias and norm parameters).
            adam_beta1: Adam beta1.
            adam_beta2: Adam beta2.
            adam_epsilon: Adam epsilon.
            lr_scheduler_type: a transformers scheduler name (linear, cosine, constant, ...).
            lr_scheduler_kwargs: extra arguments of that scheduler (a mapping or a JSON string).
            warmup_steps: warmup as a number of steps (int) or a ratio of the training steps (float in [0, 1)).
            max_grad_norm: clip the global gradient norm to this value before each step; 0 disables.
        """
        given = dict(locals())
        super().__init__(*args, **kwargs)
        self.last_grad_norm: torch.Tensor | None = None  # (the last optimizer step's global gradient norm)
        self._built_optimizer: Any = None
        self._built_scheduler: Any = None
        self.optimizer_arguments = OptimizerArguments(**{name: given[name] for name in SETTINGS})

    @property
    def optimizer_spec(self) -> OptimizerSpec:
        return get_spec(self.optimizer_arguments.optim)

    def _set_settings(self, **changes: Any) -> None:
        """Change settings (``model.learning_rate = 3e-4``; Lightning's tuner does it through ``lightning_setattr``):
        validated as the constructor validates them, recorded in ``hparams`` where ``save_hyperparameters()`` put
        them, and, while a fit has its optimizer, applied to it (a new ``learning_rate`` rescales the learning rates
        of the schedule from the current step on; another setting cannot change under a running optimizer)."""
        old = self.optimizer_arguments
        new = OptimizerArguments(**{**old.as_kwargs(), **changes})
        trainer = compat.attached_trainer(self)
        running = trainer is not None and trainer.state.status == TrainerStatus.RUNNING
        if running and self._built_optimizer is not None and self._built_optimizer in trainer.optimizers:
            fixed = [k for k in changes if k != "learning_rate" and getattr(new, k) != getattr(old, k)]
            if fixed:
                raise MisconfigurationException(
                    f"{', '.join(f'{k}={getattr(new, k)!r}' for k in fixed)}: this setting cannot change while a fit "
                    f"has built its optimizer (optim={old.optim!r}); set it before Trainer.fit"
                )
            if old.learning_rate and new.learning_rate != old.learning_rate:
                scale_learning_rate(trainer, new.learning_rate / old.learning_rate)
        self.optimizer_arguments = new
        hparams = compat.saved_hparams(self)
        if hparams is not None:
            for key in changes:
                if key in hparams:
                    hparams[key] = getattr(new, key)

    def optimized_module(self) -> nn.Module:
        """The module whose parameters are optimized and whose module names the settings refer to."""
        return self

    @property
    def trainer(self) -> Any:
        return next_trainer_property(type(self)).__get__(self)

    @trainer.setter
    def trainer(self, trainer: Any) -> None:
        # Lightning attaches the Trainer before it reads configure_callbacks: the mixin's callbacks go in here, so a
        # module's own configure_callbacks (with or without super()) cannot drop them
        next_trainer_property(type(self)).__set__(self, trainer)
        if trainer is not None:
            attach_callbacks(trainer, self)

    def configure_optimizers(self, num_training_steps: int | None = None) -> OptimizerLRSchedulerConfig:
        """The optimizer and scheduler transformers' Trainer would build. Under a Trainer the schedule spans
        ``trainer.estimated_stepping_batches``; without one (Lightning Fabric, plain PyTorch) pass
        ``num_training_steps``, the number of optimizer steps the schedule spans."""
        args = self.optimizer_arguments
        trainer = None if compat.uses_fabric(self) else compat.attached_trainer(self)
        if num_training_steps is not None and (
            isinstance(num_training_steps, bool) or not isinstance(num_training_steps, int) or num_training_steps < 1
        ):
            raise ValueError(f"num_training_steps={num_training_steps!r}: expected an int >= 1")
        if trainer is None:
            if num_training_steps is None and rules.spans_steps(args.lr_scheduler_type):
                raise MisconfigurationException(
                    f"configure_optimizers() of {type(self).__name__} was called without a Trainer, and "
                    f"lr_scheduler_type={args.lr_scheduler_type!r} needs the number of training steps: call "
                    "configure_optimizers(num_training_steps=N) (see docs/fabric.md for use with Fabric or plain "
                    "PyTorch)"
                )
            total_steps = num_training_steps
        else:
            rules.check(trainer, self)
            total = trainer.estimated_stepping_batches
            total_steps = num_training_steps or (int(total) if math.isfinite(total) else None)
        optimizer = create_optimizer(self.optimized_module(), args, num_training_steps=total_steps)
        if trainer is not None and isinstance(trainer.strategy, ModelParallelStrategy):
            # FSDP2 groups with set_reduce_scatter_unused_params(True): parameters used on some processes only
            sync_unused_parameters(self)
            # a layer-wise optimizer steps each FSDP2 group's parameters together, after the group's post-backward
            after = optimizer if isinstance(optimizer, ShardedLayerwiseOptimizer) else None
            if compat.after_each_fsdp_group(self, after) and after is not None:
                after.batched = True
        if trainer is not None and isinstance(optimizer, InBackwardOptimizer):
            # the engine averages each gradient itself: DDP's reducer must not prepare a reduction it never sees
            wrapped = trainer.strategy.model
            if isinstance(wrapped, DistributedDataParallel):
                wrapped.require_backward_grad_sync = False
        if self.optimizer_spec.has_train_eval_modes:
            # train mode from the start (no weight moves: there is no second sequence yet), so that steps taken
            # without ScheduleFreeCallback (the learning-rate finder's trial run replaces all callbacks) work
            optimizer.train()  # type: ignore[attr-defined]  # (schedule-free optimizers have train() / eval())
        scheduler = create_scheduler(optimizer, args, total_steps or 0)
        self._built_optimizer, self._built_scheduler, self._built_total_steps = optimizer, scheduler, total_steps
        config: LRSchedulerConfigType
        if args.lr_scheduler_type in rules.METRIC_SCHEDULERS:
            config = {
                "scheduler": scheduler,
                "interval": "epoch",
                "monitor": rules.METRIC_SCHEDULER_MONITOR,
                "frequency": 1,
                "reduce_on_plateau": True,
            }
        else:
            config = {"scheduler": scheduler, "interval": "step", "frequency": 1}
        return {"optimizer": optimizer, "lr_scheduler": config}

    def backward(self, loss: Any, *args: Any, **kwargs: Any) -> None:
        trainer = self.trainer
        check = getattr(trainer.precision_plugin, "scaler", None) is None  # (with a GradScaler: the scaler's to skip)
        anomaly = torch.is_anomaly_enabled()  # Trainer(detect_anomaly=True): let backward name the operation first
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        if isinstance(optimizer, InBackwardOptimizer):  # (the loss is read at the engine's one host sync)
            try:
                optimizer.fused_backward(loss)  # updates every parameter as its gradient arrives
            except NonFiniteGradientError as error:
                finite.note_loss(self, loss, optimizer.last_loss_finite)
                raise finite.gradient_error(self, error) from error
            finite.note_loss(self, loss, optimizer.last_loss_finite)
            finite.gradients_were_finite(self)
        else:
            if check and not anomaly:  # (read at the step's verdict where one follows, else now)
                finite.before_backward(self, loss, optimizer)
            super().backward(loss, *args, **kwargs)
            finite.after_backward(self, optimizer)
        if check and anomaly:
            finite.check_loss(self, loss, "after backward, where anomaly detection reported nothing")

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        """Log ``grad_norm`` (the global norm before clipping, as transformers' Trainer logs it, also with
        ``max_grad_norm=0``), refuse a non-finite one, then clip at ``max_grad_norm`` (through ``clip_gradients`` where
        the module overrides it, as Lightning's own ``configure_gradient_clipping`` does)."""
        trainer = self.trainer
        if self.optimizer_spec.updates_in_backward:
            # no gradient is left after backward: clipping happened inside it (max_grad_norm), and the engine
            # measured the norm as the gradients passed
            engine = trainer.optimizers[0] if trainer.optimizers else optimizer
            self._log_grad_norm(engine.grad_norm() if hasattr(engine, "grad_norm") else None)
            if hasattr(engine, "nonfinite"):  # (layer-wise: its steps skipped non-finite gradients on the device)
                finite.layerwise_verdict(self, engine)
            return
        max_norm = self.optimizer_arguments.max_grad_norm
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        measured = plain_data_parallel(trainer.strategy) or isinstance(trainer.strategy, ModelParallelStrategy)
        params, total = [], None
        if measured:
            # one device, DDP (whole averaged gradients) or FSDP2 (DTensor gradients: the norm is reduced over the
            # mesh); FSDP1 / DeepSpeed flatten or partition the gradients: their precision plugin clips, no norm here
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            total = gradient_norm(params)
            value = norm_value(total)
            self._log_grad_norm(value)
            finite.norm_verdict(self, value, checked=scaler is None)  # (the step's one host sync)
        if gradient_clip_val:
            # Trainer(gradient_clip_val=...) with max_grad_norm=0 (anything else was refused when fit started)
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        elif max_norm > 0 and total is not None and scaler is None and not self._overrides_clip_gradients():
            clip_with_norm(params, max_norm, total)  # Lightning's clipping, with the norm measured once
        elif max_norm > 0:
            self.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")
        else:  # (as Lightning's own hook: an override of clip_gradients is called at every step, here with no value)
            self.clip_gradients(optimizer, gradient_clip_val=None, gradient_clip_algorithm=None)

    def _overrides_clip_gradients(self) -> bool:
        return getattr(self.clip_gradients, "__func__", None) is not LightningModule.clip_gradients

    def _log_grad_norm(self, norm: torch.Tensor | None) -> None:
        """Keep this step's ``grad_norm`` (:attr:`last_grad_norm`) and log it where the loggers write (batch_size 1:
        a step value is not averaged; a ``dataloader_iter`` training_step leaves Lightning no batch to infer it)."""
        self.last_grad_norm = None if norm is None else norm.detach()
        compat.log_when_written(self, "grad_norm", self.last_grad_norm)


for _name in SETTINGS:  # model.learning_rate, model.optim, ...: read and set through the validated settings
    setattr(OptimizerMixin, _name, _setting(_name))
setattr(OptimizerMixin, MIXIN_MARK, True)

# --help (LightningCLI reads this docstring) lists the registered names
OptimizerMixin.__init__.__doc__ = (OptimizerMixin.__init__.__doc__ or "").replace(
    "{OPTIMIZER_NAMES}", ", ".join(registered_names())
)
