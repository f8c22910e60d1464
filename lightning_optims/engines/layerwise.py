"""Layer-wise optimizers (``*_layerwise``): one inner optimizer per parameter, stepped during backward."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lightning_optims.distributed.placements import local
from lightning_optims.param_groups import split_added_group

__all__ = ["LayerwiseOptimizer", "StepHooks", "Undo", "build_layerwise"]


class Undo:
    """A step taken on the device whatever its gradient, and undone where the gradient was non-finite, without a host
    sync: what the step updates in place (the parameter's part, its state tensors) is put back on the device
    (``torch.where(ok, new, old)`` from copies taken before, one parameter at a time); what it replaces (a state
    entry, a projector's fields) is put back on the host by :meth:`on_host`, after the step's verdict found a
    non-finite gradient."""

    def __init__(self) -> None:
        self._host: list[tuple[dict[Any, Any], Any, dict[str, Any], dict[str, dict[str, Any]]]] = []

    def before(self, p: torch.Tensor, states: dict[Any, Any], key: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copies of ``p``'s part and of the tensors of ``states[key]`` (its state), and what the host restores."""
        state = states[key]
        tensors = [local(p).detach(), *(local(v) for v in state.values() if isinstance(v, torch.Tensor))]
        objects = {
            k: dict(vars(v)) for k, v in state.items() if hasattr(v, "__dict__") and not isinstance(v, torch.Tensor)
        }
        self._host.append((states, key, dict(state), objects))
        return [(t, t.clone()) for t in tensors]

    @staticmethod
    def after(kept: list[tuple[torch.Tensor, torch.Tensor]], ok: torch.Tensor) -> None:
        """Put back, on the device, what the step changed in place where ``ok`` (a bool on the device) is false."""
        for now, before in kept:
            now.copy_(torch.where(ok, now, before))

    def on_host(self) -> None:
        """After a verdict that found a non-finite gradient: the state entries and objects as they were before the
        steps of this backward (the tensors were put back on the device)."""
        for states, key, entries, objects in reversed(self._host):
            states[key] = entries
            for name, fields in objects.items():
                vars(entries[name]).clear()
                vars(entries[name]).update(fields)
        self._host = []

    def clear(self) -> None:
        self._host = []


class StepHooks:
    """A post-accumulate-grad hook on each parameter of :meth:`_hooked_params` that steps it (:meth:`_step_one`),
    and the global norm of the gradients those hooks saw in a step (:meth:`grad_norm`): each gradient is gone once
    its parameter has stepped, so the norm is summed as they pass."""

    _hook_handles: list[Any]
    _grad_sq: torch.Tensor | None = None
    _nonfinite: torch.Tensor | None = None  # some gradient of this backward was non-finite (a bool on the device)
    _loss_ok: torch.Tensor | None = None  # (one process: the loss was finite; a parameter is stepped only then)
    _undo: Undo

    def _start_step(self) -> None:
        """Before the backward of a step: the gradient norm and the non-finite flag start from nothing."""
        self._grad_sq = None
        self._nonfinite = None
        self._undo = Undo()

    def start_backward(self, loss_ok: torch.Tensor | None) -> None:
        """The loss's finite flag (on the device), on one process: a parameter is stepped only where it is true."""
        self._loss_ok = loss_ok

    def _flag(self, bad: torch.Tensor) -> None:
        self._nonfinite = bad if self._nonfinite is None else self._nonfinite | bad

    def nonfinite(self) -> torch.Tensor | None:
        """Whether a gradient of the last backward was non-finite (its parameter was not updated), a bool on the
        device: the step's verdict reads it (no host sync here)."""
        return self._nonfinite

    def after_nonfinite(self) -> None:
        """After a verdict that found a non-finite gradient: the replaced state as it was (:meth:`Undo.on_host`)."""
        self._undo.on_host()

    def _measure(self, grad: torch.Tensor) -> torch.Tensor:
        """Add ``grad`` (this process's part) to the step's squared norm; returns its norm (fp32)."""
        norm = torch.linalg.vector_norm(grad, 2.0, dtype=torch.float32)
        self._grad_sq = norm.square() if self._grad_sq is None else self._grad_sq + norm.square()
        return norm

    def grad_norm(self) -> torch.Tensor | None:
        """The global L2 norm of the gradients of the last step (before anything was applied), or ``None`` if no
        gradient arrived in it."""
        if self._grad_sq is None:
            return None
        return self._grad_sq.sqrt()

    def _hooked_params(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def _step_one(self, param: torch.Tensor) -> None:
        raise NotImplementedError

    def register_hooks(self) -> None:
        self._undo = Undo()
        for param in self._hooked_params():
            if param.requires_grad:
                self._hook_handles.append(param.register_post_accumulate_grad_hook(self._step_one))

    def remove_hooks(self) -> None:
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()


class LayerwiseOptimizer(StepHooks, torch.optim.Optimizer):
    """transformers' layer-wise scheme (an optimizer per parameter, stepped in its post-accumulate-grad hook),
    made to work under Lightning and to resume:

    - :meth:`step` runs the closure it is given (transformers' ``LayerWiseDummyOptimizer.step`` ignores it, so under
      Lightning's automatic loop ``training_step`` would never run);
    - the learning rate is this optimizer's one param group's ``lr``, so an ordinary scheduler drives it (transformers
      registers a scheduler hook per parameter instead, never removed, whose state no checkpoint holds); each inner
      optimizer gets it just before it steps;
    - ``state_dict()`` holds every inner optimizer's state; :meth:`remove_hooks` detaches the hooks.
    """

    low_rank_targets: Any = None  # (target parameters, target group options), set by create_optimizer

    def __init__(
        self,
        optimizer_dict: dict[torch.Tensor, torch.optim.Optimizer],
        lr: float,
        inner_factory: Callable[[dict[str, Any]], torch.optim.Optimizer] | None = None,
    ) -> None:
        self.optimizer_dict = optimizer_dict
        self._inner_factory = inner_factory
        self._group_of: dict[torch.Tensor, int] = {}  # params of groups added later; the rest use group 0's lr
        # group 0 holds the parameters built with (their lr is its lr); Lightning's BaseFinetuning maps every
        # parameter of the groups to a module name, so no placeholder tensor may stand here
        params = list(optimizer_dict) or [torch.zeros(1, requires_grad=True)]
        super().__init__([{"params": params, "name": "all"}], {"lr": lr})
        self._hook_handles: list[Any] = []

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """A group added during training (``BaseFinetuning``): an inner optimizer per parameter, with the group's
        options (and the target options for parameters ``optim_target_modules`` selects), stepped in its hook with
        this group's learning rate."""
        if not hasattr(self, "_hook_handles"):  # group 0, from __init__
            super().add_param_group(param_group)
            return
        if self._inner_factory is None:
            raise TypeError("this LayerwiseOptimizer was built without an inner_factory: it cannot add param groups")
        for part in split_added_group(param_group, self.low_rank_targets):
            part.pop("follows_group", None)  # each parameter has its own inner optimizer: one group per lr is enough
            named = {"name": part["name"]} if "name" in part else {}
            super().add_param_group(
                {"params": part["params"], "lr": part.get("lr", self.param_groups[0]["lr"]), **named}
            )
            index = len(self.param_groups) - 1
            options = {k: v for k, v in part.items() if k not in ("params", "lr")}
            for param in self.param_groups[index]["params"]:
                self.optimizer_dict[param] = self._inner_factory({"params": [param], **options})
                self._group_of[param] = index
                if param.requires_grad:
                    self._hook_handles.append(param.register_post_accumulate_grad_hook(self._step_one))

    def _step_one(self, param: torch.Tensor) -> None:
        """Step ``param`` in its hook, on the device whatever its gradient: a non-finite one (or a non-finite loss)
        is zeros for the step, which :class:`Undo` then undoes; the step's verdict raises after backward."""
        if param.grad is not None:
            self._measure(param.grad)
            ok = torch.isfinite(param.grad).all()  # (its elements: a finite gradient's fp32 norm may overflow)
            if self._loss_ok is not None:
                ok = ok & self._loss_ok
            self._flag(~ok)
            torch.nan_to_num_(param.grad, nan=0.0, posinf=0.0, neginf=0.0)  # (the step computes with finite numbers)
            inner = self.optimizer_dict[param]
            lr = self.param_groups[self._group_of.get(param, 0)]["lr"]
            for group in inner.param_groups:
                group["lr"] = lr
            kept = self._undo.before(param, inner.state, param)
            inner.step()
            Undo.after(kept, ok)
            inner.zero_grad(set_to_none=True)

    def _hooked_params(self) -> list[torch.Tensor]:
        return list(self.optimizer_dict)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if closure is None:
            return None
        self._start_step()
        with torch.enable_grad():
            return closure()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for inner in self.optimizer_dict.values():
            inner.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["inner"] = [inner.state_dict() for inner in self.optimizer_dict.values()]
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        inner_states = state_dict.get("inner")
        if inner_states is None or len(inner_states) != len(self.optimizer_dict):
            raise ValueError(
                f"this checkpoint holds {0 if inner_states is None else len(inner_states)} layer-wise optimizer "
                f"states, the model has {len(self.optimizer_dict)} parameters"
            )
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "inner"})
        for inner, sd in zip(self.optimizer_dict.values(), inner_states):
            inner.load_state_dict(sd)


def build_layerwise(
    optimizer_cls: type, param_groups: list[dict[str, Any]], kwargs: dict[str, Any]
) -> LayerwiseOptimizer:
    """transformers' layer-wise construction: an optimizer per parameter with its group's options."""
    optimizer_dict: dict[torch.Tensor, torch.optim.Optimizer] = {}
    for group in param_groups:
        options = {k: v for k, v in group.items() if k != "params"}
        for param in group["params"]:
            optimizer_dict[param] = optimizer_cls([{"params": [param], **options}], **kwargs)
    optimizer = LayerwiseOptimizer(
        optimizer_dict, lr=kwargs["lr"], inner_factory=lambda group: optimizer_cls([group], **kwargs)
    )
    optimizer.register_hooks()
    return optimizer
