"""A non-finite loss stops every process at the same step, with the package's error.

On one process a non-finite loss stops training before backward (:class:`NonFiniteLossError`: no weight changed).
With several processes the loss of one of them alone must not stop it there: the others would enter backward and
wait in its collectives for a process that left (NCCL hangs, gloo fails with "Connection closed by peer"). Where
every process reaches the same verdict on the gradients without a collective of ours (DDP's gradients are averaged
over the processes, FSDP2's norm is reduced over the mesh, the in-backward engine agrees on a flag it sends anyway)
the check is deferred to that verdict: the non-finite loss makes the summed gradient non-finite everywhere, every
process raises at the same step, and the process whose loss it was raises :class:`NonFiniteLossError` naming it.
Other multi-process strategies (FSDP1, DeepSpeed: their gradient norm is not measured here) agree on the loss with
one all-reduce of a flag per step (``Strategy.reduce_boolean_decision``).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.rank_zero import WarningCache

from lightning_optims.distributed.layout import plain_data_parallel
from lightning_optims.errors import NonFiniteGradientError, NonFiniteLossError

__all__ = ["check_loss", "gradient_error", "gradients_were_finite"]

_ATTRIBUTE = "_lightning_optims_non_finite_loss"  # (on the module: this process's non-finite loss, deferred)
_warnings = WarningCache()


def _gradients_agree(module: Any) -> bool:
    strategy = module.trainer.strategy
    return (
        module.optimizer_spec.updates_in_backward
        or plain_data_parallel(strategy)
        or isinstance(strategy, ModelParallelStrategy)
    )


def check_loss(module: Any, loss: torch.Tensor, when: str) -> None:
    """Stop on a non-finite ``loss`` (see the module docstring): raise here, or defer to the gradients' verdict."""
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
    setattr(module, _ATTRIBUTE, None)
    return NonFiniteLossError(
        f"non-finite loss ({value}) at global step {module.global_step} on this process (rank "
        f"{module.trainer.global_rank}): the gradient summed over the processes was non-finite, and every process "
        f"stops at this step ({error})"
    )


def gradients_were_finite(module: Any) -> None:
    """After a step whose gradients were finite: a deferred non-finite loss of this process did not reach them (a
    constant inf term); it is reported, and training goes on as on every other process."""
    value = getattr(module, _ATTRIBUTE, None)
    if value is None:
        return
    setattr(module, _ATTRIBUTE, None)
    _warnings.warn(
        f"non-finite loss ({value}) on process {module.trainer.global_rank} at global step {module.global_step}, with "
        "finite gradients: the step was taken on every process (the loss does not reach the weights)"
    )
