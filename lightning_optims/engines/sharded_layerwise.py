"""The sharded layer-wise engine: a layer-wise optimizer (one upstream optimizer per parameter, stepped as soon as its
gradient exists) over FSDP2's sharded parameters, each step the family's step on this process's part
(:mod:`~lightning_optims.engines.sharded`), started an FSDP2 group at a time."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch.distributed.tensor import DTensor

from lightning_optims.distributed.placements import local, reduction_key, sharding
from lightning_optims.distributed.sums import Along, Rounds, ShardSums, Sums
from lightning_optims.engines.layerwise import StepHooks, Undo
from lightning_optims.engines.sharded import PartStep, ShardedStepOptimizer, grad_of

__all__ = ["ShardedLayerwiseOptimizer"]


class ShardedLayerwiseOptimizer(StepHooks, ShardedStepOptimizer):
    """A layer-wise optimizer (``*_layerwise``: one upstream optimizer per parameter, stepped as soon as its gradient
    exists) over FSDP2's sharded parameters (FSDP2 on one mesh dimension, HSDP, or 2-D with tensor parallelism). FSDP2
    reduce-scatters each group's gradients during backward and then runs the post-accumulate-grad hooks of its sharded
    parameters; the hooks here collect the group's parameters, and once the group's post-backward is done
    (:func:`~lightning_optims.compat.after_each_fsdp_group`) their steps start, each on this process's part (the
    family's block step, or element by element). Their sums go into one all-reduce per round (per mesh dimension), the
    first also carrying a flag of non-finite gradients, so that every process stops before the group writes anything; a
    group's later rounds share the next group's first (:class:`~lightning_optims.placements.Rounds`), the last ones
    finish after backward. A gradient is freed when its step ends: no gradient outlives its FSDP group by more than the
    rounds of its step (two or three groups' gradients at a time), where on one device none outlives its parameter.
    Without that signal (the optimizer used outside ``OptimizerMixin``) each parameter steps in its own hook. Each
    parameter is its own optimizer's only one (its position is 1, as in transformers' layer-wise construction); the
    learning rate is its group's (a scheduler drives every group alike)."""

    def __init__(
        self, param_groups: list[dict[str, Any]], optimizer_cls: type, kwargs: dict[str, Any], part_step: PartStep
    ) -> None:
        super().__init__(param_groups, optimizer_cls, kwargs, part_step)
        self._position = dict.fromkeys(self._position, 1)
        # (the index: load_state_dict replaces the group dicts)
        self._group_of = {p: index for index, group in enumerate(self.param_groups) for p in group["params"]}
        self._pending: list[torch.Tensor] = []
        self._rounds = Rounds(ShardSums())
        self.batched = (
            False  # (set where compat.after_each_fsdp_group hooks it: a group's steps wait for its post-backward)
        )
        self._grad_sq_by_key: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self._hook_handles: list[Any] = []
        self.register_hooks()

    def _hooked_params(self) -> list[torch.Tensor]:
        return list(self._group_of)

    def _start_step(self) -> None:
        super()._start_step()
        self._grad_sq_by_key = {}

    def _measure(self, grad: torch.Tensor, p: Any = None) -> torch.Tensor:
        """This process's part of ``p``'s squared gradient norm, kept per reduction key (the mesh dimensions that
        shard ``p``), so that :meth:`grad_norm` sums each over exactly its processes."""
        norm = torch.linalg.vector_norm(grad, 2.0, dtype=torch.float32)
        key = reduction_key(p)
        if key in self._grad_sq_by_key:
            total, like = self._grad_sq_by_key[key]
            self._grad_sq_by_key[key] = (total + norm.square(), like)
        else:
            self._grad_sq_by_key[key] = (norm.square(), p)
        return norm

    def grad_norm(self) -> torch.Tensor | None:
        """The global norm of the gradients of the last step: each reduction key's part summed over its processes,
        the keys added in their sorted order. Asked for after backward (every gradient measured), its sums ride in
        the next round of the steps still in flight rather than in calls of their own."""
        if not self._grad_sq_by_key:
            return None
        keys = sorted(self._grad_sq_by_key)
        parts = [Along(self._grad_sq_by_key[k][0].clone(), self._grad_sq_by_key[k][1]) for k in keys]
        summed: list[torch.Tensor] = []
        with torch.no_grad():
            self.step_pending()  # (nothing, where every FSDP2 group's steps started after its post-backward)
            self._rounds.advance([], first=parts, check=summed.extend)
        return torch.stack(summed).sum().sqrt()

    def _step_one(self, p: torch.Tensor) -> None:
        if p.grad is None:
            return
        self._measure(grad_of(p).to_local(), p)
        self._pending.append(p)
        if not self.batched:
            self.finish_steps()

    def step_pending(self) -> None:
        """Start the steps of the parameters whose gradients arrived since the last call (an FSDP2 group's), in
        one round of sums with the steps still in flight (:class:`~lightning_optims.distributed.sums.Rounds`): its
        first round carries a count of non-finite gradients summed over the processes, so every process reaches the
        same verdict on the group, on the device: the steps run with the non-finite elements as zeros and are undone
        where the count is not zero (:class:`~lightning_optims.engines.layerwise.Undo`: no host sync in backward),
        and the step's verdict raises after backward. The elementwise parameters step at once, with no collective;
        the others on their blocks, finished in later rounds (with later groups', or by :meth:`finish_steps`)."""
        batch, self._pending = self._pending, []
        if not batch:
            return
        with torch.no_grad():
            bad = torch.zeros((), dtype=torch.float32, device=local(batch[0]).device)
            for p in batch:
                bad += (~torch.isfinite(grad_of(p).to_local())).any().to(torch.float32)
                torch.nan_to_num_(grad_of(p).to_local(), nan=0.0, posinf=0.0, neginf=0.0)  # (steps compute finitely)
            # (summed over the mesh dimensions that shard the parameter whose sharding spans most of them: every
            # process of an FSDP group; a replicated dimension holds the same gradients, so the same flag)
            widest = max(batch, key=lambda p: len(sharding(p)))
            verdict: list[torch.Tensor] = []  # (the group's flag, on the device, once its first round is summed)
            steps, elementwise = [], []
            for p in batch:
                group = self.param_groups[self._group_of[p]]
                if self.on_part(p, group):
                    steps.append(self._undone(p, self._part_step.step(self, cast(DTensor, p), group), verdict))
                else:
                    elementwise.append((p, group))

            def check(sums: list[torch.Tensor]) -> None:
                verdict.append(sums[0] == 0)
                self._flag(sums[0] > 0)

            self._rounds.advance(steps, first=[Along(bad, widest)], check=check)
            for p, group in elementwise:
                kept = self._undo.before(p, self.state, p)
                self._step(cast(DTensor, p), group)
                Undo.after(kept, verdict[0])
        for p in batch:  # (a step in flight holds its gradient until it ends)
            p.grad = None

    def _undone(self, p: torch.Tensor, step: Sums, verdict: list[torch.Tensor]) -> Sums:
        """``step``, undone on the device at its end where the group's flag (``verdict[0]``, known from the first
        round, before any of the step's writes) says a gradient was non-finite."""
        kept = self._undo.before(p, self.state, p)
        yield from step
        Undo.after(kept, verdict[0])

    def after_nonfinite(self) -> None:
        """After a verdict that found a non-finite gradient: the steps in flight finished (their writes undone on the
        device), then the replaced state as it was."""
        with torch.no_grad():
            self._rounds.drain()
        super().after_nonfinite()

    def after_group(self) -> None:
        """An FSDP2 group's post-backward is done (its gradients reduced, its parameters' hooks run): start its
        parameters' steps."""
        self.step_pending()

    def finish_steps(self) -> None:
        """What is pending, then the remaining rounds of the steps in flight."""
        self.step_pending()
        with torch.no_grad():
            self._rounds.drain()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if hasattr(self, "_hook_handles"):  # (groups from __init__ go through torch's add_param_group)
            raise TypeError("a layer-wise optimizer under FSDP2 cannot take a param group added during training")
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Runs the closure (its backward steps every parameter in the hooks, by FSDP group); what is left pending
        after it, and a gradient set without backward (torch's distributed checkpoint initialising the state with
        zero gradients and lr 0), is stepped here."""
        loss = None
        self._start_step()
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.finish_steps()
        super().step()
        return loss
