"""A non-finite loss or gradient stops every process at the same step, with the package's error, at the cost of one
host sync per optimizer step.

A host sync (``.item()``, ``bool(tensor)``) makes the host wait until the device has finished everything queued; one
per step is what transformers' Trainer pays (its NaN / inf loss filter). Here the loss is not checked when backward
starts: its finite flag stays on the device (:func:`defer_loss`) until the step's one sync, the **verdict**, which
reads it together with the gradients' flags, before the optimizer writes anything (:func:`verdict`: in
``configure_gradient_clipping`` for an optimizer stepped after backward; in the in-backward and layer-wise engines,
whose updates skip a non-finite parameter on the device, at the end of backward). Manual optimization of an optimizer
stepped after backward, and the strategies whose gradient norm is not measured here (FSDP1, DeepSpeed), check the
loss when backward starts (:func:`check_loss`), their one sync.

On one process a non-finite loss stops training (:class:`NonFiniteLossError`: no weight changed). With several
processes the loss of one of them alone must not stop it there: the others would wait in its collectives for a
process that left (NCCL hangs, gloo fails with "Connection closed by peer"). Where every process reaches the same
verdict on the gradients without a collective of ours (DDP's gradients are averaged over the processes, FSDP2's norm
is reduced over the mesh, the in-backward engine agrees on a flag it sends anyway) the loss is judged with the
gradients: the non-finite loss makes the summed gradient non-finite everywhere, every process raises at the same
step, and the process whose loss it was raises :class:`NonFiniteLossError` naming it. Other multi-process
strategies agree on the loss with one all-reduce of a flag per step (``Strategy.reduce_boolean_decision``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.rank_zero import WarningCache

from lightning_optims.distributed.layout import plain_data_parallel
from lightning_optims.errors import NonFiniteGradientError, NonFiniteLossError

__all__ = [
    "after_backward",
    "before_backward",
    "check_loss",
    "defer_loss",
    "deferred_losses",
    "gradient_error",
    "gradients_were_finite",
    "layerwise_verdict",
    "norm_verdict",
    "note_loss",
    "read_at_verdict",
    "verdict",
]

_ATTRIBUTE = "_lightning_optims_non_finite_loss"  # (on the module: this process's non-finite loss, deferred)
_LOSSES = "_lightning_optims_losses"  # (on the module: this step's losses, awaiting the verdict)
_REQUESTS = "_lightning_optims_requests"  # (on the module: numbers a callback reads at the verdict)
_warnings = WarningCache()


def _gradients_agree(module: Any) -> bool:
    strategy = module.trainer.strategy
    return (
        module.optimizer_spec.updates_in_backward
        or plain_data_parallel(strategy)
        or isinstance(strategy, ModelParallelStrategy)
    )


def verdict_follows(module: Any) -> bool:
    """Whether ``configure_gradient_clipping`` reads this step's flags before the optimizer writes (automatic
    optimization, the gradient norm measured: one device, DDP, ModelParallel)."""
    strategy = module.trainer.strategy
    return module.automatic_optimization and (
        plain_data_parallel(strategy) or isinstance(strategy, ModelParallelStrategy)
    )


def before_backward(module: Any, loss: torch.Tensor, optimizer: Any) -> None:
    """The loss of an optimizer stepped after backward (or layer-wise): kept for the step's verdict where one follows
    (a layer-wise engine, on one process, skips every parameter on the device if it is not finite), else checked now
    (one host sync)."""
    if not verdict_follows(module):
        check_loss(module, loss, "before backward: no weight was changed by this step")
        return
    defer_loss(module, loss)
    if module.trainer.world_size == 1 and hasattr(optimizer, "start_backward"):
        optimizer.start_backward(torch.isfinite(loss.detach()).all())


def norm_verdict(module: Any, norm: torch.Tensor, checked: bool = True) -> None:
    """The step's one host sync for an optimizer stepped after backward: the loss and the gradient norm finite, read
    together before the optimizer writes (``checked`` False: a GradScaler's step, which skips a non-finite one)."""
    _, norm_finite = verdict(module, deferred_losses(module), [torch.isfinite(norm)])
    if checked and not norm_finite:
        raise gradient_error(
            module,
            NonFiniteGradientError(
                f"non-finite gradient norm ({norm.item()}) at global step {module.global_step}: the optimizer step "
                "was not taken and training stops here"
            ),
        )
    gradients_were_finite(module)


def after_backward(module: Any, optimizer: Any) -> None:
    """A layer-wise engine's steps in backward where no verdict follows (manual optimization): its verdict now, so a
    non-finite gradient it skipped on the device is not passed over."""
    if hasattr(optimizer, "nonfinite") and not verdict_follows(module):
        layerwise_verdict(module, optimizer)


def layerwise_verdict(module: Any, engine: Any) -> None:
    """A layer-wise step's one host sync: the loss and the gradients finite (each parameter with a non-finite one
    was skipped on the device; its replaced state is put back here, before the error)."""
    bad = engine.nonfinite()
    read = verdict(module, deferred_losses(module), [] if bad is None else [~bad])
    if not all(read[1:]):
        engine.after_nonfinite()
        raise gradient_error(
            module,
            NonFiniteGradientError(
                f"non-finite gradient in a layer-wise optimizer at global step {module.global_step}: the parameters "
                "it reached were not updated (the others were) and training stops here"
            ),
        )
    gradients_were_finite(module)


def defer_loss(module: Any, loss: torch.Tensor) -> None:
    """Keep ``loss`` (detached, on the device) for the step's verdict: no host sync here. Several backwards before one
    optimizer step (gradient accumulation) keep one each."""
    losses = getattr(module, _LOSSES, None)
    if losses is None:
        losses = []
        setattr(module, _LOSSES, losses)
    losses.append(loss.detach())


def deferred_losses(module: Any) -> list[torch.Tensor]:
    """The losses kept since the last verdict (and forget them)."""
    losses = getattr(module, _LOSSES, None) or []
    setattr(module, _LOSSES, None)
    return losses


def losses_finite(losses: list[torch.Tensor], device: Any) -> torch.Tensor:
    """Whether every loss is finite, a bool on the device (true without a loss)."""
    if not losses:
        return torch.ones((), dtype=torch.bool, device=device)
    return torch.stack([torch.isfinite(loss).all().to(device) for loss in losses]).all()


def read_at_verdict(module: Any, value: torch.Tensor, then: Callable[[float], None]) -> None:
    """Hand ``then`` the number ``value`` (a 0-d tensor on the device) as a float: at this step's verdict, in its one
    host sync, where a verdict follows before the optimizer steps (an ``OptimizerMixin`` module in automatic
    optimization); else now (a host sync of its own)."""
    if hasattr(module, "optimizer_arguments") and verdict_follows(module):
        requests = getattr(module, _REQUESTS, None) or []
        requests.append((value.detach(), then))
        setattr(module, _REQUESTS, requests)
    else:
        then(float(value))


def verdict(module: Any, losses: list[torch.Tensor], flags: list[torch.Tensor]) -> list[bool]:
    """The step's one host sync: whether the deferred ``losses`` were finite, and each of ``flags`` (bools or 0-d
    tensors on the device), read together, with the numbers callbacks asked for (:func:`read_at_verdict`). Remembers
    a non-finite loss of this process for the error or warning that follows (its value read now: only on that path).
    Returns ``[losses finite, *flags]``."""
    requests = getattr(module, _REQUESTS, None) or []
    setattr(module, _REQUESTS, None)
    device = flags[0].device if flags else losses[0].device if losses else torch.device("cpu")
    read = torch.stack(
        [
            losses_finite(losses, device).to(torch.float64),
            *(f.to(device=device, dtype=torch.float64) for f in flags),
            *(v.to(device=device, dtype=torch.float64) for v, _ in requests),
        ]
    ).tolist()
    for (_, then), number in zip(requests, read[1 + len(flags) :]):
        then(number)
    values = [bool(v) for v in read[: 1 + len(flags)]]
    if losses:
        setattr(module, _ATTRIBUTE, None)
    if not values[0]:
        bad = next(loss for loss in losses if not bool(torch.isfinite(loss).all()))
        setattr(module, _ATTRIBUTE, bad.float().mean().item())
    return values


def note_loss(module: Any, loss: torch.Tensor, was_finite: bool) -> None:
    """Remember this process's loss where an engine's own verdict found it non-finite (its value read now: only on
    that path)."""
    setattr(module, _ATTRIBUTE, None if was_finite else loss.detach().float().mean().item())


def loss_error(module: Any, when: str) -> NonFiniteLossError:
    """One process's non-finite loss, found by the verdict (:func:`verdict`)."""
    value = getattr(module, _ATTRIBUTE, None)
    setattr(module, _ATTRIBUTE, None)
    return NonFiniteLossError(
        f"non-finite loss ({value}) at global step {module.global_step} ({when}); training stops here"
    )


def check_loss(module: Any, loss: torch.Tensor, when: str) -> None:
    """Stop on a non-finite ``loss`` now (see the module docstring): raise here, or defer to the gradients' verdict.
    One host sync: for the paths that have no verdict of their own."""
    finite = bool(torch.isfinite(loss.detach()).all())
    value = None if finite else loss.detach().float().mean().item()
    setattr(module, _ATTRIBUTE, None)
    trainer = module.trainer
    if trainer.world_size > 1 and _gradients_agree(module):
        setattr(module, _ATTRIBUTE, value)
        return
    if trainer.world_size > 1:
        everywhere = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not everywhere:
            where = "on this process" if not finite else "on another process"
            raise NonFiniteLossError(
                f"non-finite loss {where} at global step {module.global_step} ({when}); every process stops here"
            )
        return
    if not finite:
        raise NonFiniteLossError(
            f"non-finite loss ({value}) at global step {module.global_step} ({when}); training stops here"
        )


def gradient_error(module: Any, error: NonFiniteGradientError) -> FloatingPointError:
    """The error to raise for a non-finite gradient: ``error``, or, on the process whose loss was non-finite (a
    deferred check), :class:`NonFiniteLossError` naming it."""
    value = getattr(module, _ATTRIBUTE, None)
    if value is None:
        return error
    if module.trainer.world_size == 1:
        return loss_error(module, "before any weight was changed by this step")
    setattr(module, _ATTRIBUTE, None)
    return NonFiniteLossError(
        f"non-finite loss ({value}) at global step {module.global_step} on this process (rank "
        f"{module.trainer.global_rank}): the gradient summed over the processes was non-finite, and every process "
        f"stops at this step ({error})"
    )


def gradients_were_finite(module: Any) -> None:
    """After a step whose gradients were finite: a deferred non-finite loss of this process did not reach them (a
    constant inf term); it is reported, and training goes on as on every other process. On one process it stops
    training (nothing was written: the verdict came first)."""
    value = getattr(module, _ATTRIBUTE, None)
    if value is None:
        return
    if module.trainer.world_size == 1:
        raise loss_error(module, "before any weight was changed by this step")
    setattr(module, _ATTRIBUTE, None)
    _warnings.warn(
        f"non-finite loss ({value}) on process {module.trainer.global_rank} at global step {module.global_step}, with "
        "finite gradients: the step was taken on every process (the loss does not reach the weights)"
    )
