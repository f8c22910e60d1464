"""Packaging says what is true: required dependencies are what the library imports, the license file matches the
declared license, the floors are the tested versions, and the optim_args reference is rendered from the parser's
tables."""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from lightning_optims import get_spec, registered_names
from lightning_optims.reference import render_optim_args_reference, render_rules
from lightning_optims.rules import RULES

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lightning_optims"


def _requirements(extra: str | None = None) -> list[Requirement]:
    out = []
    for line in metadata.requires("lightning_optims") or []:
        req = Requirement(line)
        marker = str(req.marker) if req.marker else ""
        if (extra is None and not marker) or (extra is not None and f'extra == "{extra}"' in marker):
            out.append(req)
    return out


def _imported_top_level_modules() -> set[str]:
    """Modules the library imports (import statements), plus those its registry names (spec targets, packages)."""
    names: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
            elif (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", "") == "import_module"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                names.add(node.args[0].value.split(".")[0])
    for name in registered_names():
        spec = get_spec(name)
        names.add(spec.target.split(":")[0].split(".")[0])
        names.update(p.split(".")[0] for p in spec.packages)
    return {n for n in names if n not in sys.stdlib_module_names and n not in ("lightning_optims", "__future__")}


def _distribution(module: str) -> str:
    dists = metadata.packages_distributions().get(module, [module])
    return Requirement(dists[0]).name.lower().replace("_", "-")


def test_required_dependencies_are_exactly_what_the_library_imports():
    required = {r.name.lower().replace("_", "-") for r in _requirements()}
    optional = {
        r.name.lower().replace("_", "-")
        for extra in ("galore", "optimi", "torchao", "bitsandbytes")
        for r in _requirements(extra)
    }
    imported = {_distribution(m) for m in _imported_top_level_modules()}
    assert required <= imported, f"required but never imported: {sorted(required - imported)}"
    missing = imported - required - optional
    assert not missing, f"imported but neither required nor in an extra: {sorted(missing)}"


def test_test_only_packages_are_not_required():
    required = {r.name for r in _requirements()}
    assert not required & {"lomo-optim", "accelerate", "torchmetrics", "pytest", "hypothesis"}


# the lowest version of each requirement the library is known to need, and why (a floor below it would install
# a version that breaks); the floors in pyproject.toml are the versions the suite ran on when they were set
KNOWN_NEEDS = {
    "transformers": (
        "5.0",
        "TrainingArguments.warmup_steps as a float ratio (4.x has warmup_ratio), used by from_training_arguments",
    ),
    "lightning": ("2.5", "the floors CI's second environment runs the suite on (.ci/floors.txt)"),
    "torch": (
        "2.6",
        "torch.distributed.fsdp.fully_shard public, torch.nn.utils.get_total_norm / clip_grads_with_norm_",
    ),
    "schedulefree": ("1.4", "RAdamScheduleFree (transformers refuses schedule_free_radam below 1.4)"),
    "typing-extensions": ("4.4", "typing_extensions.override"),
}


def test_installed_versions_meet_the_floors_and_no_floor_is_below_a_known_need():
    for req in _requirements():
        installed = Version(metadata.version(req.name))
        assert installed in req.specifier, f"{req.name} {installed} does not satisfy {req}"
        (floor,) = [Version(s.version) for s in req.specifier if s.operator == ">="]
        need, why = KNOWN_NEEDS.get(req.name, ("0", ""))
        assert floor >= Version(need), f"{req}: below {need}, needed for {why}"


def test_license_file_matches_the_declared_license():
    meta = metadata.metadata("lightning_optims")
    assert meta["License-Expression"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License") and "Version 2.0, January 2004" in text


def test_optim_args_reference_is_rendered_from_the_parser_tables():
    committed = (ROOT / "docs" / "optim_args.md").read_text()
    assert committed == render_optim_args_reference(), "run: python -m lightning_optims.reference > docs/optim_args.md"
    for name in registered_names():  # every key the parser accepts is on the page, under its optimizer
        section = committed.split(f"## `{name}`\n", 1)[1].split("\n## ", 1)[0]
        for arg in get_spec(name).arguments:
            assert re.search(rf"^\| `{arg.name}` \|", section, re.M), f"{name}: {arg.name}"


def test_compatibility_rules_page_is_rendered_from_the_rules_table():
    committed = (ROOT / "docs" / "compatibility.md").read_text()
    assert committed == render_rules(), "run: python -m lightning_optims.reference rules > docs/compatibility.md"
    for i, r in enumerate(RULES, 1):  # every rule the package checks is a row, in the order checked
        assert re.search(rf"^\| {i} \| `{r.name}` \| .{{20,}} \|$", committed, re.M), r.name


@pytest.mark.slow
def test_the_wheel_holds_py_typed(tmp_path):
    """PEP 561: without lightning_optims/py.typed in the wheel, users' type checkers ignore the annotations."""
    import shutil
    import subprocess
    import zipfile

    source = tmp_path / "source"  # (a copy: a build/ folder left in the checkout would be reused)
    shutil.copytree(
        ROOT / "lightning_optims", source / "lightning_optims", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(source)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("lightning_optims-*.whl")
    assert "lightning_optims/py.typed" in zipfile.ZipFile(wheel).namelist()
