"""The grokking signal for GrokAdamW, from what the module already logs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

__all__ = ["GrokkingSignalCallback"]


class GrokkingSignalCallback(Callback):
    """Feeds GrokAdamW the gap between the logged training and validation losses before every optimizer step.

    transformers' Trainer passes no signal unless the user wires ``grokking_signal_fns`` by hand. Here, by default,
    the last logged values of ``train_metric`` and ``val_metric`` (``trainer.callback_metrics``) go into each param
    group as ``train_loss`` / ``eval_loss``, and GrokAdamW computes its own signal from them:
    ``max(0, val - train) / max(val, train)``. Before the first validation there is no validation loss, so the signal
    is 0 and GrokAdamW uses ``alpha_init`` unchanged (upstream's rule for a missing loss); afterwards the last
    validation loss is used until the next validation (and after resuming from a checkpoint). Under DDP both losses are
    averaged across processes first, so every rank applies the same signal. With ``signal_fns`` (callables returning
    a float or None) those are used instead, as upstream's ``grokking_signal_fns`` (their mean).

    The signal applied at each step is logged as ``log_name`` (set it to None to not log).
    """

    def __init__(
        self,
        train_metric: str = "train_loss",
        val_metric: str = "val_loss",
        signal_fns: Sequence[Callable[[], float | None]] | None = None,
        log_name: str | None = "grokking_signal",
    ) -> None:
        self.train_metric, self.val_metric = train_metric, val_metric
        self.signal_fns = list(signal_fns) if signal_fns is not None else None
        self.log_name = log_name
        self.last_signal: float | None = None

    def _metric(self, trainer: L.Trainer, name: str, metrics: dict | None = None) -> float | None:
        value = (trainer.callback_metrics if metrics is None else metrics).get(name)
        if value is None:
            return None
        value = torch.as_tensor(value, dtype=torch.float32, device=trainer.strategy.root_device)
        if trainer.world_size > 1:
            value = trainer.strategy.reduce(value, reduce_op="mean")
        return float(value)

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # put the new validation loss into the groups now, so a checkpoint written after this validation holds it
        if trainer.sanity_checking or self.signal_fns is not None:
            return
        val = self._metric(trainer, self.val_metric)
        for optimizer in trainer.optimizers:
            for group in getattr(optimizer, "param_groups", []):
                if "grokking_signal_fns" in group and val is not None:
                    group["eval_loss"] = val

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        groups = [g for g in getattr(optimizer, "param_groups", []) if "grokking_signal_fns" in g]
        if not groups:
            return
        if self.signal_fns is not None:
            for group in groups:
                group["grokking_signal_fns"] = self.signal_fns
            values = [v for v in (fn() for fn in self.signal_fns) if v is not None]
            signal = sum(values) / len(values) if values else None
        else:
            metrics = trainer.callback_metrics  # a property that builds a dict: read it once per step
            train, val = (
                self._metric(trainer, self.train_metric, metrics),
                self._metric(trainer, self.val_metric, metrics),
            )
            for group in groups:
                group["grokking_signal_fns"] = None
                # keep the last value until a new one is logged: the groups travel in the optimizer's state_dict,
                # so a resumed run uses the validation loss of before the interruption, as the uninterrupted one
                if train is not None:
                    group["train_loss"] = train
                if val is not None:
                    group["eval_loss"] = val
            from lightning_optims.optimizers import grokking_signal  # imports grokadamw, only when it is used

            signal = grokking_signal(groups[0].get("train_loss"), groups[0].get("eval_loss"))
        self.last_signal = signal
        if self.log_name and signal is not None:
            pl_module.log(self.log_name, float(signal), on_step=True, on_epoch=False, batch_size=1)  # (as grad_norm)
