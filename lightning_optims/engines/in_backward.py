"""The in-backward engine: each parameter updated as its gradient arrives, inside the backward pass.

One ``register_post_accumulate_grad_hook`` per parameter hands its gradient over, in buckets that are updated
together and freed, so no full set of gradients ever exists. The engine knows no family: a subclass implements
:meth:`InBackwardOptimizer._update_bucket` (and, where it has any, its state and loss scale). It provides:

- a real ``torch.optim.Optimizer``: the learning rate of ``param_groups`` (what a scheduler sets) is the one applied,
  and ``state_dict()`` carries the state;
- state on the parameter's device (CPU, CUDA, anything);
- under DDP each bucket averaged across processes in its hook, before the update; under FSDP2, HSDP and tensor
  parallelism the updates run on each process's part, their whole-tensor sums completed over the placements;
- the global gradient norm (logged) and optional two-pass clipping by it;
- a non-finite gradient never reaches the weights, and no host sync is paid for it in backward: each bucket's
  update is taken on the device with a per-parameter flag (finite gradient, summed over the processes that shard
  the parameter; used by some process under DDP; on one process, finite loss), a parameter whose flag is false is
  left as it was with its state (:meth:`InBackwardOptimizer._update_bucket` implementations honour ``ok``), and the
  step's one host sync at the end of backward (with clipping: between the two passes, before anything is written)
  raises :class:`~lightning_optims.errors.NonFiniteGradientError` naming the step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from lightning_optims.compat import (
    flatten_dense,
    foreach_clamp_max_,
    foreach_clamp_min_,
    foreach_div_,
    foreach_mul_,
    foreach_norm,
    unflatten_dense,
)
from lightning_optims.distributed.placements import local, reduction_key
from lightning_optims.distributed.sums import Along, ShardSums
from lightning_optims.errors import NonFiniteGradientError

__all__ = ["DEFAULT_BUCKET_BYTES", "InBackwardOptimizer", "trainable"]

#: gradients are handed over in buckets of about this size (like DDP's), updated together with foreach ops and
#: freed; the gradient memory of a step is bounded by it, not by the model
DEFAULT_BUCKET_BYTES = 8 * 2**20


class InBackwardOptimizer(torch.optim.Optimizer):
    """Base class: :meth:`fused_backward` runs backward and updates each parameter in its gradient hook.

    Subclasses implement :meth:`_update_bucket` (parameters, their fp32 gradients). ``step(closure)`` runs the
    closure (which is expected to call :meth:`fused_backward`, as Lightning's ``manual_backward`` does through the
    module's ``backward`` hook), so Lightning's step counters and callbacks work as for any optimizer.
    """

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        clip_grad_norm: float | None = None,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ) -> None:
        super().__init__(params, defaults)
        if bucket_bytes < 0:
            raise ValueError(f"bucket_bytes should be >= 0, got {bucket_bytes}")
        self.bucket_bytes = bucket_bytes
        self._pending: list[torch.Tensor] = []
        self._pending_bytes = 0
        self._world = 1
        self._reduce_grads = False  # DDP: average each bucket here; FSDP2 reduce-scatters before the hooks run
        self._sharded = False  # DTensor parameters (FSDP2, HSDP, tensor parallel): sums over their placements
        self._key: dict[torch.Tensor, tuple[str, ...]] = {}  # each parameter's placements.reduction_key
        self._column_key: dict[torch.Tensor, tuple[str, ...]] = {}  # a matrix's, along its columns
        if clip_grad_norm is not None and clip_grad_norm <= 0:
            raise ValueError(f"clip_grad_norm should be positive, got {clip_grad_norm}")
        self.clip_grad_norm = clip_grad_norm
        self.clip_coef: torch.Tensor | None = None
        #: the global L2 norm of the last fused backward's gradients (unscaled, before any clipping), over every
        #: process; ``None`` before the first one, and after a ``step`` whose closure ran no fused backward
        self.last_grad_norm: torch.Tensor | None = None
        self.steps_taken = 0  # fused backwards run, for error messages
        self._active = False
        self._norm_pass = False
        self._norms: list[tuple[list[torch.Tensor], torch.Tensor]] = []  # (parameters, their gradients' norms)
        self._ok = torch.ones((), dtype=torch.bool)  # every parameter of this backward updated (on the device)
        self._loss_ok = torch.ones((), dtype=torch.bool)  # the loss was finite (on the device)
        #: whether the loss of the last fused backward was finite (read at its one host sync)
        self.last_loss_finite = True
        self._handles: list[Any] = []
        self._hooked: set[torch.Tensor] = set()
        self._sync_params()

    def _sync_params(self) -> None:
        """Index the parameters of ``param_groups`` and hook every trainable one not hooked yet.

        Runs at construction, when a group is added (``BaseFinetuning`` unfreezing a backbone) and before each fused
        backward if the groups were replaced (``BaseFinetuning`` restoring its groups on resume assigns
        ``param_groups``), so every parameter in a group is updated: none is left without its hook.
        """
        # group *indices*: load_state_dict replaces the group dicts, and the lr a scheduler sets is in the new ones
        self._group_index = {p: i for i, g in enumerate(self.param_groups) for p in g["params"]}
        # (the whole tensor's size, also for an FSDP2 shard: every process then cuts its buckets at the same
        # parameters, whatever its shard's size, and the per-bucket collectives line up)
        self._nbytes = {p: p.numel() * p.element_size() for p in self._group_index}
        self._sharded = any(isinstance(p, DTensor) for p in self._group_index)
        self._key = {p: reduction_key(p) for p in self._group_index}
        self._column_key = {p: reduction_key(p, (1,)) for p in self._group_index if p.dim() > 1}
        # where the step's small tensors live (a collective backend such as NCCL takes tensors on its device only)
        self._device = next((local(p).device for p in self._group_index), torch.device("cpu"))
        for p in self._group_index:
            if p.requires_grad and p not in self._hooked:
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook))
                self._hooked.add(p)
            if p.requires_grad:
                self._init_state(p)
        self._layout = [len(g["params"]) for g in self.param_groups]
        self._plan_buckets()

    def _plan_buckets(self) -> None:
        """Fixed buckets for multi-process runs: the trainable parameters in reverse order (the order backward
        usually produces their gradients, as DDP assumes), cut every ``bucket_bytes``. Every process reduces the same
        buckets in the same order, whatever its graph: a parameter that got no gradient on a process (an unused
        branch, an expert no token was routed to) contributes zeros there, so the collectives always line up."""
        buckets: list[list[torch.Tensor]] = []
        current: list[torch.Tensor] = []
        size = 0
        for p in reversed(list(self._group_index)):
            if not p.requires_grad:
                continue
            current.append(p)
            size += self._nbytes[p]
            if size >= self.bucket_bytes:
                buckets.append(current)
                current, size = [], 0
        if current:
            buckets.append(current)
        self._buckets = buckets
        self._bucket_of = {p: k for k, bucket in enumerate(buckets) for p in bucket}
        self._arrived = [0] * len(buckets)
        self._next_bucket = 0

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_hooked"):  # (torch's __init__ adds the first groups before the hooks exist)
            self._sync_params()

    # -- hooks ----------------------------------------------------------------------------------------------------

    def remove_hooks(self) -> None:
        """Detach the gradient hooks (the module can then be trained with another optimizer, pickled, reused)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._hooked.clear()

    def _hook(self, p: torch.Tensor) -> None:
        # on the hot path: one call per parameter per backward, so only bookkeeping here
        if not self._active:  # outside fused_backward gradients accumulate as usual
            return
        if self._reduce_grads:  # fixed buckets, reduced in order as soon as each is complete
            k = self._bucket_of[p]
            self._arrived[k] += 1
            while self._next_bucket < len(self._buckets) and self._arrived[self._next_bucket] == len(
                self._buckets[self._next_bucket]
            ):
                self._reduce_bucket(self._next_bucket)
                self._next_bucket += 1
            return
        self._pending.append(p)
        self._pending_bytes += self._nbytes[p]
        if self._pending_bytes >= self.bucket_bytes:
            self._flush()

    def _start_pass(self) -> None:
        self._arrived = [0] * len(self._buckets)
        self._next_bucket = 0

    def _finish_pass(self) -> None:
        """After a backward pass: hand over what is left (multi-process: every remaining bucket, in order)."""
        if self._reduce_grads:
            while self._next_bucket < len(self._buckets):
                self._reduce_bucket(self._next_bucket)
                self._next_bucket += 1
        else:
            self._flush()

    def _flush(self) -> None:
        """One process: unscale, then either measure or apply the pending gradients."""
        if not self._pending:
            return
        params, self._pending, self._pending_bytes = self._pending, [], 0
        grads = [local(p.grad) for p in params]  # FSDP2: this process's shard of the reduced gradient
        for p in params:
            p.grad = None
        self._consume(params, grads)

    def _reduce_bucket(self, k: int) -> None:
        """Average bucket ``k`` across processes (one collective; gloo has no AVG) with a used-flag per parameter:
        a parameter no process computed a gradient for is left alone, as one process would leave it (its flag, on the
        device, masks its update); one that some processes computed gets the average with zeros from the others,
        which is one process's gradient on the combined batch."""
        params = self._buckets[k]
        present = [p.grad is not None for p in params]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        for p in params:
            p.grad = None
        flags = torch.tensor(present, dtype=grads[0].dtype, device=grads[0].device)
        flat = flatten_dense([*grads, flags])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        *grads, flags = unflatten_dense(flat, [*grads, flags])
        foreach_div_(grads, float(self._world))
        self._consume(params, grads, used=flags > 0)

    def _consume(self, params: list[torch.Tensor], grads: list[torch.Tensor], used: torch.Tensor | None = None) -> None:
        """Unscale, then either measure (norm pass) or apply the gradients of ``params``: each parameter's flag (its
        gradient finite, summed over the processes that shard it; ``used`` under DDP; the loss finite on one process)
        decides on the device whether its update is kept."""
        grads = [g if g.dtype == torch.float32 else g.to(torch.float32) for g in grads]
        scale = self._grad_scale()
        if scale != 1.0:
            foreach_div_(grads, scale)
        if self._norm_pass or self.clip_coef is None:
            # the norm pass, or (without clipping) the one pass: each gradient's norm, for the logged global norm
            norms = torch.stack(foreach_norm(grads, 2.0))
            self._norms.append((params, norms))
            if self._norm_pass:
                return
            ok = self._finite(params, norms)
            if used is not None:
                ok = ok & used
            if self._world == 1:
                ok = ok & self._loss_ok
            # (a parameter unused under DDP is skipped, not an error)
            self._ok = self._ok & (ok if used is None else ok | ~used).all()
            grads = [torch.where(ok[i], g, 0.0) for i, g in enumerate(grads)]
            flags: torch.Tensor | None = ok
        else:  # (the norm pass found every gradient finite: only DDP's unused parameters are skipped)
            flags = used
        with torch.no_grad():
            self._update_bucket(params, grads, flags)

    def _finite(self, params: list[torch.Tensor], norms: torch.Tensor) -> torch.Tensor:
        """Each parameter's gradient finite, over the whole tensor: this process's norm, or, for sharded parameters,
        the count of processes whose part is non-finite summed over those that shard it (one all-reduce per mesh
        dimension: every process then keeps or skips the same parameters)."""
        finite = torch.isfinite(norms)
        if not self._sharded:
            return finite
        parts, unpack = self._per_param(params, (~finite).to(torch.float32))
        return unpack(self._sums(parts)) == 0

    def _update_bucket(self, params: list[torch.Tensor], grads: list[torch.Tensor], ok: torch.Tensor | None) -> None:
        """Apply the fp32 ``grads`` (unscaled) to ``params``: the update method every in-backward optimizer
        implements, for a bucket at once. ``ok`` (bools on the device, one per parameter) says which to update: the
        gradient of one whose flag is false is zeros here (it was non-finite, or unused), and the parameter and its
        state must end as they were, without a host sync (``torch.where``); ``None``: every one (known on the host).
        Under FSDP2 the buckets are cut at the same parameters on every process, so a collective issued per bucket
        (``_sums``) lines up across processes."""
        raise NotImplementedError

    def _by_group(
        self, params: list[torch.Tensor], grads: list[torch.Tensor], ok: torch.Tensor | None
    ) -> list[tuple[dict[str, Any], list[torch.Tensor], list[torch.Tensor], torch.Tensor | None]]:
        """The bucket split by param group (each group has its own lr and settings), in the bucket's order, with each
        parameter's flag."""
        by_group: dict[int, tuple[list[torch.Tensor], list[torch.Tensor], list[int]]] = {}
        for i, (p, g) in enumerate(zip(params, grads)):
            ps, gs, at = by_group.setdefault(self._group_index[p], ([], [], []))
            ps.append(p)
            gs.append(g)
            at.append(i)
        return [(self.param_groups[i], ps, gs, None if ok is None else ok[at]) for i, (ps, gs, at) in by_group.items()]

    def _clip(self, grads: list[torch.Tensor], group: dict[str, Any]) -> None:
        """Each gradient clipped by value (``clip_grad_value``), then by the global norm's factor."""
        value = group["clip_grad_value"]
        if value is not None and value > 0:
            foreach_clamp_min_(grads, -value)
            foreach_clamp_max_(grads, value)
        if self.clip_coef is not None:
            foreach_mul_(grads, self.clip_coef)

    def _init_state(self, p: torch.Tensor) -> None:
        """Create ``p``'s optimizer state, if it has any, when it joins the optimizer (not at its first update): a
        checkpoint loader that shapes what it loads after the optimizer's current state (torch's distributed
        checkpoint, which Lightning uses under ModelParallelStrategy) then finds every entry."""

    def _per_param(
        self, ps: list[torch.Tensor], values: torch.Tensor
    ) -> tuple[list[Along], Callable[[list[torch.Tensor]], torch.Tensor]]:
        """Parts that sum ``values`` (one number per parameter of ``ps``, of this process's part) over the processes
        that shard each parameter, one part per placement, and the function that puts the sums back in order."""
        by_key: dict[tuple[str, ...], list[int]] = {}
        for i, p in enumerate(ps):
            by_key.setdefault(self._key[p], []).append(i)
        groups = list(by_key.values())
        parts = [Along(values[idx], ps[idx[0]]) for idx in groups]

        def unpack(summed: list[torch.Tensor]) -> torch.Tensor:
            out = values.clone()
            for idx, total in zip(groups, summed):
                out[idx] = total
            return out

        return parts, unpack

    def _sums(self, parts: list[Any]) -> list[torch.Tensor]:
        """The sums of several parts over the processes that shard them (``ShardSums``); unchanged on one process."""
        return ShardSums().sums(parts)

    # -- the step -------------------------------------------------------------------------------------------------

    def _grad_scale(self) -> float:
        """The factor the loss was multiplied by (its gradients are divided by it)."""
        return 1.0

    def _before_backward(self) -> None:
        """Per-step bookkeeping before the gradients arrive (a step count)."""

    def fused_backward(self, loss: torch.Tensor, lr: float | None = None) -> None:
        """Backward through ``loss``, updating each parameter when its gradient is ready.

        ``lr`` (optional, as upstream's ``fused_backward`` takes it) overrides every group's learning rate; otherwise
        the groups' ``lr`` (what a scheduler set) is applied. With ``clip_grad_norm`` a first backward pass computes the
        global gradient norm (two-pass clipping), which needs ``retain_graph``.
        """
        if lr is not None:
            for group in self.param_groups:
                group["lr"] = lr
        self.steps_taken += 1
        if [len(g["params"]) for g in self.param_groups] != self._layout:
            self._sync_params()
        self._world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self._reduce_grads = self._world > 1 and not self._sharded  # (DDP)
        self._before_backward()
        scale = self._grad_scale()
        scaled = loss * scale if scale != 1.0 else loss
        self.clip_coef = None
        self.last_grad_norm = None
        self._norms = []
        loss_ok = torch.isfinite(loss.detach()).all().to(self._device)
        self._loss_ok, self._ok = loss_ok, torch.ones((), dtype=torch.bool, device=self._device)
        self._active = True
        try:
            if self.clip_grad_norm is not None:
                self._norm_pass = True
                self._start_pass()
                scaled.backward(retain_graph=True)
                self._finish_pass()
                self._norm_pass = False
                total = self._total_norm()
                self._norms = []
                self.last_grad_norm = total
                norm_finite = self._verdict(loss_ok, torch.isfinite(total))  # (the step's one host sync)
                if not norm_finite or (self._world == 1 and not self.last_loss_finite):
                    self._on_non_finite_norm(total)  # (nothing was written: the updates come in the second pass)
                    return
                self.clip_coef = torch.clamp(float(self.clip_grad_norm) / (total + 1e-6), max=1.0)
            self._start_pass()
            scaled.backward()
            self._finish_pass()
        finally:
            self._active = self._norm_pass = False
            for p in self._pending:  # an exception mid-backward: drop what was not applied
                p.grad = None
            if self._reduce_grads:
                for bucket in self._buckets[self._next_bucket :]:
                    for p in bucket:
                        p.grad = None
            self._pending, self._pending_bytes = [], 0
        if self.last_grad_norm is None:  # no norm pass: the norms measured as the gradients were applied
            self.last_grad_norm = self._total_norm()
            self._norms = []
            # (each parameter's flag was summed over the processes that shard it, DDP's gradients are averaged: every
            # process reaches the same verdict, and all stop, or none: a lone error would hang the others)
            if not self._verdict(loss_ok, self._ok):  # (the step's one host sync)
                raise NonFiniteGradientError(
                    f"non-finite gradient at fused step {self.steps_taken} of {type(self).__name__}: the parameters "
                    "it reached were left unchanged (with their state) and training stops here (lower the learning "
                    "rate, check the data, or enable clipping with max_grad_norm)"
                )

    def _verdict(self, loss_ok: torch.Tensor, flag: torch.Tensor) -> bool:
        """The fused backward's one host sync: whether the loss was finite (:attr:`last_loss_finite`) and ``flag``,
        read together."""
        loss_finite, value = torch.stack([loss_ok, flag.to(loss_ok.device)]).tolist()
        self.last_loss_finite = bool(loss_finite)
        return bool(value)

    def _total_norm(self) -> torch.Tensor:
        """The global L2 norm of the gradients measured in this backward pass: with sharded parameters, each
        parameter's squared norm summed over the processes that shard it (one all-reduce per mesh dimension)."""
        if not self._norms:
            return torch.zeros((), device=self._device)
        norms = torch.cat([n for _, n in self._norms])
        if not self._sharded:
            return torch.linalg.vector_norm(norms, 2.0)
        parts, _ = self._per_param([p for ps, _ in self._norms for p in ps], norms.square())
        return torch.stack([total.sum() for total in self._sums(parts)]).sum().sqrt()

    def grad_norm(self) -> torch.Tensor | None:
        """The global gradient norm of the last fused backward (see :attr:`last_grad_norm`)."""
        return self.last_grad_norm

    def _on_non_finite_norm(self, total: torch.Tensor) -> None:
        raise NonFiniteGradientError(
            f"non-finite gradient norm ({total.item()}) at fused step {self.steps_taken} of "
            f"{type(self).__name__}: no parameter was updated and training stops here"
        )

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Run ``closure`` (forward + :meth:`fused_backward`); the updates happen inside it.

        A closure whose backward did not go through :meth:`fused_backward` (a module's ``backward`` override that
        calls ``loss.backward()`` instead of ``super().backward(loss)``) leaves gradients and updates nothing: that
        is refused here, before any later step."""
        if closure is None:
            return None
        before = self.steps_taken
        self.last_grad_norm = None
        with torch.enable_grad():
            loss = closure()
        if self.steps_taken == before and any(p.grad is not None for p in self._group_index):
            self.zero_grad()
            raise RuntimeError(
                f"{type(self).__name__}: backward ran outside fused_backward, so no parameter was updated by this "
                "step (its gradients were dropped). With OptimizerMixin the module's backward hook runs the fused "
                "backward: an override of backward must call super().backward(loss)"
            )
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        # gradients are consumed in the hooks; clear any that accumulated outside fused_backward
        super().zero_grad(set_to_none=True)


def trainable(model_or_params: nn.Module | Iterable[Any]) -> Iterable[Any]:
    """A model's trainable parameters (a frozen one is in no group; unfreezing adds it with ``add_param_group``)."""
    if isinstance(model_or_params, nn.Module):
        return [p for p in model_or_params.parameters() if p.requires_grad]
    return model_or_params
