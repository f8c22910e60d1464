"""The optimizer registry: every ``optim`` name and its :class:`~lightning_optims.spec.OptimizerSpec`.

Each module of :mod:`lightning_optims.families` holds one family whole (its specs, its optimizer, its step on a
sharded parameter, its checks) and lists its specs in ``SPECS``; it knows nothing of the registry. The registry
collects them from :data:`FAMILIES`: adding a family is a new module there and its name in that tuple. Users may add
their own specs with :func:`register`.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_optims.compat import FEATURES
from lightning_optims.families import (
    adafactor,
    apollo,
    bitsandbytes,
    galore,
    grokadamw,
    lomo,
    muon,
    optimi,
    schedule_free,
    torch_native,
    torchao,
)
from lightning_optims.optim_args import OptimizerSettingError, closest
from lightning_optims.spec import OptimizerSpec

__all__ = [
    "FAMILIES",
    "OptimizerAvailability",
    "available_optimizers",
    "get_spec",
    "register",
    "registered_names",
]

#: the family modules whose ``SPECS`` are registered
FAMILIES = (
    torch_native,
    adafactor,
    apollo,
    galore,
    grokadamw,
    lomo,
    muon,
    optimi,
    schedule_free,
    bitsandbytes,
    torchao,
)

_REGISTRY: dict[str, OptimizerSpec] = {}
_loaded = False


def register(spec: OptimizerSpec) -> OptimizerSpec:
    """Add ``spec`` to the registry (its name must be new)."""
    _ensure_loaded()
    if spec.name in _REGISTRY:
        raise ValueError(f"optimizer {spec.name!r} is already registered")
    if spec.needs_target_modules and spec.target_group_kwargs is None:
        raise ValueError(f"low-rank optimizer {spec.name!r} needs target_group_kwargs")
    _REGISTRY[spec.name] = spec
    return spec


def _ensure_loaded() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for family in FAMILIES:
            for spec in family.SPECS:
                register(spec)


def registered_names() -> list[str]:
    _ensure_loaded()
    return sorted(_REGISTRY)


def get_spec(name: str) -> OptimizerSpec:
    """The spec registered as ``name``; an unknown name lists the closest ones."""
    _ensure_loaded()
    key = getattr(name, "value", name)  # accept transformers' OptimizerNames members
    if not isinstance(key, str) or key not in _REGISTRY:
        hint = closest(str(key), list(_REGISTRY)) if isinstance(key, str) else ""
        raise OptimizerSettingError(
            f"optim={key!r} is not a known optimizer{hint} (accepted: {', '.join(sorted(_REGISTRY))})"
        )
    return _REGISTRY[key]


@dataclass(frozen=True)
class OptimizerAvailability:
    name: str
    family: str
    usable: bool
    reason: str | None
    extra: str | None
    needs: str | None = None  # what it needs beyond the package's floors (torch 2.6, Lightning 2.5, transformers 5.0)


def available_optimizers() -> list[OptimizerAvailability]:
    """Every registered name, whether it is usable here (package installed, device present), and what it needs
    beyond the floors."""
    _ensure_loaded()
    rows = []
    for name in sorted(_REGISTRY):
        spec = _REGISTRY[name]
        reason = spec.unavailable_reason()
        needs = None
        if spec.optim_args_need is not None:
            feature = FEATURES[spec.optim_args_need]
            needs = f"optim_args: {feature.package} >= {feature.version}"
        rows.append(OptimizerAvailability(name, spec.family, reason is None, reason, spec.extra, needs))
    return rows
