"""bitsandbytes optimizers (AdamW, Lion, RMSprop, AdEMAMix; 8-bit, 32-bit, paged), as transformers builds them."""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_optims.optim_args import Arg
from lightning_optims.spec import ADAM, WEIGHT_DECAY, BuildContext, OptimizerSpec

_ADEMAMIX_ARGUMENTS = (
    Arg("beta1", float, None, help="defaults to adam_beta1"),
    Arg("beta2", float, None, help="defaults to adam_beta2"),
    Arg("beta3", float, 0.9999),
    Arg("alpha", float, 5.0),
    Arg("eps", float, None, help="defaults to adam_epsilon"),
    Arg("t_alpha", int, None),
    Arg("t_beta3", int, None),
)
# transformers passes RMSprop's optim_args through as strings; here they are typed (bitsandbytes' defaults)
_RMSPROP_ARGUMENTS = (
    Arg("alpha", float, 0.99),
    Arg("eps", float, 1e-8),
    Arg("momentum", float, 0.0),
    Arg("centered", bool, False),
)

SPECS: list[OptimizerSpec] = []


def _embeddings_in_32bit(optimizer: Any, ctx: BuildContext) -> None:
    """transformers keeps embeddings in 32-bit state when the optimizer is 8-bit."""
    import bitsandbytes

    manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
    for module in ctx.model.modules():
        if isinstance(module, nn.Embedding):
            manager.register_module_override(module, "weight", {"optim_bits": 32})


def _kwargs(kind: str, bits: int, paged: bool):
    def build(ctx: BuildContext) -> dict:
        args = ctx.args
        if kind == "adam":
            extra: dict[str, Any] = dict(ctx.adam_kwargs)
        elif kind == "lion":
            extra = {"betas": (args.adam_beta1, args.adam_beta2)}
        elif kind == "rmsprop":
            extra = dict(ctx.optim_args)
        else:  # ademamix
            o = ctx.optim_args
            extra = {
                "betas": (
                    args.adam_beta1 if o["beta1"] is None else o["beta1"],
                    args.adam_beta2 if o["beta2"] is None else o["beta2"],
                    o["beta3"],
                ),
                "alpha": o["alpha"],
                "eps": args.adam_epsilon if o["eps"] is None else o["eps"],
            }
            for key in ("t_alpha", "t_beta3"):
                if o[key] is not None:
                    extra[key] = o[key]
        extra["optim_bits"] = bits
        if kind != "rmsprop":
            extra["is_paged"] = paged
        return extra

    return build


_CLASSES = {"adam": "AdamW", "lion": "Lion", "rmsprop": "RMSprop", "ademamix": "AdEMAMix"}
_USES = {
    "adam": ADAM | WEIGHT_DECAY,
    "lion": frozenset({"adam_beta1", "adam_beta2"}) | WEIGHT_DECAY,
    "rmsprop": WEIGHT_DECAY,
    "ademamix": ADAM | WEIGHT_DECAY,
}

for _name, _kind, _bits, _paged in (
    ("adamw_bnb_8bit", "adam", 8, False),
    ("adamw_8bit", "adam", 8, False),
    ("paged_adamw_32bit", "adam", 32, True),
    ("paged_adamw_8bit", "adam", 8, True),
    ("ademamix", "ademamix", 32, False),
    ("ademamix_8bit", "ademamix", 8, False),
    ("paged_ademamix_32bit", "ademamix", 32, True),
    ("paged_ademamix_8bit", "ademamix", 8, True),
    ("lion_8bit", "lion", 8, False),
    ("lion_32bit", "lion", 32, False),
    ("paged_lion_32bit", "lion", 32, True),
    ("paged_lion_8bit", "lion", 8, True),
    ("rmsprop_bnb", "rmsprop", 32, False),
    ("rmsprop_bnb_8bit", "rmsprop", 8, False),
    ("rmsprop_bnb_32bit", "rmsprop", 32, False),
):
    SPECS.append(
        OptimizerSpec(
            name=_name,
            target=f"bitsandbytes.optim:{_CLASSES[_kind]}",
            family="bitsandbytes",
            arguments=_ADEMAMIX_ARGUMENTS if _kind == "ademamix" else _RMSPROP_ARGUMENTS if _kind == "rmsprop" else (),
            kwargs=_kwargs(_kind, _bits, _paged),
            uses=_USES[_kind],
            packages=("bitsandbytes",),
            extra="bitsandbytes",
            post_build=_embeddings_in_32bit if _bits == 8 else None,
            description=f"bitsandbytes.optim.{_CLASSES[_kind]} ({_bits}-bit{', paged' if _paged else ''})",
        )
    )
