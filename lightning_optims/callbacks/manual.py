"""Manual optimization with the mixin: Lightning steps no scheduler there, so a forgotten ``sch.step()`` would leave
the learning rate at its first value without a word. This callback refuses that after the first step."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

__all__ = ["ManualSchedulerCheck"]


class ManualSchedulerCheck(Callback):
    """Added by ``OptimizerMixin`` when ``automatic_optimization`` is off and the schedule steps per optimizer step:
    after every training batch, the scheduler must have been stepped as often as the optimizer (Lightning's manual
    optimization documents ``self.lr_schedulers().step()`` as the module's job)."""

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if pl_module.automatic_optimization:
            return
        for config in trainer.lr_scheduler_configs:
            if config.interval != "step" or not hasattr(config.scheduler, "last_epoch"):
                continue
            steps = trainer.global_step
            if config.scheduler.last_epoch < steps // max(config.frequency, 1):
                raise MisconfigurationException(
                    f"lr_scheduler_type={_lr_scheduler_type(pl_module)!r} was stepped "
                    f"{config.scheduler.last_epoch} times in {steps} optimizer steps: in manual optimization "
                    "Lightning does not step schedulers, so the learning rate would stay where it is. Call "
                    "self.lr_schedulers().step() after each opt.step() in training_step (or use "
                    "lr_scheduler_type='constant')"
                )


def _lr_scheduler_type(module: Any) -> str:
    """The ``lr_scheduler_type`` setting of a module with :class:`~lightning_optims.OptimizerMixin`."""
    return module.optimizer_arguments.lr_scheduler_type
