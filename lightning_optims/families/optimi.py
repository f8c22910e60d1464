"""StableAdamW (torch-optimi): ``stable_adamw``, and its step on sharded parameters.

StableAdamW is AdamW with one whole-tensor term: the learning rate of each parameter is divided by
``max(1, RMS(grad^2 / max(exp_avg_sq, eps^2)))``. On sharded parameters (``ShardedStableAdamW``, built when first asked
for: torch-optimi is an extra) each process sums that ratio over its part; one all-reduce per step
(:class:`~lightning_optims.distributed.sums.ShardSums`, every parameter's sum at once) completes the RMS; the rest is
elementwise, as upstream computes it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lightning_optims.distributed.placements import local
from lightning_optims.distributed.sums import Along, ShardSums
from lightning_optims.optim_args import Arg
from lightning_optims.spec import ADAM, WEIGHT_DECAY, BuildContext, OptimizerSpec, Sharding

__all__ = ["SPECS"]


def _stable_adamw(ctx: BuildContext) -> dict:
    # transformers: weight_decay at optimizer level (the decay groups override it), then the three optim_args
    return {**ctx.adam_kwargs, "weight_decay": ctx.args.weight_decay, **ctx.optim_args}


def _no_triton_off_the_gpu(optimizer: Any, ctx: BuildContext | None) -> None:
    """optimi (0.3.0 to 0.3.3) decides a group's ``triton=None`` at its first step from the list of its parameters it
    has not filled yet: ``all()`` of nothing is true, so it picks its Triton kernels whenever triton is importable,
    also for CPU tensors, and on a machine with triton but no GPU (a CUDA build of torch) every step fails ("0 active
    drivers"). Before a group's first step, a group with a parameter off the GPU gets ``triton=False`` (optimi's own
    rule: Triton only where every parameter is on a CUDA / XPU device); on a GPU optimi decides as before."""

    def before(opt: Any, args: Any, kwargs: Any) -> None:
        for group in opt.param_groups:
            if group.get("setup") or group.get("triton") is not None or group.get("foreach") is not None:
                continue
            if any(not (p.is_cuda or getattr(p, "is_xpu", False)) for p in group["params"]):
                group["triton"] = False

    optimizer.register_step_pre_hook(before)


SPECS = [
    OptimizerSpec(
        name="stable_adamw",
        target="optimi:StableAdamW",
        family="optimi",
        # transformers casts kahan_sum / decouple_lr with bool(), so "False" meant True there; here it means False
        arguments=(Arg("decouple_lr", bool, False), Arg("max_lr", float, None), Arg("kahan_sum", bool, None)),
        kwargs=_stable_adamw,
        uses=ADAM | WEIGHT_DECAY,
        packages=("optimi",),
        extra="optimi",
        sharding=Sharding("optimizer", optimizer="lightning_optims.families.optimi:ShardedStableAdamW"),
        post_build=_no_triton_off_the_gpu,
        description="optimi.StableAdamW",
    )
]


def _sharded_stable_adamw() -> type:
    from optimi import StableAdamW
    from optimi.utils import debias_beta

    class ShardedStableAdamW(StableAdamW):
        """``optimi.StableAdamW`` (same arguments, same state keys) for parameters that FSDP2 shards on dim 0 over one
        mesh dimension; its state (``exp_avg``, ``exp_avg_sq``: ``DTensor`` s like the parameter) is created with the
        optimizer, so Lightning's distributed checkpoint saves and restores it on any number of processes. The
        per-parameter path of optimi (no foreach, no triton) on each process's rows."""

        def __init__(self, params: Any, **kwargs: Any) -> None:
            super().__init__(params, **{**kwargs, "foreach": False, "triton": False})
            self._set_up_done = True
            for group in self.param_groups:
                self._set_up(group)

        def add_param_group(self, param_group: dict[str, Any]) -> None:
            super().add_param_group(param_group)
            if hasattr(self, "_set_up_done"):  # (a group added during training: BaseFinetuning unfreezing a backbone)
                self._set_up(self.param_groups[-1])

        def _set_up(self, group: dict[str, Any]) -> None:
            if not group["setup"]:  # (what optimi's _init_group does at the first step)
                group["setup"] = True
                group["step"] = torch.tensor(0, dtype=torch.int32)
                self.__dict__.setdefault("_host_steps", {})[id(group)] = 0
            for p in group["params"]:
                self._init_state(group, self.state[p], p)
                if self.state[p].get("kahan_comp") is not None:
                    raise ValueError("ShardedStableAdamW steps fp32 parameters (no Kahan summation)")

        @torch.no_grad()
        def step(self, closure: Callable | None = None, param: torch.Tensor | None = None) -> Any:
            if param is not None:
                raise ValueError("ShardedStableAdamW does not step single parameters (gradient release)")
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            items = []
            for group in self.param_groups:
                self._set_up(group)
                params = [p for p in group["params"] if p.grad is not None]
                if not params:
                    continue
                group["step"].add_(1)
                step = self._host_step(group)  # (its count on the host too: no host sync)
                beta1_comp = 1 - debias_beta(group["beta1"], step)
                beta2_hat = debias_beta(group["beta2"], step)
                for p in params:
                    state = self.state[p]
                    grad, exp_avg, exp_avg_sq = local(p.grad), local(state["exp_avg"]), local(state["exp_avg_sq"])
                    exp_avg.lerp_(grad, weight=beta1_comp)
                    exp_avg_sq.mul_(beta2_hat).addcmul_(grad, grad, value=1 - beta2_hat)
                    items.append((p, group, grad, exp_avg, exp_avg_sq, state["eps_sq"]))
            # the one sum of the step: each parameter's grad^2 / max(exp_avg_sq, eps^2), over its whole tensor
            ratios = ShardSums().sums(
                [Along(g.pow(2).div_(v.maximum(eps_sq)).sum(), p) for p, _, g, _, v, eps_sq in items]
            )
            for (p, group, _grad, exp_avg, exp_avg_sq, _), ratio in zip(items, ratios):
                rms = (ratio / p.numel()).sqrt()
                # optimi's lr / max(1, rms) on the device, in float64 as Python computes it: no host sync, the same
                # numbers (each factor rounds to fp32 where it meets the fp32 tensors, as a Python float does)
                lr = group["lr"] / torch.clamp(rms.double(), min=1.0)
                weights = local(p)
                if group["weight_decay"] != 0:
                    if group["decouple_lr"]:
                        weights.mul_(1 - (lr / group["max_lr"]) * group["weight_decay"])
                    else:
                        weights.mul_(1 - lr * group["weight_decay"])
                weights.addcdiv_(exp_avg * -lr, exp_avg_sq.sqrt().add_(group["eps"]))  # (= value=-lr, rounded alike)
            return loss

        def _host_step(self, group: dict[str, Any]) -> int:
            steps = self.__dict__.setdefault("_host_steps", {})
            key = id(group)
            steps[key] = steps[key] + 1 if key in steps else int(group["step"])  # (else read once)
            return steps[key]

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            super().load_state_dict(state_dict)
            self._host_steps = {id(group): int(group["step"]) for group in self.param_groups}  # (read at load)

    ShardedStableAdamW.__module__, ShardedStableAdamW.__qualname__ = __name__, "ShardedStableAdamW"
    return ShardedStableAdamW


def __getattr__(name: str) -> Any:  # the sharded optimizer, built when first asked for (optimi is an extra)
    if name == "ShardedStableAdamW":
        cls = _sharded_stable_adamw()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
