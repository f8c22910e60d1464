"""Fixed versions of upstream optimizers: same updates, state that survives a checkpoint.

- :class:`GrokAdamW`: ``grokadamw.GrokAdamW``'s update (per-tensor clipping, per-index beta1 schedule, grokking EMA),
  with its state in ``optimizer.state`` on the parameter's device (upstream keeps it in ``param_groups`` keyed by
  Parameter objects, on the CPU, so ``state_dict()`` loses it and every step copies it to the CPU and back).
- :class:`APOLLOAdamW` and the GaLore classes: ``state_dict()`` holds the gradient projectors as plain tensors and
  numbers, so checkpoints load with ``torch.load(weights_only=True)``; ``load_state_dict`` rebuilds the projector
  objects (only the known projector classes), so a resumed run continues with the same projections.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from apollo_torch import APOLLOAdamW as _UpstreamAPOLLOAdamW

from lightning_optims.param_groups import follow_leader_lrs, split_added_group


def _import_keeping_root_logger(name: str) -> Any:
    """grokadamw runs ``logging.basicConfig(level=INFO)`` when imported, turning on INFO output for the whole
    program; import it and put the root logger back as it was."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    module = importlib.import_module(name)
    root.handlers[:] = handlers
    root.setLevel(level)
    return module


if TYPE_CHECKING:
    import grokadamw
else:
    grokadamw = _import_keeping_root_logger("grokadamw")

__all__ = ["APOLLOAdamW", "GrokAdamW", "ProjectorStateMixin", "ShardedGrokAdamW", "grokking_signal"]


def grokking_signal(train_loss: float | None, eval_loss: float | None) -> float:
    """grokadamw's default signal: the relative gap ``max(0, eval - train) / max(eval, train)``; 0 without both."""
    return grokadamw.GrokAdamW._default_grokking_signal(train_loss, eval_loss)


class GrokAdamW(grokadamw.GrokAdamW):
    """``grokadamw.GrokAdamW`` with its state where PyTorch keeps optimizer state (``self.state``, on the
    parameter's device); the arithmetic of a step is upstream's, line for line.

    ``global_index`` maps a parameter to its index among its group's parameters that have a gradient, for an
    optimizer that steps one parameter of a larger group at a time (sharded training): beta1 depends on it.
    """

    global_index: dict[Any, int]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.global_index = {}
        super().__init__(*args, **kwargs)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for p, i, group, signal in self._work():
            if group["gradient_clipping"] > 0:
                torch.nn.utils.clip_grad_norm_(p, group["gradient_clipping"])  # per tensor, in place
            self._update(p, p.grad, self._state(p), i, group, signal)
        return loss

    def _work(self) -> list[tuple[torch.Tensor, int, dict[str, Any], float | None]]:
        """Each parameter with a gradient, its index (among its group's parameters with a gradient, upstream's; or
        its index in a larger group when one parameter is stepped at a time), its group and the group's signal."""
        work = []
        for group in self.param_groups:
            signal = self._compute_grokking_signal(group)
            params = [p for p in group["params"] if p.grad is not None]
            work += [(p, self.global_index.get(p, i), group, signal) for i, p in enumerate(params)]
        return work

    def _state(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
            state["grok_ema"] = torch.zeros_like(p)
        return state

    @staticmethod
    def _update(
        p: torch.Tensor, grad: Any, state: dict[str, Any], i: int, group: dict[str, Any], signal: float | None
    ) -> None:
        """grokadamw's update of one parameter after its per-tensor clipping (``p``, ``grad`` and the state tensors:
        whole tensors, or one process's rows of them: every operation here is elementwise)."""
        beta1, beta2 = group["betas"]
        exp_avg, exp_avg_sq, grok_ema = (_part(state[k]) for k in ("exp_avg", "exp_avg_sq", "grok_ema"))
        state["step"] += 1
        layer_beta1 = beta1 * (1 - group["gamma"]) ** i
        alpha = group["alpha_init"]
        if signal is not None:
            alpha = alpha * math.exp(-group["grokking_signal_decay_rate"] * signal)
        grok_ema.mul_(alpha).add_(grad, alpha=1 - alpha)
        grok_grad = grad + group["lamb"] * grok_ema
        exp_avg.mul_(layer_beta1).add_(grok_grad, alpha=1 - layer_beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grok_grad, grok_grad, value=1 - beta2)
        bias_correction1 = 1 - beta1 ** state["step"]
        bias_correction2 = 1 - beta2 ** state["step"]
        step_size = group["lr"] * math.sqrt(bias_correction2) / bias_correction1
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.addcdiv_(exp_avg, exp_avg_sq.sqrt().add_(group["eps"]), value=-step_size)


def _part(tensor: Any) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class ShardedGrokAdamW(GrokAdamW):
    """:class:`GrokAdamW` for parameters that FSDP2 shards on dim 0 over one mesh dimension: each process steps its
    rows. The only whole-tensor term of its update, the per-tensor gradient clipping, takes every parameter's norm
    from one all-reduce per step (:class:`~lightning_optims.placements.ShardSums`); the rest is elementwise. The
    state (``DTensor`` s like the parameter) is created with the optimizer, for Lightning's distributed checkpoint."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stepping = True
        for group in self.param_groups:
            for p in group["params"]:
                self._state(p)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_stepping"):  # (a group added during training: BaseFinetuning unfreezing a backbone)
            raise TypeError("ShardedGrokAdamW cannot take a param group added during training")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [(p, _part(p.grad), i, group, signal) for p, i, group, signal in self._work()]
        # torch's clip_grad_norm_ of each tensor, its norm summed over the shards of every tensor at once
        clipped = [w for w in work if w[3]["gradient_clipping"] > 0]
        from lightning_optims.placements import Along, ShardSums

        squares = ShardSums().sums([Along(torch.linalg.vector_norm(grad, 2.0).square(), p) for p, grad, *_ in clipped])
        for (_, grad, _, group, _), square in zip(clipped, squares):
            grad.mul_(torch.clamp(group["gradient_clipping"] / (square.sqrt() + 1e-6), max=1.0))
        for p, grad, i, group, signal in work:
            self._update(_part(p), grad, self.state[p], i, group, signal)
        return loss


# projector classes a checkpoint may name (nothing else is imported from a checkpoint)
_PROJECTORS = {
    "apollo_torch.random_projector:GradientProjector",
    "apollo_torch.svd_projector:GaLoreProjector",
    "galore_torch.galore_projector:GaLoreProjector",
}
_MARK = "__projector__"


def _projector_to_state(projector: Any) -> dict[str, Any]:
    cls = type(projector)
    name = f"{cls.__module__}:{cls.__qualname__}"
    if name not in _PROJECTORS:
        raise TypeError(f"unknown projector class {name}: cannot store it in a weights-only checkpoint")
    return {_MARK: name, **{k: v for k, v in vars(projector).items()}}


def _projector_from_state(state: dict[str, Any]) -> Any:
    name = state[_MARK]
    if name not in _PROJECTORS:
        raise ValueError(f"checkpoint names projector class {name!r}, which is not one of {sorted(_PROJECTORS)}")
    module, _, qualname = name.partition(":")
    projector = object.__new__(getattr(importlib.import_module(module), qualname))
    projector.__dict__.update({k: v for k, v in state.items() if k != _MARK})
    return projector


if TYPE_CHECKING:  # mixed into an optimizer class, before it in the bases: type it as one
    _OptimizerBase = torch.optim.Optimizer
else:
    _OptimizerBase = object


class ProjectorStateMixin(_OptimizerBase):
    """``state_dict`` with projector objects as plain data; ``load_state_dict`` rebuilds them.

    A param group added during training (``BaseFinetuning``) is split as the build splits the model: target modules
    projected, the rest not (see :func:`split_added_group`), and APOLLO's random projections get their seeds.
    """

    low_rank_targets: Any = None
    _seeded_projections = False  # APOLLO seeds each random projection with the parameter's position

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        parts = split_added_group(param_group, self.low_rank_targets)
        for part in parts:
            if "follows_group" in part:
                part["follows_group"] = len(self.param_groups) + 1  # the part added right after it
            super().add_param_group(part)
        if self._seeded_projections:
            position = 0  # as APOLLOAdamW.__init__: 1-based position among all parameters, trainable ones seeded
            for group in self.param_groups:
                for p in group["params"]:
                    position += 1
                    if p.requires_grad and "seed" not in self.state[p]:
                        self.state[p]["seed"] = position

    def step(self, closure: Callable[[], float] | None = None) -> Any:
        follow_leader_lrs(self.param_groups)
        return super().step(closure)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        state = {}
        for index, entry in sd["state"].items():
            if "projector" in entry:
                entry = dict(entry)
                entry["projector"] = _projector_to_state(entry["projector"])
            state[index] = entry
        return {**sd, "state": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # rebuild the projectors first: torch's load_state_dict turns str values inside state dicts into garbage
        state = {}
        for index, entry in state_dict["state"].items():
            projector = entry.get("projector")
            if isinstance(projector, dict) and _MARK in projector:
                entry = {**entry, "projector": _projector_from_state(projector)}
            state[index] = entry
        super().load_state_dict({**state_dict, "state": state})
        for p, entry in self.state.items():
            projector = entry.get("projector")
            if projector is not None:  # its tensors follow the parameter (torch moves only the state's own tensors)
                for key, value in vars(projector).items():
                    if isinstance(value, torch.Tensor):
                        setattr(projector, key, value.to(p.device))


class APOLLOAdamW(ProjectorStateMixin, _UpstreamAPOLLOAdamW):
    """``apollo_torch.APOLLOAdamW`` whose checkpoints load with ``weights_only=True`` and resume exactly."""

    _seeded_projections = True
    random_projection_on_rows = True  # under FSDP2, a projected matrix steps on each process's rows (sharded.py)
    elementwise_without_rank = True  # a group without "rank" gets plain AdamW, element by element


def _galore(name: str) -> type:
    upstream = getattr(importlib.import_module("galore_torch"), name)
    # GaLore's AdamW steps a group without "rank" as plain AdamW, element by element; its Adafactor does not (RMS)
    return type(
        name,
        (ProjectorStateMixin, upstream),
        {
            "__module__": __name__,
            "__doc__": upstream.__doc__,
            "elementwise_without_rank": name == "GaLoreAdamW",
            # under FSDP2, a projected matrix of GaLore AdamW steps on each process's rows (sharded.py)
            "projected_adam_on_rows": name == "GaLoreAdamW",
            # and one of GaLore Adafactor, and its groups without "rank" (Adafactor), on each process's part
            "projected_adafactor_on_rows": name == "GaLoreAdafactor",
            "adafactor_without_rank": name == "GaLoreAdafactor",
            "projector_class": importlib.import_module("galore_torch.galore_projector").GaLoreProjector,
        },
    )


def __getattr__(name: str) -> Any:  # GaLore classes, built only when galore_torch is installed and asked for
    if name in ("GaLoreAdamW", "GaLoreAdamW8bit", "GaLoreAdafactor"):
        cls = _galore(name)
        globals()[name] = cls
        return cls
    raise AttributeError(name)
