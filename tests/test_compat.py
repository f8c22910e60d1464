"""One compat module: no other module of the package touches a private attribute of torch or Lightning.

A private attribute is a ``_name`` (not ``__dunder__``) that the package does not define itself, read from any object
(``torch._foreach_mul_``, ``state._fsdp_param_groups``, ``trainer._results``), or a private name or module imported
from torch or Lightning. The few private names of the upstream optimizer packages the families call, and Python's
``sys._getframe``, are listed below with their owners; anything else is an error that names the file and line.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_optims"
COMPAT = PACKAGE / "compat.py"

# private names of packages other than torch and Lightning, reached on purpose (each by one family's own code)
NOT_TORCH_OR_LIGHTNING = {
    "_getframe": "sys (warn.py: the user's frame for a warning's location)",
    "_get_options": "transformers.optimization.Adafactor (the sharded Adafactor step repeats its math)",
    "_get_lr": "transformers.optimization.Adafactor",
    "_default_grokking_signal": "grokadamw.GrokAdamW",
    "_compute_grokking_signal": "grokadamw.GrokAdamW",
    "_initialize_projector": "apollo_torch.APOLLOAdamW",
}
PRIVATE_ROOTS = ("torch", "lightning", "pytorch_lightning", "lightning_fabric")
# what shared/hooks/before-stop greps for: FSDP2's and DTensor's internals, by name, anywhere in a module's text
INTERNALS = re.compile(r"_get_fsdp_state|_fsdp_param_groups?\b|\bpost_backward\b|_StridedShard")


def own_names(trees: list[ast.AST]) -> set[str]:
    """Every name the package defines: functions, classes, variables, arguments, and attributes set on self / cls."""
    names: set[str] = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name)
                and node.value.id in ("self", "cls")
            ):
                names.add(node.attr)
    return names


def private_uses(tree: ast.AST, own: set[str]) -> list[tuple[int, str]]:
    """(line, what) for each private attribute read or private import of torch / Lightning in ``tree``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            name = node.attr
            if name.startswith("_") and not name.startswith("__") and name not in own:
                if name not in NOT_TORCH_OR_LIGHTNING:
                    found.append((node.lineno, f".{name}"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] in PRIVATE_ROOTS and (
                any(p.startswith("_") for p in parts) or any(a.name.startswith("_") for a in node.names)
            ):
                found.append((node.lineno, f"from {node.module} import {', '.join(a.name for a in node.names)}"))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] in PRIVATE_ROOTS and any(p.startswith("_") for p in parts):
                    found.append((node.lineno, f"import {alias.name}"))
    return found


def _modules() -> dict[Path, ast.AST]:
    return {path: ast.parse(path.read_text()) for path in sorted(PACKAGE.rglob("*.py"))}


def test_no_module_but_compat_touches_a_private_torch_or_lightning_attribute():
    modules = _modules()
    own = own_names(list(modules.values()))
    offences = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: {what}"
        for path, tree in modules.items()
        if path != COMPAT
        for line, what in private_uses(tree, own)
    ]
    assert not offences, "private torch / Lightning API outside lightning_optims/compat.py:\n" + "\n".join(offences)
    assert private_uses(modules[COMPAT], own), "compat.py is where they are (the scan must see them there)"


def test_no_module_but_compat_names_fsdp2_or_dtensor_internals():
    named = [
        str(path.relative_to(PACKAGE.parent))
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != COMPAT and INTERNALS.search(path.read_text())
    ]
    assert not named, f"FSDP2 / DTensor internals named outside compat.py: {named}"


@pytest.mark.parametrize(
    "source",
    [
        "import torch\nflat = torch._utils._flatten_dense_tensors(xs)",
        "def f(sub):\n    return sub._get_fsdp_state()._fsdp_param_groups",
        "from torch.distributed.tensor.placement_types import _StridedShard",
        "from lightning.pytorch.trainer.connectors.logger_connector.result import _ResultCollection",
        "import torch._dynamo",
        "def f(trainer):\n    return trainer._results",
    ],
)
def test_the_scan_finds_a_private_use(source):
    """The scan itself: each of these, put into a module of the package, would fail the test above."""
    tree = ast.parse(source)
    package_names = own_names(list(_modules().values()))
    assert private_uses(tree, package_names | own_names([tree]))


def test_the_scan_leaves_the_packages_own_private_names_alone():
    tree = ast.parse("class A:\n    def _step(self):\n        self._x = 1\n        return self._x, self._step()")
    assert private_uses(tree, own_names([tree])) == []
