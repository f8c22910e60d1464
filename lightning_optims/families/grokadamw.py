"""GrokAdamW (grokadamw): ``grokadamw``.

- :class:`GrokAdamW`: ``grokadamw.GrokAdamW``'s update (per-tensor clipping, per-index beta1 schedule, grokking EMA),
  with its state in ``optimizer.state`` on the parameter's device (upstream keeps it in ``param_groups`` keyed by
  Parameter objects, on the CPU, so ``state_dict()`` loses it and every step copies it to the CPU and back);
- :class:`ShardedGrokAdamW`: the same update on each process's part of sharded parameters;
- :class:`GrokkingSignalCallback`: the grokking signal from what the module already logs;
- :data:`SPECS`: transformers' defaults and settings.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_optims.compat import log_when_written
from lightning_optims.distributed.placements import local
from lightning_optims.distributed.sums import Along, ShardSums
from lightning_optims.finite import read_at_verdict
from lightning_optims.optim_args import Arg
from lightning_optims.spec import WEIGHT_DECAY, BuildContext, OptimizerSpec, Sharding

__all__ = ["SPECS", "GrokAdamW", "GrokkingSignalCallback", "ShardedGrokAdamW", "grokking_signal"]


def _import_keeping_root_logger(name: str) -> Any:
    """grokadamw runs ``logging.basicConfig(level=INFO)`` when imported, turning on INFO output for the whole
    program; import it and put the root logger back as it was."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    module = importlib.import_module(name)
    root.handlers[:] = handlers
    root.setLevel(level)
    return module


if TYPE_CHECKING:
    import grokadamw
else:
    grokadamw = _import_keeping_root_logger("grokadamw")


def grokking_signal(train_loss: float | None, eval_loss: float | None) -> float:
    """grokadamw's default signal: the relative gap ``max(0, eval - train) / max(eval, train)``; 0 without both."""
    return grokadamw.GrokAdamW._default_grokking_signal(train_loss, eval_loss)


class GrokAdamW(grokadamw.GrokAdamW):
    """``grokadamw.GrokAdamW`` with its state where PyTorch keeps optimizer state (``self.state``, on the
    parameter's device); the arithmetic of a step is upstream's, line for line.

    ``global_index`` maps a parameter to its index among its group's parameters that have a gradient, for an
    optimizer that steps one parameter of a larger group at a time (sharded training): beta1 depends on it.
    """

    global_index: dict[Any, int]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.global_index = {}
        super().__init__(*args, **kwargs)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for p, i, group, signal in self._work():
            if group["gradient_clipping"] > 0:
                torch.nn.utils.clip_grad_norm_(p, group["gradient_clipping"])  # per tensor, in place
            self._update(p, p.grad, self._state(p), i, group, signal)
        return loss

    def _work(self) -> list[tuple[torch.Tensor, int, dict[str, Any], float | None]]:
        """Each parameter with a gradient, its index (among its group's parameters with a gradient, upstream's; or
        its index in a larger group when one parameter is stepped at a time), its group and the group's signal."""
        work = []
        for group in self.param_groups:
            signal = self._compute_grokking_signal(group)
            params = [p for p in group["params"] if p.grad is not None]
            work += [(p, self.global_index.get(p, i), group, signal) for i, p in enumerate(params)]
        return work

    def _state(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
            state["grok_ema"] = torch.zeros_like(p)
        return state

    @staticmethod
    def _update(
        p: torch.Tensor, grad: Any, state: dict[str, Any], i: int, group: dict[str, Any], signal: float | None
    ) -> None:
        """grokadamw's update of one parameter after its per-tensor clipping (``p``, ``grad`` and the state tensors:
        whole tensors, or one process's rows of them: every operation here is elementwise)."""
        beta1, beta2 = group["betas"]
        exp_avg, exp_avg_sq, grok_ema = (local(state[k]) for k in ("exp_avg", "exp_avg_sq", "grok_ema"))
        state["step"] += 1
        layer_beta1 = beta1 * (1 - group["gamma"]) ** i
        alpha = group["alpha_init"]
        if signal is not None:
            alpha = alpha * math.exp(-group["grokking_signal_decay_rate"] * signal)
        grok_ema.mul_(alpha).add_(grad, alpha=1 - alpha)
        grok_grad = grad + group["lamb"] * grok_ema
        exp_avg.mul_(layer_beta1).add_(grok_grad, alpha=1 - layer_beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grok_grad, grok_grad, value=1 - beta2)
        bias_correction1 = 1 - beta1 ** state["step"]
        bias_correction2 = 1 - beta2 ** state["step"]
        step_size = group["lr"] * math.sqrt(bias_correction2) / bias_correction1
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.addcdiv_(exp_avg, exp_avg_sq.sqrt().add_(group["eps"]), value=-step_size)


class ShardedGrokAdamW(GrokAdamW):
    """:class:`GrokAdamW` for parameters that FSDP2 shards on dim 0 over one mesh dimension: each process steps its
    rows. The only whole-tensor term of its update, the per-tensor gradient clipping, takes every parameter's norm
    from one all-reduce per step (:class:`~lightning_optims.distributed.sums.ShardSums`); the rest is elementwise. The
    state (``DTensor`` s like the parameter) is created with the optimizer, for Lightning's distributed checkpoint."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stepping = True
        for group in self.param_groups:
            for p in group["params"]:
                self._state(p)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_stepping"):  # (a group added during training: BaseFinetuning unfreezing a backbone)
            raise TypeError("ShardedGrokAdamW cannot take a param group added during training")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [(p, local(p.grad), i, group, signal) for p, i, group, signal in self._work()]
        # torch's clip_grad_norm_ of each tensor, its norm summed over the shards of every tensor at once
        clipped = [w for w in work if w[3]["gradient_clipping"] > 0]
        squares = ShardSums().sums([Along(torch.linalg.vector_norm(grad, 2.0).square(), p) for p, grad, *_ in clipped])
        for (_, grad, _, group, _), square in zip(clipped, squares):
            grad.mul_(torch.clamp(group["gradient_clipping"] / (square.sqrt() + 1e-6), max=1.0))
        for p, grad, i, group, signal in work:
            self._update(local(p), grad, self.state[p], i, group, signal)
        return loss


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

    def _metric(self, trainer: L.Trainer, name: str, metrics: dict | None = None) -> torch.Tensor | None:
        """The logged metric ``name`` (averaged over the processes), on the device: reading it is a host sync."""
        value = (trainer.callback_metrics if metrics is None else metrics).get(name)
        if value is None:
            return None
        value = torch.as_tensor(value, dtype=torch.float32, device=trainer.strategy.root_device)
        if trainer.world_size > 1:
            value = trainer.strategy.reduce(value, reduce_op="mean")
        return value

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # put the new validation loss into the groups now, so a checkpoint written after this validation holds it
        if trainer.sanity_checking or self.signal_fns is not None:
            return
        value = self._metric(trainer, self.val_metric)
        val = None if value is None else float(value)  # (a host sync per validation)
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
            # the validation loss went into the groups when validation ended (on_validation_end); the training loss
            # is read at the step's one host sync (the package's verdict, before the optimizer steps), not apart
            for group in groups:
                group["grokking_signal_fns"] = None
            train = self._metric(trainer, self.train_metric)

            def apply(value: float | None) -> None:
                # keep the last value until a new one is logged: the groups travel in the optimizer's state_dict,
                # so a resumed run uses the losses of before the interruption, as the uninterrupted one
                if value is not None:
                    for group in groups:
                        group["train_loss"] = value
                self._signal(pl_module, grokking_signal(groups[0].get("train_loss"), groups[0].get("eval_loss")))

            if train is None:
                apply(None)
            else:
                read_at_verdict(pl_module, train, apply)
            return
        self._signal(pl_module, signal)

    def _signal(self, pl_module: L.LightningModule, signal: float | None) -> None:
        self.last_signal = signal
        if self.log_name and signal is not None:
            log_when_written(pl_module, self.log_name, float(signal))  # (as grad_norm: where the loggers write)


# transformers' defaults (trainer_optimizer._get_grokadamw); transformers passes neither betas nor eps
GROKADAMW_ARGUMENTS = (
    Arg("alpha_init", float, 0.98),
    Arg("lamb", float, 2.0),
    Arg("gamma", float, 0.1),
    Arg("grokking_signal_decay_rate", float, 0.1),
    Arg("gradient_clipping", float, 1.0),
)


def _grokadamw(ctx: BuildContext) -> dict:
    return dict(ctx.optim_args)


SPECS = [
    OptimizerSpec(
        name="grokadamw",
        target="lightning_optims.families.grokadamw:GrokAdamW",
        family="grokadamw",
        arguments=GROKADAMW_ARGUMENTS,
        kwargs=_grokadamw,
        uses=WEIGHT_DECAY,
        packages=("grokadamw",),
        sharding=Sharding("optimizer", optimizer="lightning_optims.families.grokadamw:ShardedGrokAdamW"),
        callbacks=("lightning_optims.families.grokadamw:GrokkingSignalCallback",),
        description="GrokAdamW (grokadamw's update, state in optimizer.state)",
    )
]
