"""``OptimizerMixin``: transformers' optimizer settings on a ``LightningModule``."""

from __future__ import annotations

import dataclasses
import math
import types
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.callbacks import (
    BaseFinetuning,
    Callback,
    GradientAccumulationScheduler,
    StochasticWeightAveraging,
    WeightAveraging,
)
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
)
from lightning.pytorch.trainer.states import TrainerStatus
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.types import LRSchedulerConfigType, OptimizerLRSchedulerConfig
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_optims.arguments import DEFAULT_OPTIM, OptimizerArguments
from lightning_optims.build import ScheduledGroupsLambdaLR, create_optimizer, create_scheduler
from lightning_optims.grad_norm import gradient_norm, norm_value
from lightning_optims.in_backward import InBackwardOptimizer, NonFiniteGradientError, NonFiniteLossError
from lightning_optims.registry import OptimizerSpec, get_spec, registered_names
from lightning_optims.sharded import is_sharded, sync_unused_parameters

__all__ = ["OptimizerMixin"]

_CHECKPOINT_KEY = "lightning_optims"
# strategies that shard or flatten parameters (DeepSpeed needs its package to be instantiated, not to be named)
SHARDED_STRATEGIES = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)
# schedulers that step on a monitored metric after validation rather than every optimizer step
_METRIC_SCHEDULERS = ("reduce_lr_on_plateau", "greedy")
#: the metric those schedulers step on (transformers' Trainer uses the evaluation loss)
METRIC_SCHEDULER_MONITOR = "val_loss"
#: the Lightning hooks the mixin implements: an override must call ``super()``, or the mixin's work is skipped
MIXIN_HOOKS = (
    "configure_optimizers",
    "configure_callbacks",
    "configure_gradient_clipping",
    "backward",
    "setup",
    "on_save_checkpoint",
    "on_load_checkpoint",
    "on_train_start",
)
_HOOK_ROLES = {
    "configure_optimizers": "building the optimizer and scheduler from the settings",
    "configure_callbacks": "adding the callbacks this optimizer needs at run time",
    "configure_gradient_clipping": "clipping at max_grad_norm",
    "backward": "the finite-loss check and, for LOMO / AdaLomo, the fused update of every parameter",
    "setup": "the check that LightningCLI's --optimizer did not replace configure_optimizers",
    "on_save_checkpoint": "recording the settings in the checkpoint",
    "on_load_checkpoint": "the resume checks (same optim and settings; a changed learning_rate applied)",
    "on_train_start": "applying a learning_rate changed on resume or by the learning-rate finder",
}
SETTINGS = tuple(f.name for f in dataclasses.fields(OptimizerArguments) if f.init)


def _calls_super(function: Any, hook: str) -> bool:
    """Whether ``function``'s code (or a function nested in it) names ``super`` or ``OptimizerMixin`` and ``hook``:
    the mark of ``super().hook(...)`` / ``OptimizerMixin.hook(self, ...)``. A function without both cannot call the
    mixin's hook."""
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


def _setting(name: str) -> property:
    def fget(self: Any) -> Any:
        return getattr(self.optimizer_arguments, name)

    def fset(self: Any, value: Any) -> None:
        self._set_settings(**{name: value})

    return property(fget, fset, doc=f"The ``{name}`` setting (validated when set; see OptimizerArguments).")


def _plain_data_parallel(strategy: Any) -> bool:
    """One device, or DDP with whole parameters on every process (DeepSpeed subclasses DDPStrategy: not it)."""
    return isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) and not isinstance(strategy, SHARDED_STRATEGIES)


def _runs_validation(trainer: Any, module: Any) -> bool:
    from lightning.pytorch.utilities.model_helpers import is_overridden

    if not is_overridden("validation_step", module) or trainer.limit_val_batches == 0:
        return False
    source = getattr(getattr(trainer.fit_loop.epoch_loop, "val_loop", None), "_data_source", None)
    return source is None or source.is_defined()


if TYPE_CHECKING:  # the mixin is only ever used before LightningModule in a module's bases: type it as one
    from lightning.pytorch import LightningModule as _MixinBase
else:
    _MixinBase = object


class OptimizerMixin(_MixinBase):
    """Mix into a ``LightningModule`` (``class M(OptimizerMixin, L.LightningModule)``).

    Takes every :class:`OptimizerArguments` field as a keyword argument (typed, so LightningCLI shows them in
    ``--help`` and YAML) and passes the rest on to the next class. Implements ``configure_optimizers``: the optimizer
    transformers' Trainer would build for this module, and ``transformers.get_scheduler`` stepped once per optimizer
    step over ``trainer.estimated_stepping_batches``.

    Gradient clipping: ``max_grad_norm`` (default 1.0, as in transformers) clips the global L2 norm of the gradients
    before each optimizer step, after the precision plugin has unscaled them. On one device and under DDP this is
    torch's ``clip_grad_norm_`` over the optimizer's parameters (what Lightning's clipping calls there), and a
    non-finite total norm stops training before the step; under sharded strategies Lightning's precision plugin
    clips. In-backward optimizers clip inside their backward (LOMO's two-pass norm). ``Trainer(gradient_clip_val=...)``
    is accepted only with ``max_grad_norm=0``: the two together are refused at the start of ``fit``, so nothing is
    clipped twice or ignored.

    Parameters are taken from :meth:`optimized_module` (``self`` by default), so ``optim_target_modules`` and the
    decay rules see the module names of this LightningModule (``model.layers.0.self_attn.q_proj`` if the network is
    stored as ``self.model``). Override it to return ``self.model`` to match names exactly as transformers does.
    """

    optimizer_arguments: OptimizerArguments

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
        super().__init__(*args, **kwargs)
        self._built_optimizer: Any = None
        self._built_scheduler: Any = None
        self.optimizer_arguments = OptimizerArguments(
            optim=optim,
            optim_args=optim_args,
            optim_target_modules=optim_target_modules,
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            adam_beta1=adam_beta1,
            adam_beta2=adam_beta2,
            adam_epsilon=adam_epsilon,
            lr_scheduler_type=lr_scheduler_type,
            lr_scheduler_kwargs=lr_scheduler_kwargs,
            warmup_steps=warmup_steps,
            max_grad_norm=max_grad_norm,
        )

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
        trainer = getattr(self, "_trainer", None)
        running = trainer is not None and trainer.state.status == TrainerStatus.RUNNING
        if running and self._built_optimizer is not None and self._built_optimizer in trainer.optimizers:  # type: ignore[union-attr]  # (running: trainer is set)
            fixed = [k for k in changes if k != "learning_rate" and getattr(new, k) != getattr(old, k)]
            if fixed:
                raise MisconfigurationException(
                    f"{', '.join(f'{k}={getattr(new, k)!r}' for k in fixed)}: this setting cannot change while a fit "
                    f"has built its optimizer (optim={old.optim!r}); set it before Trainer.fit"
                )
            if old.learning_rate and new.learning_rate != old.learning_rate:
                self._scale_learning_rate(new.learning_rate / old.learning_rate)
        self.optimizer_arguments = new
        hparams = self.__dict__.get("_hparams")
        if hparams is not None:
            for key in changes:
                if key in hparams:
                    hparams[key] = getattr(new, key)

    def _scale_learning_rate(self, ratio: float) -> None:
        """Multiply the learning rate of the running fit: the optimizer's groups and the scheduler's base rates."""
        trainer = self.trainer
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] *= ratio
                if "initial_lr" in group:
                    group["initial_lr"] *= ratio
        for config in trainer.lr_scheduler_configs:
            if hasattr(config.scheduler, "base_lrs"):
                config.scheduler.base_lrs = [lr * ratio for lr in config.scheduler.base_lrs]

    def _check_hook_overrides(self) -> None:
        """Refuse, when ``fit`` starts, an override of one of the mixin's hooks that does not call ``super()``: the
        mixin's work there (LOMO's fused backward, clipping at ``max_grad_norm``, the resume checks, its callbacks)
        would be skipped without a word."""
        for hook in MIXIN_HOOKS:
            for cls in type(self).__mro__:
                if cls is OptimizerMixin:
                    break
                function = vars(cls).get(hook)
                if function is not None and not _calls_super(function, hook):
                    raise MisconfigurationException(
                        f"{cls.__name__}.{hook} overrides a hook that OptimizerMixin implements, without calling "
                        f"super().{hook}(...): {_HOOK_ROLES[hook]} would silently not happen. Call "
                        f"super().{hook}(...) in it (as in any cooperative mixin)"
                    )

    def optimized_module(self) -> nn.Module:
        """The module whose parameters are optimized and whose module names the settings refer to."""
        return self

    # -- Lightning hooks ------------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        if "configure_optimizers" in vars(self):
            # LightningCLI(--optimizer / --lr_scheduler) patches the instance and only warns; refuse it here
            raise MisconfigurationException(
                f"configure_optimizers of {type(self).__name__} was replaced (LightningCLI --optimizer or "
                f"--lr_scheduler?), which would silently drop optim={self.optimizer_arguments.optim!r} and the other "
                "optimizer settings: set the optimizer through the model's settings (--model.optim=..., "
                "--model.learning_rate=..., --model.lr_scheduler_type=...) and remove --optimizer / --lr_scheduler"
            )
        super().setup(stage)

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        args = self.optimizer_arguments
        self._check_hook_overrides()
        self._check_trainer_settings()
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            if args.lr_scheduler_type not in ("constant", *_METRIC_SCHEDULERS):
                raise MisconfigurationException(
                    f"lr_scheduler_type={args.lr_scheduler_type!r} needs the number of training steps, and the "
                    "Trainer cannot estimate it (an iterable dataset without a length?): set Trainer(max_steps=...)"
                )
            total_steps = None
        else:
            total_steps = int(total)
        strategy = self.trainer.strategy
        if (
            isinstance(strategy, ModelParallelStrategy)
            and self.trainer.world_size > 1
            and not is_sharded([p for p in self.optimized_module().parameters() if p.requires_grad])
        ):
            # (nothing averages gradients then: every process would train its own copy, silently)
            raise MisconfigurationException(
                f"ModelParallelStrategy with {self.trainer.world_size} processes, and no parameter of "
                f"{type(self).__name__} is sharded: configure_model must call fully_shard (FSDP2) on the model "
                "(or parallelize it), otherwise no gradient is averaged across processes and each trains its own copy"
            )
        optimizer = create_optimizer(self.optimized_module(), args, num_training_steps=total_steps)
        if isinstance(strategy, ModelParallelStrategy):
            # FSDP2 groups with set_reduce_scatter_unused_params(True): parameters used on some processes only
            sync_unused_parameters(self)
        if isinstance(optimizer, InBackwardOptimizer):
            # the engine averages each gradient itself: DDP's reducer must not prepare a reduction it never sees
            wrapped = self.trainer.strategy.model
            if isinstance(wrapped, DistributedDataParallel):
                wrapped.require_backward_grad_sync = False
        if self.optimizer_spec.has_train_eval_modes:
            # train mode from the start (no weight moves: there is no second sequence yet), so that steps taken
            # without ScheduleFreeCallback (the learning-rate finder's trial run replaces all callbacks) work
            optimizer.train()  # type: ignore[attr-defined]  # (schedule-free optimizers have train() / eval())
        scheduler = create_scheduler(optimizer, args, total_steps or 0)
        self._built_optimizer, self._built_scheduler, self._built_total_steps = optimizer, scheduler, total_steps
        config: LRSchedulerConfigType
        if args.lr_scheduler_type in _METRIC_SCHEDULERS:
            config = {
                "scheduler": scheduler,
                "interval": "epoch",
                "monitor": METRIC_SCHEDULER_MONITOR,
                "frequency": 1,
                "reduce_on_plateau": True,
            }
        else:
            config = {"scheduler": scheduler, "interval": "step", "frequency": 1}
        return {"optimizer": optimizer, "lr_scheduler": config}

    def configure_callbacks(self) -> list[Any]:
        returned = super().configure_callbacks()  # (Lightning accepts one callback or a sequence)
        callbacks: list[Any] = [returned] if isinstance(returned, Callback) else list(returned or [])
        if self._trainer is not None and self.trainer.state.fn == "fit":
            self._check_hook_overrides()
        present = [] if self._trainer is None else getattr(self.trainer, "callbacks", [])
        needed = self.optimizer_spec.callback_classes()  # what the spec says this optimizer needs at run time
        if not getattr(self, "automatic_optimization", True) and self.optimizer_arguments.lr_scheduler_type not in (
            "constant",
            *_METRIC_SCHEDULERS,
        ):
            from lightning_optims.callbacks.manual import ManualSchedulerCheck

            needed.append(ManualSchedulerCheck)
        for cls in needed:
            if not any(isinstance(c, cls) for c in [*present, *callbacks]):
                callbacks.append(cls())
        return callbacks

    def backward(self, loss: Any, *args: Any, **kwargs: Any) -> None:
        trainer = self.trainer
        if getattr(trainer.precision_plugin, "scaler", None) is None and not bool(torch.isfinite(loss.detach()).all()):
            # (with a GradScaler an overflowing step is the scaler's to skip)
            raise NonFiniteLossError(
                f"non-finite loss ({loss.detach().float().mean().item()}) at global step {self.global_step} "
                "(before backward: no weight was changed by this step); training stops here"
            )
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        if isinstance(optimizer, InBackwardOptimizer):
            optimizer.fused_backward(loss)  # updates every parameter as its gradient arrives
            return
        super().backward(loss, *args, **kwargs)

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        """Log ``grad_norm`` (the global norm before clipping, as transformers' Trainer logs it, also with
        ``max_grad_norm=0``), refuse a non-finite one, then clip at ``max_grad_norm``."""
        trainer = self.trainer
        if self.optimizer_spec.updates_in_backward:
            # no gradient is left after backward: clipping happened inside it (max_grad_norm), and the engine
            # measured the norm as the gradients passed
            engine = trainer.optimizers[0] if trainer.optimizers else optimizer
            self._log_grad_norm(engine.grad_norm() if hasattr(engine, "grad_norm") else None)
            return
        max_norm = self.optimizer_arguments.max_grad_norm
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if not (_plain_data_parallel(trainer.strategy) or isinstance(trainer.strategy, ModelParallelStrategy)):
            # FSDP1 / DeepSpeed flatten or partition the gradients: their precision plugin clips, no norm here
            if gradient_clip_val:
                super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            elif max_norm > 0:
                self.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")
            return
        # one device, DDP (whole averaged gradients) or FSDP2 (DTensor gradients: the norm is reduced over the mesh):
        # torch's clip_grad_norm_ in two halves, so that the norm is logged and a non-finite one refused before the
        # optimizer writes it into the weights
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        total = gradient_norm(params)
        value = norm_value(total)
        self._log_grad_norm(value)
        if scaler is None and not bool(torch.isfinite(value)):  # (with a GradScaler the step is the scaler's to skip)
            raise NonFiniteGradientError(
                f"non-finite gradient norm ({value.item()}) at global step {self.global_step}: the optimizer "
                "step was not taken and training stops here"
            )
        if gradient_clip_val:
            # Trainer(gradient_clip_val=...) with max_grad_norm=0 (anything else was refused at configure_optimizers)
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        elif max_norm > 0 and scaler is not None:  # Lightning's precision plugin clips with its scaler
            self.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")
        elif max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)

    def _log_grad_norm(self, norm: torch.Tensor | None) -> None:
        """``grad_norm`` at every optimizer step, through ``self.log``: every logger and the progress bar see it."""
        if norm is not None:
            self.log("grad_norm", norm.detach(), on_step=True, on_epoch=False)

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[_CHECKPOINT_KEY] = {"settings": self.optimizer_arguments.as_kwargs()}
        super().on_save_checkpoint(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get(_CHECKPOINT_KEY, {}).get("settings")
        trainer = self._trainer
        if saved is None or trainer is None or trainer.state.fn != "fit":
            return  # loading weights (load_from_checkpoint, validate, test...) does not load optimizer state
        current = self.optimizer_arguments.as_kwargs()
        if saved.get("optim") != current["optim"]:
            raise MisconfigurationException(
                f"this checkpoint was written with optim={saved.get('optim')!r}, and {type(self).__name__} is "
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

    def on_train_start(self) -> None:
        # after the optimizer and scheduler states were restored: apply a learning_rate changed on resume
        ratio = getattr(self, "_resume_lr_ratio", 1.0)
        self._resume_lr_ratio = 1.0
        if ratio != 1.0:
            self._scale_learning_rate(ratio)
        self._resync_schedule()
        super().on_train_start()

    def _resync_schedule(self) -> None:
        """Before the first step of a fit, make the schedule agree with what happened since configure_optimizers:

        - ``BatchSizeFinder`` changed the batch size, and with it the number of training steps the schedule spans:
          it is rebuilt over the new count (nothing has been trained yet: the finder restores the weights);
        - ``LearningRateFinder`` wrote its suggestion into every group's lr (warmup included): the groups get the
          scheduled lr of the current step again, now from the new base rate.
        """
        trainer = self.trainer
        if self._built_optimizer is None or self._built_optimizer not in trainer.optimizers:
            return
        configs = [c for c in trainer.lr_scheduler_configs if c.scheduler is self._built_scheduler]
        if not configs:
            return  # not our schedule (the learning-rate finder's trial run has its own)
        config = configs[0]
        if trainer.global_step == 0 and self._built_total_steps is not None:
            total = trainer.estimated_stepping_batches
            if math.isfinite(total) and int(total) != self._built_total_steps:
                self._built_total_steps = int(total)
                config.scheduler = create_scheduler(self._built_optimizer, self.optimizer_arguments, int(total))
                self._built_scheduler = config.scheduler
        scheduler = config.scheduler
        if isinstance(scheduler, ScheduledGroupsLambdaLR):
            for group, lr in zip(self._built_optimizer.param_groups, scheduler.scheduled_lrs()):
                group["lr"] = lr

    # -- checks ---------------------------------------------------------------------------------------------------

    def _check_callbacks(self, trainer: Any) -> None:
        """Lightning callbacks that change what trains, where this optimizer cannot honour them."""
        spec = self.optimizer_spec
        for callback in getattr(trainer, "callbacks", []):
            name = type(callback).__name__
            if spec.updates_in_backward and isinstance(callback, GradientAccumulationScheduler):
                factors = {k: v for k, v in callback.scheduling.items() if v != 1}
                if factors:
                    raise MisconfigurationException(
                        f"{name}(scheduling={factors}) cannot work with optim={spec.name!r}: it updates "
                        "each parameter during backward and keeps no gradient to accumulate. Remove the callback "
                        "(or use a non-in-backward optimizer, e.g. adamw_torch or adafactor, to accumulate)"
                    )
            if isinstance(callback, BaseFinetuning) and isinstance(trainer.strategy, ModelParallelStrategy):
                raise MisconfigurationException(
                    f"{name} cannot be used under ModelParallelStrategy (FSDP2) here: freezing and unfreezing "
                    "parameters that FSDP2 shards is not supported (measured: a two-process fit with "
                    "BackboneFinetuning hangs in its first epoch, with torch's AdamW and without this package as "
                    f"with optim={spec.name!r}). Use DDP or one device for {name}, or freeze nothing under FSDP2"
                )
            if spec.has_train_eval_modes and isinstance(callback, (StochasticWeightAveraging, WeightAveraging)):
                raise MisconfigurationException(
                    f"{name} cannot be combined with optim={spec.name!r}: a schedule-free optimizer already averages "
                    "its iterates (its eval-mode weights are the average), and the weights that callback averages "
                    "switch between the train and eval sequences (after each validation), while the optimizer's "
                    "eval() at the end would move the averaged weights again. Remove the callback, or use a "
                    "scheduled optimizer (e.g. adamw_torch) with it"
                )

    def _check_trainer_settings(self, trainer: Any = None) -> None:
        """Refuse, before any step, Trainer settings this optimizer cannot honour (called by configure_optimizers)."""
        trainer = trainer if trainer is not None else self.trainer
        args = self.optimizer_arguments
        spec = self.optimizer_spec
        if spec.updates_in_backward and trainer.gradient_clip_val:
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
                    f"remove gradient_clip_val and set max_grad_norm={trainer.gradient_clip_val!r} (LOMO's "
                    "global-norm clipping, inside the fused backward)"
                )
            raise MisconfigurationException(
                f"Trainer(gradient_clip_val={trainer.gradient_clip_val!r}) cannot clip optim={spec.name!r}: it "
                f"updates each parameter during backward and leaves no gradient for the Trainer to clip; {advice}"
            )
        if trainer.gradient_clip_val and args.max_grad_norm > 0:
            raise MisconfigurationException(
                f"Trainer(gradient_clip_val={trainer.gradient_clip_val!r}) and max_grad_norm={args.max_grad_norm!r} "
                "both ask for gradient clipping: keep max_grad_norm (transformers' setting, global L2 norm) and drop "
                "gradient_clip_val, or set max_grad_norm=0 to let the Trainer clip"
            )
        self._check_callbacks(trainer)
        if (
            not getattr(self, "automatic_optimization", True)
            and args.max_grad_norm > 0
            and not spec.updates_in_backward
        ):
            raise MisconfigurationException(
                f"max_grad_norm={args.max_grad_norm!r} with manual optimization (automatic_optimization=False): "
                "Lightning does not clip in manual optimization, so it would silently not apply. Set "
                "max_grad_norm=0 and clip in training_step before opt.step(): "
                f"self.clip_gradients(opt, gradient_clip_val={args.max_grad_norm!r}, gradient_clip_algorithm='norm')"
            )
        if args.lr_scheduler_type in _METRIC_SCHEDULERS and not _runs_validation(trainer, self):
            raise MisconfigurationException(
                f"lr_scheduler_type={args.lr_scheduler_type!r} steps on the logged {METRIC_SCHEDULER_MONITOR!r} after "
                f"each validation, and this fit runs no validation (no validation_step, no val dataloader, or "
                "limit_val_batches=0): give it validation that logs 'val_loss', or choose a schedule over steps "
                "(linear, cosine, constant, ...)"
            )
        if spec.updates_in_backward and trainer.accumulate_grad_batches != 1:
            raise MisconfigurationException(
                f"optim={spec.name!r} updates each parameter during backward and keeps no gradient: "
                f"Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches}) cannot work; use 1"
            )
        sharded_here = isinstance(trainer.strategy, ModelParallelStrategy) and spec.runs_sharded
        if spec.updates_in_backward and not _plain_data_parallel(trainer.strategy) and not sharded_here:
            where = "ModelParallelStrategy (FSDP2, fully_shard in configure_model), " if spec.runs_sharded else ""
            raise MisconfigurationException(
                f"optim={spec.name!r} updates parameters in gradient hooks, which strategy "
                f"{type(trainer.strategy).__name__} does not support (it flattens or owns the parameters and their "
                f"gradients): use {where}a single device or DDP ('ddp', 'ddp_spawn', 'ddp_fork')"
            )
        if isinstance(trainer.strategy, SHARDED_STRATEGIES) and not spec.elementwise and not sharded_here:
            allowed = ", ".join(n for n in registered_names() if get_spec(n).elementwise)
            sharded = ", ".join(n for n in registered_names() if get_spec(n).runs_sharded)
            raise MisconfigurationException(
                f"optim={spec.name!r} is not supported under {type(trainer.strategy).__name__}: it shards or flattens "
                "the parameters, and this optimizer's update depends on whole tensors (a per-tensor norm, a "
                "factorisation, a projection, a parameter's index, or a hook on each parameter), so it would "
                f"silently compute something else. Use DDP for {spec.name!r}, or an elementwise optimizer here: "
                f"{allowed}; under ModelParallelStrategy (FSDP2) also {sharded}"
            )
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if spec.updates_in_backward and scaler is not None:
            raise MisconfigurationException(
                f"precision={trainer.precision!r} (a GradScaler) cannot drive optim={spec.name!r}: the scaler checks "
                "gradients after backward and none is left. Use precision='bf16-mixed', or '16-true' (fp16 weights; "
                "lomo then applies LOMO's own dynamic loss scaling)"
            )
        if spec.layerwise and trainer.world_size > 1 and not sharded_here:
            raise MisconfigurationException(
                f"optim={spec.name!r} steps each parameter inside backward, before DDP averages its gradient "
                f"(transformers refuses it under DDP too): strategy {type(trainer.strategy).__name__} with "
                f"{trainer.world_size} processes is not supported; use the non-layerwise optimizer, or "
                "ModelParallelStrategy (FSDP2: each gradient is reduced before its parameter's hook steps it)"
            )


for _name in SETTINGS:  # model.learning_rate, model.optim, ...: read and set through the validated settings
    setattr(OptimizerMixin, _name, _setting(_name))

# --help (LightningCLI reads this docstring) lists the registered names
OptimizerMixin.__init__.__doc__ = (OptimizerMixin.__init__.__doc__ or "").replace(
    "{OPTIMIZER_NAMES}", ", ".join(registered_names())
)
