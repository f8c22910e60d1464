"""Schedule-free AdamW / RAdam / SGD (schedulefree): ``schedule_free_adamw``, ``schedule_free_radam``,
``schedule_free_sgd``, optimizers with train / eval modes, and :class:`ScheduleFreeCallback`, which switches the modes
in every phase and checkpoint.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_optims.compat import BatchNorm, logged_elsewhere
from lightning_optims.distributed.layout import plain_data_parallel
from lightning_optims.optim_args import Arg, OptimizerSettingError
from lightning_optims.spec import ADAM, WEIGHT_DECAY, BuildContext, OptimizerSpec, Sharding

__all__ = ["SPECS", "ScheduleFreeCallback", "in_train_mode", "is_schedule_free"]


# the optimizer warms up itself (besides the scheduler): warmup_steps takes effect even with a constant schedule
WARMUP = frozenset({"warmup_steps"})

SCHEDULE_FREE_ARGUMENTS = (Arg("weight_lr_power", float, 2.0), Arg("r", float, 0.0))


def optimizer_warmup_steps(ctx: BuildContext) -> int:
    """``warmup_steps`` as the optimizer's own warmup.

    transformers hands the raw setting to the optimizer, so a ratio such as 0.1 becomes "0.1 steps", which the
    optimizer turns into a 10x learning rate on the first step. Here a ratio is resolved to steps as the scheduler
    resolves it, which needs the number of training steps.
    """
    warmup = ctx.args.warmup_steps
    if warmup == 0 or warmup >= 1:
        return int(warmup)
    if ctx.num_training_steps is None:
        raise OptimizerSettingError(
            f"warmup_steps={warmup} is a ratio, and {ctx.args.optim} warms up inside the optimizer: pass "
            "num_training_steps to create_optimizer (the mixin does), or give warmup_steps as a number of steps"
        )
    return math.ceil(ctx.num_training_steps * warmup)


def _kwargs(with_adam: bool, with_warmup: bool):
    def build(ctx: BuildContext) -> dict:
        kwargs = dict(ctx.adam_kwargs) if with_adam else {}
        kwargs["weight_decay"] = ctx.args.weight_decay
        if with_warmup:
            kwargs["warmup_steps"] = optimizer_warmup_steps(ctx)
        kwargs.update(ctx.optim_args)
        return kwargs

    return build


SPECS = [
    OptimizerSpec(
        name=name,
        target=f"schedulefree:{cls}",
        family="schedule_free",
        arguments=SCHEDULE_FREE_ARGUMENTS,
        kwargs=_kwargs(adam, warmup),
        uses=(ADAM if adam else frozenset()) | WEIGHT_DECAY | (WARMUP if warmup else frozenset()),
        packages=("schedulefree",),
        has_train_eval_modes=True,
        sharding=Sharding("elementwise", one_kernel_per_group=True),  # (schedulefree's step: foreach over each group)
        callbacks=("lightning_optims.families.schedule_free:ScheduleFreeCallback",),
        description=f"schedulefree.{cls}",
    )
    for name, cls, adam, warmup in (
        ("schedule_free_adamw", "AdamWScheduleFree", True, True),
        ("schedule_free_radam", "RAdamScheduleFree", True, False),
        ("schedule_free_sgd", "SGDScheduleFree", False, True),
    )
]


def is_schedule_free(optimizer: Any) -> bool:
    """An optimizer with ``train()`` / ``eval()`` modes: schedulefree's optimizers and ``ScheduleFreeWrapper``."""
    if not (callable(getattr(optimizer, "train", None)) and callable(getattr(optimizer, "eval", None))):
        return False
    groups = getattr(optimizer, "param_groups", None) or [{}]
    return "train_mode" in groups[0] or isinstance(getattr(optimizer, "train_mode", None), bool)


def in_train_mode(optimizer: Any) -> bool:
    if isinstance(getattr(optimizer, "train_mode", None), bool):  # ScheduleFreeWrapper
        return optimizer.train_mode
    return bool(optimizer.param_groups[0]["train_mode"])


def _mark_train_mode(optimizer: Any) -> None:
    """Set the mode flag without moving the weights (they were put back to the train point by copy)."""
    if isinstance(getattr(optimizer, "train_mode", None), bool):
        optimizer.train_mode = True
    else:
        for group in optimizer.param_groups:
            group["train_mode"] = True


def _sync_added_groups(optimizer: Any) -> None:
    """A param group added during training (``BaseFinetuning``) gets the optimizer's defaults, ``train_mode=False``
    among them, while the others may be in train mode: schedulefree's ``step`` reads only the first group's flag, and
    ``eval()`` / ``train()`` would then move the new group's weights the wrong way. A group whose parameters have no
    second sequence yet (nothing to move) takes the first group's mode."""
    groups = getattr(optimizer, "param_groups", None) or []
    if not groups or "train_mode" not in groups[0]:
        return
    mode = groups[0]["train_mode"]
    for group in groups[1:]:
        if group.get("train_mode") != mode and not any("z" in optimizer.state.get(p, {}) for p in group["params"]):
            group["train_mode"] = mode


def _averaged_params(optimizer: Any) -> list[torch.Tensor]:
    """Parameters for which the optimizer holds a second sequence (``z``), i.e. whose train and eval points differ."""
    return [p for g in optimizer.param_groups for p in g["params"] if "z" in optimizer.state.get(p, {})]


class ScheduleFreeCallback(Callback):
    """Keeps schedule-free optimizers in the right mode: train mode for training steps, eval mode (the averaged
    weights) for the sanity check, validation, test, predict, every checkpoint and the end of ``fit``.

    ``OptimizerMixin`` adds it for optimizers whose spec has ``has_train_eval_modes``, unless the Trainer already
    has one; on its own it serves any module whose ``configure_optimizers`` returns a schedulefree optimizer or a
    ``ScheduleFreeWrapper``.

    Checkpoints are written with the averaged weights and the optimizer in eval mode, without moving the weights of
    the run that saves them: the train-mode weights are copied, the optimizer's own ``eval()`` produces the averaged
    ones for the checkpoint, and the copy is put back bit for bit. With ``exact_resume`` (default) the train-mode
    weights of a checkpoint saved in train mode (a mid-epoch or epoch-end checkpoint without validation) are stored
    in this callback's state, so that a resumed run continues from exactly the weights the uninterrupted run had
    (re-deriving them from the averaged weights would differ by rounding). Checkpoints saved after validation are
    already in eval mode and carry no extra weights.

    Args:
        bn_recalibration_batches: if > 0, before each validation and at the end of ``fit``, recompute the running
            statistics of BatchNorm layers for the averaged weights from this many training batches (the
            schedulefree authors' recipe: model in train mode, no gradient). 0 disables it; a model with BatchNorm
            then gets a warning, since its running statistics belong to the training weights.
        bn_forward: how a training batch is run for recalibration; by default ``training_step`` (what it logs is
            discarded).
        exact_resume: store the train-mode weights in checkpoints saved in train mode (see above).
    """

    def __init__(
        self,
        bn_recalibration_batches: int = 0,
        bn_forward: Callable[[L.LightningModule, Any, int], Any] | None = None,
        exact_resume: bool = True,
    ) -> None:
        if (
            isinstance(bn_recalibration_batches, bool)
            or not isinstance(bn_recalibration_batches, int)
            or bn_recalibration_batches < 0
        ):
            raise ValueError(f"bn_recalibration_batches={bn_recalibration_batches!r}: expected an int >= 0")
        self.bn_recalibration_batches = bn_recalibration_batches
        self.bn_forward = bn_forward
        self.exact_resume = exact_resume
        self._resume_weights: dict[str, torch.Tensor] | None = None

    # -- helpers --------------------------------------------------------------------------------------------------

    @staticmethod
    def _optimizers(trainer: L.Trainer) -> list[Any]:
        return [opt for opt in trainer.optimizers if is_schedule_free(opt)]

    def _to_eval(self, trainer: L.Trainer) -> None:
        for opt in self._optimizers(trainer):
            if in_train_mode(opt):
                opt.eval()

    def _to_train(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        optimizers = self._optimizers(trainer)
        if self._resume_weights is not None:
            self._restore_resume_weights(optimizers, pl_module)
        for opt in optimizers:
            _sync_added_groups(opt)
            if not in_train_mode(opt):
                opt.train()

    def _restore_resume_weights(self, optimizers: list[Any], pl_module: L.LightningModule) -> None:
        weights, self._resume_weights = self._resume_weights, None
        if weights is None:
            return
        names: dict[torch.Tensor, str] = {p: n for n, p in pl_module.named_parameters()}
        with torch.no_grad():
            for opt in optimizers:
                if in_train_mode(opt):
                    continue
                params = _averaged_params(opt)
                if not all(names.get(p) in weights for p in params):
                    continue  # not the checkpoint's parameters: let train() derive them
                for p in params:
                    p.copy_(weights[names[p]])
                _mark_train_mode(opt)

    # -- phases ---------------------------------------------------------------------------------------------------

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.bn_recalibration_batches == 0 and _batch_norms(pl_module) and self._optimizers(trainer):
            rank_zero_warn(  # (once, by the first process, as Lightning's own callbacks warn)
                f"{type(pl_module).__name__} has BatchNorm layers and uses a schedule-free optimizer: their running "
                "statistics are those of the training weights, not of the averaged weights used for evaluation. "
                "Set ScheduleFreeCallback(bn_recalibration_batches=N) to recompute them before evaluation.",
                category=UserWarning,
            )

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._to_train(trainer, pl_module)

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        was_training = any(in_train_mode(opt) for opt in self._optimizers(trainer))
        self._to_eval(trainer)
        if was_training and not trainer.sanity_checking:
            self._recalibrate_batch_norm(trainer, pl_module)

    @override
    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._to_eval(trainer)

    @override
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._to_eval(trainer)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        was_training = any(in_train_mode(opt) for opt in self._optimizers(trainer))
        self._to_eval(trainer)
        if was_training:
            self._recalibrate_batch_norm(trainer, pl_module)

    # -- checkpoints ----------------------------------------------------------------------------------------------

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        training = [opt for opt in self._optimizers(trainer) if in_train_mode(opt)]
        if not training:
            return  # already in eval mode: what Lightning captured is the averaged point
        names: dict[torch.Tensor, str] = {p: n for n, p in pl_module.named_parameters()}
        params = [p for opt in training for p in _averaged_params(opt)]
        with torch.no_grad():
            if _eval_point_into(checkpoint, trainer, pl_module, training):
                train_point = [p.detach() for p in params]  # the live weights, unmoved: no copy
            else:
                train_point = self._eval_point_by_moving(checkpoint, trainer, training, params)
        if self.exact_resume:
            own = checkpoint.setdefault("callbacks", {}).setdefault(self.state_key, {})
            own["train_weights"] = {names[p]: w for p, w in zip(params, train_point) if p in names}

    @staticmethod
    def _eval_point_by_moving(
        checkpoint: dict[str, Any], trainer: L.Trainer, training: list[Any], params: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Any schedule-free optimizer, any strategy: copy the train point, let the optimizer's own ``eval()`` move the
        weights, capture the module and optimizer states again (copied: Lightning's capture shares storage with the
        live parameters), and put the copy back bit for bit. Returns the copy of the train point."""
        train_point = [p.detach().clone() for p in params]
        for opt in training:
            opt.eval()
        checkpoint["state_dict"] = {
            k: v.detach().clone() if isinstance(v, torch.Tensor) else v
            for k, v in trainer.strategy.lightning_module_state_dict().items()
        }
        states = checkpoint.get("optimizer_states")
        if states is not None:
            for i, opt in enumerate(trainer.optimizers):
                if opt in training:
                    states[i] = trainer.strategy.optimizer_state(opt)
        for p, saved in zip(params, train_point):
            p.copy_(saved)
        for opt in training:
            _mark_train_mode(opt)
        return train_point

    @override
    def state_dict(self) -> dict[str, Any]:
        # (filled in by on_save_checkpoint when a checkpoint is saved in train mode with exact_resume)
        return {"train_weights": None}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_weights = state_dict.get("train_weights")

    # -- BatchNorm ------------------------------------------------------------------------------------------------

    def _recalibrate_batch_norm(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.bn_recalibration_batches == 0:
            return
        norms = _batch_norms(pl_module)
        loader = trainer.train_dataloader
        if not norms or loader is None:
            return
        momenta = {m: m.momentum for m in norms}
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the recalibration batches
        was_training = pl_module.training
        pl_module.train()
        forward = self.bn_forward or _training_step
        with torch.no_grad(), _logs_discarded(trainer, pl_module):
            for i, batch in enumerate(itertools.islice(loader, self.bn_recalibration_batches)):
                batch = trainer.strategy.batch_to_device(batch)
                forward(pl_module, batch, i)
        for m, momentum in momenta.items():
            m.momentum = momentum
        pl_module.train(was_training)


def _eval_interpolation(optimizer: Any, group: dict[str, Any]) -> float | None:
    """The weight ``w`` of schedulefree's ``eval()``, which sets each parameter to ``lerp(y, z, w)`` (``x``, the
    averaged point, from the train point ``y`` and the state ``z``); None for an optimizer whose ``eval()`` is not
    known to be that interpolation."""
    import schedulefree

    if isinstance(optimizer, schedulefree.ScheduleFreeWrapper):
        return 1 - 1 / optimizer.momentum
    if type(optimizer) in (schedulefree.AdamWScheduleFree, schedulefree.RAdamScheduleFree):
        return 1 - 1 / group["betas"][0]
    if type(optimizer) is schedulefree.SGDScheduleFree:
        return 1 - 1 / group["momentum"]
    return None


def _eval_point_into(checkpoint: dict[str, Any], trainer: Any, pl_module: Any, training: list[Any]) -> bool:
    """One device or DDP (where Lightning's captured state dict holds the live tensors) and schedulefree's optimizers:
    compute the averaged point out of place, ``lerp(y, z, w)`` as ``eval()`` does in place (the same kernel, so the
    same bits), into the captured state dict, and mark the captured optimizer states as in eval mode. The live weights
    do not move; the one copy made is the averaged point itself. False (nothing changed) where that does not apply."""
    state = checkpoint.get("state_dict")
    if state is None or not plain_data_parallel(trainer.strategy):
        return False
    keys: dict[torch.Tensor, list[str]] = {}
    for name, p in pl_module.named_parameters(remove_duplicate=False):
        keys.setdefault(p, []).append(name)
    averaged = {}  # (nothing is written until every parameter's averaged point is known)
    for opt in training:
        for group in opt.param_groups:
            w = _eval_interpolation(opt, group)
            for p in group["params"]:
                z = opt.state.get(p, {}).get("z")
                if z is None:
                    continue
                if w is None or not keys.get(p) or not all(k in state for k in keys[p]):
                    return False
                averaged[p] = torch.lerp(p.detach(), z.to(p.device), w)
    for p, x in averaged.items():
        for k in keys[p]:
            state[k] = x
    for i, opt in enumerate(trainer.optimizers):
        saved = (checkpoint.get("optimizer_states") or [None] * (i + 1))[i]
        if opt in training and saved is not None:
            for group in saved.get("param_groups", []):
                if "train_mode" in group:
                    group["train_mode"] = False
    return True


def _batch_norms(module: nn.Module) -> list[Any]:
    return [m for m in module.modules() if isinstance(m, BatchNorm) and m.track_running_stats]


def _training_step(pl_module: L.LightningModule, batch: Any, batch_idx: int) -> Any:
    return pl_module.training_step(batch, batch_idx)


@contextlib.contextmanager
def _logs_discarded(trainer: L.Trainer, pl_module: L.LightningModule) -> Iterator[None]:
    """While the recalibration runs training steps, what they log (``self.log`` in ``training_step``) goes to a result
    collection of its own, discarded afterwards, instead of the running loop's metrics; the module's ``log`` methods
    are left as they are."""
    restore = logged_elsewhere(trainer, pl_module)
    try:
        yield
    finally:
        restore()
