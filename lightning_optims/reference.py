"""Pages of ``docs/`` rendered from the package's own tables, so that they cannot drift from what the code does
(``tests/test_packaging.py`` checks that each committed page is what this renders):

- ``python -m lightning_optims.reference > docs/optim_args.md``: the ``optim_args`` each optimizer accepts;
- ``python -m lightning_optims.reference rules > docs/compatibility.md``: the compatibility rules.
"""

from __future__ import annotations

import sys

from lightning_optims.registry import get_spec, registered_names
from lightning_optims.rules import RULES

__all__ = ["render_optim_args_reference", "render_rules"]

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


def render_rules() -> str:
    lines = [
        "# Compatibility rules",
        "",
        "Rendered by `python -m lightning_optims.reference rules` from the table the package checks",
        "(`lightning_optims/rules.py`; a test keeps this page equal to it). When `fit` builds the optimizer, each rule",
        "is checked in this order and the first that applies stops the fit with a `MisconfigurationException` naming",
        "the setting, the optimizer and what works instead. Nothing has been trained at that point.",
        "",
        "| # | rule | refuses |",
        "|---|---|---|",
    ]
    lines += [f"| {i} | `{r.name}` | {r.refuses} |" for i, r in enumerate(RULES, 1)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_rules() if sys.argv[1:] == ["rules"] else render_optim_args_reference(), end="")
