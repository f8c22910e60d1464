"""Counters of what a piece of work moves or allocates, from tensor sizes (deterministic, never timed).

:class:`CollectiveCounter`: the calls and bytes of every ``torch.distributed`` collective a process issues, by kind.
:class:`AllocatedBytes`: the bytes of the tensors aten operations allocate.

Deterministic (computed from tensor sizes, never timed). While active it wraps the two doors collectives go through:
the ``torch.distributed`` functions (what FSDP2 and this package call: ``all_gather_into_tensor``,
``reduce_scatter_tensor``, ``all_reduce``...) and the functional collective ops DTensor issues when it redistributes
(``torch.ops._c10d_functional``: a ``full_tensor()``, a norm reduced over the mesh). Bytes are the payload of each
call: the tensor reduced, the gathered output, the scattered input.
"""

from __future__ import annotations

import functools
import inspect
from collections import Counter
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from torch.utils._python_dispatch import TorchDispatchMode

# torch.distributed function -> (kind, the parameter that holds the payload)
_FUNCTIONS = {
    "all_reduce": ("all_reduce", "tensor"),
    "all_gather_into_tensor": ("all_gather", "output_tensor"),
    "all_gather_single": ("all_gather", "output_tensor"),  # (what FSDP2 calls)
    "all_gather": ("all_gather", "tensor_list"),
    "reduce_scatter_tensor": ("reduce_scatter", "input"),
    "reduce_scatter_single": ("reduce_scatter", "input"),  # (what FSDP2 calls)
    "reduce_scatter": ("reduce_scatter", "input_list"),
    "broadcast": ("broadcast", "tensor"),
    "gather": ("gather", "tensor"),  # (what this process sends)
    "all_to_all_single": ("all_to_all", "input"),
}
# torch.ops._c10d_functional op -> (kind, payload factor: the group size for a gather's output)
_OPS = {
    "all_reduce": ("all_reduce", False),
    "all_reduce_coalesced": ("all_reduce", False),
    "all_gather_into_tensor": ("all_gather", True),
    "all_gather_into_tensor_coalesced": ("all_gather", True),
    "reduce_scatter_tensor": ("reduce_scatter", False),
    "reduce_scatter_tensor_coalesced": ("reduce_scatter", False),
    "broadcast": ("broadcast", False),
    "all_to_all_single": ("all_to_all", False),
}


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


class CollectiveCounter:
    """``calls[kind]`` and ``bytes[kind]`` of the collectives issued inside ``with CollectiveCounter() as c:``."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        self._saved: list[tuple[Any, str, Any]] = []
        self._depth = 0

    def _counted(self, original: Any, kind: str, payload: int, *args: Any, **kwargs: Any) -> Any:
        """Count the outermost collective only (one implemented with another is one call)."""
        if self._depth == 0:
            self.calls[kind] += 1
            self.bytes[kind] += payload
        self._depth += 1
        try:
            return original(*args, **kwargs)
        finally:
            self._depth -= 1

    def _wrap_function(self, original: Any, kind: str, parameter: str) -> Any:
        signature = inspect.signature(original)

        @functools.wraps(original)
        def counted(*args: Any, **kwargs: Any) -> Any:
            payload = _nbytes(signature.bind(*args, **kwargs).arguments.get(parameter))
            return self._counted(original, kind, payload, *args, **kwargs)

        return counted

    def _wrap_op(self, original: Any, kind: str, gathers: bool) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            payload = _nbytes(args[0])
            if gathers:  # (input, group_size, group_name): the output is group_size times the input
                payload *= int(args[1])
            return self._counted(original, kind, payload, *args, **kwargs)

        return counted

    def _patch(self, owner: Any, name: str, replacement: Any) -> None:
        self._saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, replacement)

    def __enter__(self) -> CollectiveCounter:
        for name, (kind, parameter) in _FUNCTIONS.items():
            if not hasattr(c10d, name):
                continue  # (all_gather_single / reduce_scatter_single: FSDP2's from torch 2.9; 2.6 calls the others)
            wrapped = self._wrap_function(getattr(c10d, name), kind, parameter)
            self._patch(c10d, name, wrapped)
            self._patch(dist, name, wrapped)
        functional = torch.ops._c10d_functional
        for name, (kind, gathers) in _OPS.items():
            if not hasattr(functional, name):
                continue
            self._patch(functional, name, self._wrap_op(getattr(functional, name), kind, gathers))
        return self

    def __exit__(self, *exc: Any) -> None:
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()

    def snapshot(self) -> dict[str, dict[str, int]]:
        return {"calls": dict(self.calls), "bytes": dict(self.bytes)}


class AllocatedBytes(TorchDispatchMode):
    """The bytes of every tensor an aten operation returns that does not alias an input (views excluded), while
    active (``with AllocatedBytes() as counter:``)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for ret, value in zip(func._schema.returns, out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(value, torch.Tensor) and ret.alias_info is None:
                self.bytes += value.untyped_storage().nbytes()
        return out
