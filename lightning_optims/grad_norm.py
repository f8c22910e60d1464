"""The global gradient norm transformers' Trainer logs as ``grad_norm``: the L2 norm over every parameter's gradient
before clipping, the same number on every process.

Optimizers that consume the gradients inside backward (LOMO / AdaLomo, the layer-wise ones) measure it as the
gradients pass and answer :meth:`grad_norm`; for the others it is computed here from the gradients left after
backward, the way torch's ``clip_grad_norm_`` computes it (so clipping with it clips exactly as that function does).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor

__all__ = ["gradient_norm", "norm_value"]


def gradient_norm(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """``torch.nn.utils.get_total_norm`` of the gradients of ``params`` (those that have one). Under FSDP2 the
    gradients are ``DTensor`` s and so is the result (reduced over their mesh); a zero when no gradient exists."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads, 2.0)


def norm_value(norm: torch.Tensor) -> torch.Tensor:
    """The norm as a plain tensor (a ``DTensor`` norm is gathered: every process then holds the global value)."""
    return norm.full_tensor() if isinstance(norm, DTensor) else norm
