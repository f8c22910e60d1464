"""LOMO and AdaLomo: parameters updated inside the backward pass (fused backward)."""

from __future__ import annotations

from lightning_optims.registry import OptimizerSpec, register

for _name, _cls in (("lomo", "Lomo"), ("adalomo", "AdaLomo")):
    register(OptimizerSpec(
        name=_name, target=f"lomo_optim:{_cls}", family="lomo", params="model", packages=("lomo_optim",),
        updates_in_backward=True, description=f"{_cls} (fused backward)",
    ))
