"""Every private torch and Lightning API the package touches, and what each feature needs of the installed versions.

A new release of torch or Lightning that renames one of these breaks this file alone: nothing else in the package
reads a private attribute of theirs (``tests/test_compat.py`` checks the source). Each piece names the versions it
was tested on; the floors are pyproject.toml's (torch 2.6, Lightning 2.5, transformers 5.0), the newest those CI
installs (torch 2.13 and 2.14.1, Lightning 2.6.6, transformers 5.25).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from packaging.version import Version
from torch import nn
from torch.distributed.tensor import Shard
from torch.distributed.tensor.placement_types import _StridedShard

__all__ = [
    "FEATURES",
    "BatchNorm",
    "Feature",
    "after_each_fsdp_group",
    "attached_trainer",
    "flatten_dense",
    "foreach_add_",
    "foreach_clamp_max_",
    "foreach_clamp_min_",
    "foreach_div_",
    "foreach_mul",
    "foreach_mul_",
    "foreach_norm",
    "foreach_rsqrt",
    "foreach_sub_",
    "installed_version",
    "is_shard",
    "log_when_written",
    "logged_elsewhere",
    "loggers_write_now",
    "missing",
    "saved_hparams",
    "shard_like",
    "split_indices",
    "sync_unused_parameters",
    "unflatten_dense",
    "uses_fabric",
]


# -- versions: what a feature needs -----------------------------------------------------------------------------


def installed_version(package: str) -> Version | None:
    """The installed release of ``package`` (its distribution name), or None where it is not installed."""
    try:
        return Version(importlib.metadata.version(package))
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class Feature:
    """A feature that needs more than the package's floors: ``package`` at ``version`` or later; ``path``
    (``"module:name"``) is the object it is, where it is one."""

    what: str  # the setting or object as a user meets it
    package: str
    version: str
    path: str | None = None

    def load(self) -> Any:
        """The object at :attr:`path`, or None where the installed version lacks it."""
        assert self.path is not None
        module, name = self.path.split(":")
        return getattr(importlib.import_module(module), name, None)

    def missing(self) -> str | None:
        """Why the installed versions cannot give it (names both versions), or None where they can."""
        have = installed_version(self.package)
        if have is not None and have >= Version(self.version):
            return None
        return f"{self.what} needs {self.package} >= {self.version} (installed: {self.package} {have or 'none'})"


#: every feature above the floors (docs/versions.md shows this table; tests/test_versions.py refuses each at the
#: floors). Read in the released code: GreedyLR from transformers 5.4.0; optim_args read by the Trainer for sgd /
#: adagrad / rmsprop from 5.3.0 (ignored before); WeightAveraging from Lightning 2.6.0;
#: FSDPModule.set_reduce_scatter_unused_params from torch 2.13.0 (absent from 2.6.0 to 2.12.0's releases)
FEATURES: dict[str, Feature] = {
    "greedy": Feature("lr_scheduler_type='greedy'", "transformers", "5.4.0", "transformers.optimization:GreedyLR"),
    "weight_averaging": Feature(
        "lightning.pytorch.callbacks.WeightAveraging",
        "lightning",
        "2.6.0",
        "lightning.pytorch.callbacks:WeightAveraging",
    ),
    "torch_optim_args": Feature("optim_args for sgd, adagrad and rmsprop", "transformers", "5.3.0"),
    # (2.6: FSDP2 fails on gloo; 2.7: it sums instead of averaging, HSDP fails; 2.8 to 2.12 not verified here)
    "fsdp2_on_gloo": Feature("FSDP2 on the CPU (gloo)", "torch", "2.13.0"),
    "reduce_scatter_unused_params": Feature("FSDP2's set_reduce_scatter_unused_params", "torch", "2.13.0"),
}


def missing(feature: str) -> str | None:
    """:meth:`Feature.missing` of ``FEATURES[feature]``."""
    return FEATURES[feature].missing()


# -- torch: foreach kernels and flattening (private names; tested on 2.6, 2.7 and 2.13) ----

foreach_add_ = torch._foreach_add_
foreach_clamp_max_ = torch._foreach_clamp_max_
foreach_clamp_min_ = torch._foreach_clamp_min_
foreach_div_ = torch._foreach_div_
foreach_mul = torch._foreach_mul
foreach_mul_ = torch._foreach_mul_
foreach_norm = torch._foreach_norm
foreach_rsqrt = torch._foreach_rsqrt
foreach_sub_ = torch._foreach_sub_


def flatten_dense(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One flat tensor holding ``tensors`` one after the other (for one collective instead of one each)."""
    return torch._utils._flatten_dense_tensors(tensors)


def unflatten_dense(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """:func:`flatten_dense` undone: views of ``flat`` shaped like ``like``."""
    return list(torch._utils._unflatten_dense_tensors(flat, like))


#: every batch normalization class (``nn.BatchNorm1d/2d/3d``, ``SyncBatchNorm``, the lazy ones)
BatchNorm = nn.modules.batchnorm._BatchNorm


# -- DTensor: the strided shard of FSDP2 over tensor parallelism (tested on torch 2.7 and 2.13) ---------------------


def is_shard(placement: Any, dims: Any = None) -> bool:
    """Whether ``placement`` splits a tensor dimension (``Shard(d)``, or the strided shard that FSDP2 over tensor
    parallelism on the same dimension gives), on one of ``dims`` where given."""
    return isinstance(placement, (Shard, _StridedShard)) and (dims is None or placement.dim in dims)


def shard_like(placement: Any, dim: int) -> Any:
    """A placement that splits dimension ``dim`` as ``placement`` splits its own (strided where it is strided)."""
    if isinstance(placement, _StridedShard):
        return _StridedShard(dim, split_factor=placement.split_factor)
    return Shard(dim)


def split_indices(placement: Any, indices: torch.Tensor, parts: int) -> list[torch.Tensor]:
    """``indices`` (a 1-D tensor) split into ``parts`` chunks as ``placement`` splits its dimension, without padding:
    chunk ``k`` is what the process at coordinate ``k`` holds."""
    chunks, _ = shard_like(placement, 0)._split_tensor(indices, parts, with_padding=False)
    return list(chunks)


# -- FSDP2: its param groups and their post-backward (run on torch 2.7: one group; 2.13: a list) -------------------


def _fsdp_param_groups(module: nn.Module) -> Iterator[Any]:
    from torch.distributed.fsdp import FSDPModule

    for sub in module.modules():
        if not isinstance(sub, FSDPModule):
            continue
        state = sub._get_fsdp_state()
        groups = getattr(state, "_fsdp_param_groups", None)  # torch >= 2.12: a list
        if groups is None:
            one = getattr(state, "_fsdp_param_group", None)  # torch 2.6 - 2.11: one or none
            groups = [one] if one is not None else []
        yield from groups


_AFTER = "_lightning_optims_after_post_backward"  # (on an FSDP2 param group: what runs after its post-backward)


def after_each_fsdp_group(module: nn.Module, after: Any) -> bool:
    """Call ``after.after_group()`` after each FSDP2 group's post-backward (its reduce-scatter, and under HSDP its
    all-reduce, then its parameters' post-accumulate-grad hooks); ``after=None`` clears what an earlier fit set.
    FSDP2's per-group hook is wrapped once, on the instance. Whether ``module`` has an FSDP2 group."""
    found = False
    for group in _fsdp_param_groups(module):
        found = True
        if not hasattr(group, _AFTER):
            group.post_backward = _then_after(group, group.post_backward)
        setattr(group, _AFTER, after)
    return found


def _then_after(group: Any, post_backward: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(*args: Any) -> Any:
        result = post_backward(*args)
        after = getattr(group, _AFTER, None)
        if after is not None:
            after.after_group()
        return result

    return wrapped


_UNUSED_SYNC = "_lightning_optims_unused_sync"


def sync_unused_parameters(module: nn.Module) -> None:
    """Make FSDP2's ``set_reduce_scatter_unused_params(True)`` give one process's result on the combined batch.

    With that switch (torch's counterpart of DDP's ``find_unused_parameters``) FSDP2 reduce-scatters a zero gradient
    for every parameter this process did not use, including those no process used: they then get a zero gradient
    instead of none, and an optimizer with momentum or weight decay moves them where one process would leave them
    alone. For each FSDP2 group that has the switch on, this replaces it by an exact rule, just before the group's
    reduce-scatter: one all-reduce of a flag per parameter (used on this process or not) over the group's processes;
    a parameter used on some process gets zeros where it was not used (so the reduce-scatters line up), one used
    nowhere keeps no gradient on every process (every optimizer skips it, as on one device; the in-backward ones
    never see it). A group without the switch (and every group on a torch without it) gets no collective: a
    parameter without a gradient on this process, in a group that got gradients, is named in a warning before
    FSDP2's reduce-scatter (which fails if another process used it)."""
    for group in _fsdp_param_groups(module):
        if getattr(group, _UNUSED_SYNC, False):
            continue  # (a later fit of the same module)
        if getattr(group, "reduce_scatter_unused_params", False):
            group.post_backward = _post_backward_with_used_flags(group, group.post_backward)
            group.reduce_scatter_unused_params = False  # (the zeros are ours now, only where needed)
        else:
            group.post_backward = _post_backward_naming_unused(group, group.post_backward)
        setattr(group, _UNUSED_SYNC, True)


def _used_here(group: Any) -> list[tuple[Any, bool]]:
    """The group's trainable parameters FSDP2 has gathered, each with whether it has a gradient on this process (in
    this backward, or accumulated without reducing)."""
    return [
        (fp, fp.unsharded_accumulated_grad is not None or fp.unsharded_param.grad is not None)
        for fp in group.fsdp_params
        if hasattr(fp, "_unsharded_param") and fp.unsharded_param.requires_grad
    ]


def _post_backward_naming_unused(group: Any, post_backward: Callable[..., Any]) -> Callable[..., Any]:
    named: set[str] = set()
    switch = (
        "call self.model.set_reduce_scatter_unused_params(True) in configure_model, and every optimizer of this "
        "package then gives one process's result"
        if missing("reduce_scatter_unused_params") is None
        else f"use every parameter on every process ({missing('reduce_scatter_unused_params')})"
    )

    def wrapped(*args: Any) -> Any:
        if group.reduce_grads:
            used = _used_here(group)
            if any(here for _, here in used):
                for fp, here in used:
                    name = str(getattr(fp, "_param_fqn", None) or tuple(fp.unsharded_param.shape))
                    if not here and name not in named:
                        named.add(name)
                        warnings.warn(
                            f"FSDP2: parameter {name} got no gradient on this process in this backward. If another "
                            "process used it, FSDP2's reduce-scatter fails (gloo: 'Connection reset by peer'; NCCL: "
                            f"a hang): {switch}",
                            UserWarning,
                            stacklevel=2,
                        )
        return post_backward(*args)

    return wrapped


def _post_backward_with_used_flags(group: Any, post_backward: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(*args: Any) -> Any:
        if group.reduce_grads:  # (a backward that only accumulates reduces nothing: decided at the reducing one)
            used = _used_here(group)
            if used:
                flags = torch.tensor([here for _, here in used], dtype=torch.int32, device=group.device)
                info = group.mesh_info
                for name in ("shard_process_group", "replicate_process_group"):
                    if getattr(info, name, None) is not None:
                        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=getattr(info, name))
                for (fp, here), anywhere in zip(used, flags.tolist()):
                    if anywhere and not here:
                        fp.unsharded_param.grad = torch.zeros_like(fp.unsharded_param)
        return post_backward(*args)

    return wrapped


# -- Lightning: a module's trainer, fabric and saved hyper-parameters; the logging state (tested on 2.5.0, 2.6.6) --


def loggers_write_now(trainer: Any) -> bool:
    """Whether this training step's metrics reach the loggers: the Trainer has one, and its logger connector writes
    at this step (every ``log_every_n_steps``, at the last step, always with ``fast_dev_run``). Lightning's
    ``_logger_connector.should_update_logs``, tested on Lightning 2.5.0 and 2.6.6."""
    if not trainer.loggers:
        return False
    return bool(trainer._logger_connector.should_update_logs or trainer.fast_dev_run)


def log_when_written(module: Any, name: str, value: Any) -> None:
    """``module.log(name, value)`` for a value of every optimizer step, at the steps the loggers write it
    (:func:`loggers_write_now`): what every logger receives is unchanged, and the steps between pay no ``self.log``
    (transformers' Trainer logs ``grad_norm`` at its ``logging_steps`` alike)."""
    if value is not None and loggers_write_now(module.trainer):
        module.log(name, value, on_step=True, on_epoch=False, batch_size=1)  # (batch_size: see OptimizerMixin)


def attached_trainer(module: Any) -> Any:
    """The Trainer attached to a LightningModule, or None (its ``trainer`` property raises without one)."""
    return getattr(module, "_trainer", None)


def uses_fabric(module: Any) -> bool:
    """Whether the module runs under Lightning Fabric (``fabric.setup(module)``), not a Trainer."""
    return getattr(module, "_fabric", None) is not None


def saved_hparams(module: Any) -> Any:
    """What ``save_hyperparameters()`` recorded on the module (a mapping), or None before it is called."""
    return module.__dict__.get("_hparams")


@dataclass
class _LoggingState:
    holder: Any
    results: Any
    fx: Any


def logged_elsewhere(trainer: Any, pl_module: Any) -> Callable[[], None]:
    """Point what ``self.log`` records, from ``training_step``, at a result collection of its own (discarded) instead
    of the running loop's metrics; returns the function that points it back."""
    from lightning.pytorch.trainer.connectors.logger_connector.result import _ResultCollection

    current = trainer._results
    epoch_loop = trainer.fit_loop.epoch_loop
    holders: list[Any] = [epoch_loop, epoch_loop.val_loop, trainer.validate_loop, trainer.test_loop]
    holder = next((h for h in holders if current is not None and vars(h).get("_results") is current), None)
    state = _LoggingState(holder, current, pl_module._current_fx_name)
    if holder is not None:
        holder._results = _ResultCollection(training=True)
    pl_module._current_fx_name = "training_step"

    def restore() -> None:
        if state.holder is not None:
            state.holder._results = state.results
        pl_module._current_fx_name = state.fx

    return restore
