"""The README front page and the pages under docs/ stay true: the example runs, links resolve, every page is
reachable from the front page, and the headline figures are those of the committed benchmark run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PAGES = sorted((ROOT / "docs").glob("*.md"))


def _links(path: Path) -> list[str]:
    text = path.read_text()
    return [target for target in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+://", target)]


@pytest.mark.parametrize("path", [ROOT / "README.md", *PAGES], ids=lambda p: p.name)
def test_relative_links_resolve(path):
    for target in _links(path):
        file = target.split("#", 1)[0]
        if file:
            assert (path.parent / file).exists(), f"{path.name}: broken link {target}"


def test_every_docs_page_is_linked_from_the_front_page_or_a_linked_page():
    reachable, todo = set(), [ROOT / "README.md"]
    while todo:
        page = todo.pop()
        for target in _links(page):
            file = (page.parent / target.split("#", 1)[0]).resolve()
            if file.suffix == ".md" and file not in reachable and file.exists():
                reachable.add(file)
                todo.append(file)
    unreachable = [p.name for p in PAGES if p.resolve() not in reachable]
    assert not unreachable, f"docs pages no link leads to: {unreachable}"


def test_front_page_is_short():
    assert len(README.splitlines()) <= 100


def test_readme_minimal_example_runs():
    code = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(code, "README.md", "exec"), namespace)
    model = namespace["model"]
    assert model.trainer.global_step == 20
    assert type(model.trainer.optimizers[0]).__name__ == "APOLLOAdamW"
    assert model.trainer.optimizers[0].param_groups[1]["rank"] == 1


def test_headline_figures_come_from_the_committed_benchmark_run():
    section = README.split("## Headline figures", 1)[1].split("\n## ", 1)[0]
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    figures = re.findall(r"\b\d+\.\d+x\b", section)
    assert len(figures) >= 6
    for figure in figures:
        assert figure in results, f"README figure {figure} is not in benchmarks/RESULTS.md"


def test_supported_versions_line_names_the_floors_of_pyproject():
    from importlib import metadata

    line = next(line for line in README.splitlines() if line.startswith("Supported versions:"))
    floors = {}
    for requirement in metadata.requires("lightning_optims") or []:
        name, _, rest = requirement.partition(">=")
        if name in ("torch", "lightning", "transformers"):
            floors[name] = rest.split(",")[0].split(";")[0].strip()
    assert len(floors) == 3, floors
    for name, floor in floors.items():
        assert f"{name.capitalize() if name == 'lightning' else name} >= {floor}" in line, (name, floor)
