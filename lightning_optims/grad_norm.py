"""The global gradient norm transformers' Trainer logs as ``grad_norm``: the L2 norm over every parameter's gradient
before clipping, the same number on every process.

Optimizers that consume the gradients inside backward (LOMO / AdaLomo, the layer-wise ones) measure it as the
gradients pass and answer :meth:`grad_norm`; for the others it is computed here from the gradients left after
backward, the way torch's ``clip_grad_norm_`` computes it (so clipping with it clips exactly as that function does).

Under tensor parallelism the gradients need not share one mesh: a user's plan commonly parallelises the decoder
layers only, leaving the embeddings, norms and head as plain tensors (the same on every process of the tensor-parallel
group), and a model may hold ``DTensor`` s on several meshes. torch's ``get_total_norm`` refuses such a mix; here each
mesh's gradients (and the plain ones) are reduced on their own and the squares summed, as transformers'
``_mixed_mesh_grad_norm`` does.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Replicate

__all__ = ["clip_with_norm", "gradient_norm", "norm_value"]


def _by_mesh(params: Iterable[torch.Tensor]) -> dict[Any, list[torch.Tensor]]:
    """The parameters that have a gradient, by the mesh of the gradient (``None``: plain tensors)."""
    groups: dict[Any, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
    return groups


def _grads(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [g for p in params if (g := p.grad) is not None]


def gradient_norm(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """``torch.nn.utils.get_total_norm`` of the gradients of ``params`` (those that have one). Under FSDP2 the
    gradients are ``DTensor`` s and so is the result (reduced over their mesh); over several meshes, or ``DTensor`` s
    and plain tensors together, a plain tensor holding the global norm. A zero when no gradient exists."""
    groups = _by_mesh(params)
    if not groups:
        return torch.zeros(())
    if len(groups) == 1:
        (group,) = groups.values()
        return torch.nn.utils.get_total_norm(_grads(group), 2.0)
    norms = [norm_value(torch.nn.utils.get_total_norm(_grads(group), 2.0)) for group in groups.values()]
    device = norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), 2.0)


def norm_value(norm: torch.Tensor) -> torch.Tensor:
    """The norm as a plain tensor (a ``DTensor`` norm is gathered: every process then holds the global value)."""
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def clip_with_norm(params: Iterable[torch.Tensor], max_norm: float, total: torch.Tensor) -> None:
    """``torch.nn.utils.clip_grads_with_norm_`` with the norm :func:`gradient_norm` returned, also when the gradients
    lie on several meshes (each mesh's gradients are scaled by the same factor, given on their mesh)."""
    params = list(params)
    groups = _by_mesh(params)
    if len(groups) <= 1 or isinstance(total, DTensor):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return
    for mesh, group in groups.items():
        on_mesh = total
        if mesh is not None:
            on_mesh = DTensor.from_local(total, mesh, [Replicate()] * mesh.ndim, run_check=False)
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, on_mesh)
