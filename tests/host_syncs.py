"""Counting host syncs: the reads of a tensor's value on the host (``bool(t)``, ``float(t)``, ``int(t)``, ``t.item()``,
``t.tolist()``, ``t.numpy()``, ``t.cpu()``), each of which makes the host wait for the device to finish what is
queued. On the CPU nothing waits, so they are counted where they are asked for: the methods of ``torch.Tensor``
wrapped while a :class:`HostSyncs` is active, a read counted when the code that asked for it (the innermost frame
outside torch) is this package's. (``aten._local_scalar_dense`` in a ``TorchDispatchMode`` sees ``.item()`` and
``bool()`` but not ``.tolist()``, and torchao's compiled steps cannot run under such a mode.)"""

from __future__ import annotations

import os
import traceback
from typing import Any, NamedTuple

import torch
from lightning.pytorch.callbacks import Callback

import lightning_optims

PACKAGE = os.path.dirname(lightning_optims.__file__)
READS = ("__bool__", "__float__", "__int__", "__index__", "item", "tolist", "numpy", "cpu")
# torch's optimizers read their step count through optimizer._get_value; that count is a CPU tensor wherever the
# parameters are (Adam / AdamW: device="cpu" unless capturable or fused, which never call _get_value), so the read
# waits for no device: not a host sync (Muon's AdamW groups step through torch's AdamW from the package's code)
HOST_STEP = os.path.join("torch", "optim", "optimizer.py")


class Sync(NamedTuple):
    where: str  # package file and line
    read: str  # the method
    in_backward: bool  # asked for inside a backward pass (a gradient hook)


class HostSyncs:
    """While active (``with``), every host read asked for by the package's code while :attr:`counting`."""

    def __init__(self) -> None:
        self.counting = False
        self.found: list[Sync] = []
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> HostSyncs:
        for name in READS:
            self._saved[name] = original = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._wrap(name, original))
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)

    def _wrap(self, name: str, original: Any) -> Any:
        def read(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if self.counting and not torch.compiler.is_compiling():
                self._note(name)
            return original(tensor, *args, **kwargs)

        return read

    def _note(self, name: str) -> None:
        stack = traceback.extract_stack()[:-2]
        if any(frame.name == "_get_value" and frame.filename.endswith(HOST_STEP) for frame in stack):
            return
        outside = [frame for frame in stack if f"{os.sep}torch{os.sep}" not in frame.filename]
        if outside and outside[-1].filename.startswith(PACKAGE):
            caller = outside[-1]
            in_backward = any(
                frame.name == "backward" and f"{os.sep}torch{os.sep}" in frame.filename for frame in stack
            )
            where = f"{os.path.relpath(caller.filename, PACKAGE)}:{caller.lineno}"
            self.found.append(Sync(where, name, in_backward))


class SyncsPerStep(Callback):
    """The package's host syncs of each training step (each an optimizer step: no accumulation), from the second
    (the first builds state)."""

    def __init__(self, syncs: HostSyncs) -> None:
        self.syncs = syncs
        self.steps: list[list[Sync]] = []

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.syncs.found = []
        self.syncs.counting = batch_idx >= 1

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.syncs.counting:
            self.steps.append(list(self.syncs.found))
        self.syncs.counting = False


def count(name: str, max_grad_norm: float, steps: int = 5, **overrides: Any) -> list[list[Sync]]:
    """The package's host syncs in each of steps 2.. of a fit of the tiny Llama with ``optim=name``."""
    from tests.helpers import LlamaModule, lightning_trainer, loader, tiny_llama
    from tests.test_reliability import settings

    module = LlamaModule(model=tiny_llama(), **settings(name, max_grad_norm=max_grad_norm, **overrides))
    with HostSyncs() as syncs:
        per_step = SyncsPerStep(syncs)
        trainer = lightning_trainer(steps, callbacks=[per_step], enable_checkpointing=False)
        trainer.fit(module, loader(n=4 * steps))
    return per_step.steps
