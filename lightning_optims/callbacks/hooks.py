"""Removes the gradient hooks of in-backward optimizers when a fit ends, normally or by an exception."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

__all__ = ["GradientHookCleanup"]


class GradientHookCleanup(Callback):
    """Lightning calls a module's ``teardown`` only when ``fit`` ends normally; callbacks also hear ``on_exception``.
    Either way the hooks go, so the module can be fitted again, trained with another optimizer, or pickled."""

    @staticmethod
    def _remove(trainer: L.Trainer) -> None:
        for optimizer in trainer.optimizers:
            remove = getattr(optimizer, "remove_hooks", None)
            if callable(remove):
                remove()

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._remove(trainer)

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._remove(trainer)
