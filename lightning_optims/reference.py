"""The ``optim_args`` reference (``docs/optim_args.md``), rendered from the registry's own tables.

``python -m lightning_optims.reference > docs/optim_args.md`` writes it; ``tests/test_packaging.py`` checks that the
committed page is what this renders, so the page cannot drift from what the parser accepts.
"""

from __future__ import annotations

from lightning_optims.registry import get_spec, registered_names

__all__ = ["render_optim_args_reference"]

_SETTINGS = ("adam_beta1", "adam_beta2", "adam_epsilon", "weight_decay")


def _cell(value: object) -> str:
    return "-" if value is None else f"`{value!r}`"


def render_optim_args_reference() -> str:
    lines = [
        "# `optim_args` reference",
        "",
        "Rendered by `python -m lightning_optims.reference` from the tables the parser uses (a test keeps this page",
        'equal to them). `optim_args` is a string (`"rank=1,scale=128.0"`) or a mapping; a key not listed for the',
        "optimizer is refused with the accepted ones. Defaults are transformers' (or the optimizer package's where",
        "transformers passes none).",
        "",
    ]
    for name in registered_names():
        spec = get_spec(name)
        reads = ["learning_rate", *(s for s in _SETTINGS if s in spec.uses)]
        lines += [
            f"## `{name}`",
            "",
            f"{spec.description}. Family `{spec.family}`" + (f", extra `{spec.extra}`" if spec.extra else "") + ".",
            "",
            "General settings it reads: "
            + ", ".join(f"`{r}`" for r in reads)
            + (" (and `optim_target_modules`, required)" if spec.needs_target_modules else "")
            + ".",
            "",
        ]
        if not spec.arguments:
            lines += ["No `optim_args` keys.", ""]
            continue
        lines += ["| key | type | default | accepted | notes |", "|---|---|---|---|---|"]
        for arg in spec.arguments:
            choices = ", ".join(f"`{c}`" for c in arg.choices) if arg.choices else "-"
            lines.append(
                f"| `{arg.name}` | {arg.type.__name__} | {_cell(arg.default)} | {choices} | {arg.help or '-'} |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render_optim_args_reference(), end="")
