"""Layer-wise optimizers (``*_layerwise``): one inner optimizer per parameter, stepped during backward."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers.trainer_pt_utils import LayerWiseDummyOptimizer

__all__ = ["LayerwiseOptimizer", "build_layerwise"]


class LayerwiseOptimizer(LayerWiseDummyOptimizer):
    """transformers' ``LayerWiseDummyOptimizer``, fit for Lightning's automatic loop.

    The updates happen in post-accumulate-grad hooks. Unlike transformers' dummy, :meth:`step` runs the closure it is
    given (Lightning passes ``training_step`` + backward as the closure), and the hooks can be removed.
    """

    def __init__(self, optimizer_dict: dict[torch.Tensor, torch.optim.Optimizer], **kwargs: Any) -> None:
        super().__init__(optimizer_dict=optimizer_dict, **kwargs)
        self._hook_handles: list[Any] = []

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def remove_hooks(self) -> None:
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()


def build_layerwise(optimizer_cls: type, param_groups: list[dict[str, Any]], kwargs: dict[str, Any]) -> LayerwiseOptimizer:
    """transformers' layer-wise construction: an optimizer per parameter with its group's options."""
    optimizer_dict: dict[torch.Tensor, torch.optim.Optimizer] = {}
    for group in param_groups:
        options = {k: v for k, v in group.items() if k != "params"}
        for param in group["params"]:
            optimizer_dict[param] = optimizer_cls([{"params": [param], **options}], **kwargs)

    def optimizer_hook(param: torch.Tensor) -> None:
        if param.grad is not None:
            optimizer_dict[param].step()
            optimizer_dict[param].zero_grad()

    optimizer = LayerwiseOptimizer(optimizer_dict=optimizer_dict, **kwargs)
    for param in optimizer_dict:
        if param.requires_grad:
            optimizer._hook_handles.append(param.register_post_accumulate_grad_hook(optimizer_hook))
    return optimizer
