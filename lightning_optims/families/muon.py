"""Muon: ``optim="muon"``, a name of this package (transformers' Trainer has none; if it adds one, this follows it).

torch's Muon (``torch.optim.Muon``, torch >= 2.9: momentum orthogonalized by a Newton-Schulz iteration) on the 2-D
weights of the modules ``optim_target_modules`` selects, torch's AdamW with the Trainer's AdamW settings on every
other parameter, in one optimizer for Lightning (:class:`MuonWithAdamW`), one learning rate and schedule for both.

- :data:`SPECS`: the name, its ``optim_args`` (torch's Muon's keys and defaults), its groups (``decay``,
  ``no_decay``: AdamW on the non-target parameters, as the Trainer splits them; ``muon``: the targets, less the input
  embedding and the output head, which stay on AdamW with a warning);
- :class:`MuonWithAdamW`: the one-device optimizer. Its Muon update is torch's, bit for bit where torch has it
  (tests/test_muon.py), so it also runs on the torch releases before 2.9;
- :class:`MuonPartStep`: its step on a process's block of a sharded matrix (FSDP2, HSDP, tensor parallel, 2-D): the
  momentum kept like the parameter's block; each matrix's Newton-Schulz iteration run once per step, by one owner
  (dealt by its cost, ``m * n * min(m, n)``), which receives the blocks in bfloat16, the dtype the iteration computes
  in, and sends each process its block of the result.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from typing import Any

import torch
from torch import nn

from lightning_optims.distributed.owners import FromOwner, ToOwner, whole_matrix_cost
from lightning_optims.distributed.placements import local
from lightning_optims.engines.sharded import PartStep, ShardedStepOptimizer, grad_of
from lightning_optims.optim_args import Arg, OptimizerSettingError
from lightning_optims.param_groups import follow_leader_lrs, split_added_group
from lightning_optims.spec import ADAM, WEIGHT_DECAY, BuildContext, OptimizerSpec, Sharding
from lightning_optims.warn import warn_user

__all__ = ["MUON_ARGUMENTS", "SPECS", "MuonPartStep", "MuonWithAdamW", "newton_schulz"]

# torch.optim.Muon's defaults (torch/optim/_muon.py: Keller Jordan's constants)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
ADJUST_LR_FNS = ("original", "match_rms_adamw")

MUON_ARGUMENTS = (
    Arg("momentum", float, 0.95),
    Arg("nesterov", bool, True),
    Arg("ns_steps", int, 5, help="Newton-Schulz iterations, 0 to 99"),
    Arg("ns_coefficients", tuple, NS_COEFFICIENTS, help="a:b:c, the quintic's three coefficients"),
    Arg("eps", float, 1e-7),
    Arg("adjust_lr_fn", str, "original", choices=ADJUST_LR_FNS),
)


def newton_schulz(
    matrix: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float
) -> torch.Tensor:
    """``torch.optim._muon._zeropower_via_newtonschulz``, the same operations in the same order (so the same bits):
    the matrix in bfloat16, transposed to be wide, divided by its Frobenius norm, then ``steps`` quintic iterations
    ``X <- a X + (b A + c A @ A) @ X`` with ``A = X @ X.T``. One difference: torch divides a bfloat16 input in place,
    which for a bfloat16 parameter without Nesterov momentum is the momentum buffer itself (its next step starts from
    the buffer divided by its norm); here the input is never written."""
    a, b, c = coefficients
    x = matrix.bfloat16()
    if x is matrix:
        x = x.clone()
    tall = matrix.size(0) > matrix.size(1)
    if tall:
        x = x.T
    x.div_(x.norm().clamp(min=eps))
    for _ in range(steps):
        gram = x @ x.T
        gram_update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, gram_update, x, beta=a)
    if tall:
        x = x.T
    return x


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: tuple[int, ...]) -> float:
    """torch's Muon learning rate for a matrix of ``shape`` ``[A, B]``: ``original`` scales ``lr`` by
    ``sqrt(max(1, A / B))``, ``match_rms_adamw`` by ``0.2 * sqrt(max(A, B))`` (the RMS of AdamW's update, so that one
    learning rate serves both groups)."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr


def momentum_update(grad: torch.Tensor, buffer: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
    """torch's Muon momentum: the buffer an exponential average of the gradients (``lerp``), the update Nesterov's
    ``grad.lerp(buffer, momentum)`` or the buffer."""
    buffer.lerp_(grad, 1 - group["momentum"])
    return grad.lerp(buffer, group["momentum"]) if group["nesterov"] else buffer


def apply_update(param: torch.Tensor, update: torch.Tensor, group: dict[str, Any], shape: tuple[int, ...]) -> None:
    """Decoupled weight decay, then the orthogonalized ``update`` at the adjusted learning rate (torch's order)."""
    lr = float(group["lr"])
    param.mul_(1 - lr * group["weight_decay"])
    param.add_(update, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], shape))


class MuonWithAdamW(torch.optim.Optimizer):
    """One optimizer: torch's Muon on the groups marked ``muon`` (2-D parameters), torch's AdamW on the others (its
    defaults the optimizer's: ``lr``, ``betas``, ``eps``, ``weight_decay``). The AdamW groups step in one
    ``torch.optim.AdamW`` sharing this optimizer's groups and state (the same kernels and numbers as AdamW built on
    them); a Muon group's options are torch's Muon's (:data:`MUON_ARGUMENTS`). A param group added during training
    (``BaseFinetuning`` unfreezing a backbone) is split as the build splits the model: its target matrices into a
    Muon group, the rest AdamW (:func:`~lightning_optims.param_groups.split_added_group`)."""

    low_rank_targets: Any = None  # (target parameters, Muon group options), set by create_optimizer

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        self._adamw = torch.optim.AdamW([torch.empty(0)], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, dict(self._adamw.defaults))
        for group in self.param_groups:
            if group.get("muon"):
                flat = [tuple(p.shape) for p in group["params"] if p.dim() != 2]
                if flat:
                    raise ValueError(f"Muon steps 2-D parameters only; its group holds parameters of shape {flat[0]}")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for part in split_added_group(param_group, self.low_rank_targets):
            if "follows_group" in part:
                part["follows_group"] = len(self.param_groups) + 1  # the part added right after it
            super().add_param_group(part)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        follow_leader_lrs(self.param_groups)
        others = [group for group in self.param_groups if not group.get("muon")]
        if others:  # (AdamW over this optimizer's own groups and state)
            self._adamw.param_groups, self._adamw.state = others, self.state
            self._adamw.step()
        for group in self.param_groups:
            if not group.get("muon"):
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                update = momentum_update(p.grad, state["momentum_buffer"], group)
                ortho = newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
                apply_update(p, ortho, group, tuple(p.shape))
        return loss


class MuonPartStep(PartStep):
    """Muon on sharded parameters: the AdamW groups step element by element (upstream AdamW on each part); a Muon
    matrix steps on this process's block: the momentum (kept like the block) and the Nesterov update on the block;
    the update's blocks, in bfloat16 (what the iteration computes in: nothing one device keeps is lost), go to the
    matrix's owner, which runs the Newton-Schulz iteration on the whole matrix and sends each process its block of
    the result (two ``all_to_all`` per step and set of mesh dimensions, whatever the number of matrices); each
    process applies the weight decay and its block of the update."""

    def elementwise(self, group: dict[str, Any]) -> bool:
        return not group.get("muon")

    def steps_on_part(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        return p.dim() == 2

    def owns(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        return bool(group.get("muon")) and p.dim() == 2

    def cost(self, shape: tuple[int, ...]) -> int:
        return whole_matrix_cost(shape)

    def step(self, parts: ShardedStepOptimizer, p: Any, group: dict[str, Any]) -> Generator[list[Any], list[Any], None]:
        state = parts.state_of(p)
        grad = local(grad_of(p))
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
        update = momentum_update(grad, state["momentum_buffer"], group)
        owner = parts.owner(p)
        (whole,) = yield [ToOwner(update.bfloat16(), p, owner)]
        ortho = None
        if whole is not None:  # (the owner)
            ortho = newton_schulz(whole, group["ns_coefficients"], group["ns_steps"], group["eps"])
            del whole
        (mine,) = yield [FromOwner(ortho, p, owner, torch.bfloat16)]
        apply_update(local(p), mine, group, tuple(p.shape))
        parts.keep_state(p, state, {"momentum_buffer": {0: 0, 1: 1}})


def _muon_group(ctx: BuildContext) -> dict[str, Any]:
    return {"muon": True, **ctx.optim_args, "name": "muon"}


def _check(options: dict[str, Any], targets: list[tuple[str, tuple[int, ...]]]) -> str | None:
    """torch's Muon refuses these when built or at its first step; here when ``fit`` starts, naming the setting (the
    number of ``ns_coefficients`` is checked when ``optim_args`` are parsed)."""
    if not 0 <= options["ns_steps"] < 100:
        return f"optim_args ns_steps={options['ns_steps']} for muon: accepted values are 0 to 99"
    if options["momentum"] < 0:
        return f"optim_args momentum={options['momentum']} for muon: accepted values are 0 or more"
    return None


def without_embeddings(model: nn.Module, names: list[str]) -> list[str]:
    """The target names less the input embedding and the output head of every transformers model in ``model``
    (``get_input_embeddings`` / ``get_output_embeddings``: a tied head is the embedding), which Muon's authors and
    torch leave to AdamW; a warning names those it leaves there. A model without these methods: the names as given."""
    kept_out = set()
    for module in model.modules():
        for getter in ("get_input_embeddings", "get_output_embeddings"):
            method = getattr(module, getter, None)
            if callable(method):
                try:
                    found = method()
                except (NotImplementedError, AttributeError):
                    found = None
                if isinstance(found, nn.Module) and isinstance(getattr(found, "weight", None), torch.Tensor):
                    kept_out.add(id(found.weight))
    named = dict(model.named_parameters(remove_duplicate=False))
    left = [n for n in names if id(named[n]) in kept_out]
    if left:
        warn_user(
            f"optim='muon': optim_target_modules selects {', '.join(repr(n) for n in left)}, the model's input "
            "embedding or output head: they stay on AdamW (Muon is for the hidden matrices)"
        )
    chosen = [n for n in names if id(named[n]) not in kept_out]
    if not chosen:
        raise OptimizerSettingError(
            "optim_target_modules selects only the model's input embedding or output head for optim='muon': name "
            "the hidden layers' linear modules (or 'all-linear')"
        )
    return chosen


SPECS = [
    OptimizerSpec(
        name="muon",
        target="lightning_optims.families.muon:MuonWithAdamW",
        family="muon",
        arguments=MUON_ARGUMENTS,
        params="decay_and_targets",
        target_group_kwargs=_muon_group,
        kwargs=lambda ctx: ctx.adam_kwargs,
        uses=ADAM | WEIGHT_DECAY,
        sharding=Sharding("parts", part_step=MuonPartStep()),
        check_targets=_check,
        refine_targets=without_embeddings,
        description="torch.optim.Muon on the target matrices, torch.optim.AdamW on the rest (this package's name)",
    )
]
