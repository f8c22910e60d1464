"""The shape of the package (docs/architecture.md): the engines, the distributed layer, the mixin and the rules know no
family; the modules import each other without a cycle; no module is over 600 lines; and adding a family is what the
page says (followed here for real, with a small family)."""

from __future__ import annotations

import ast
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest
import torch

from lightning_optims import registry
from tests.helpers import launch_failure, needs

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lightning_optims"
FAMILY_FREE = ["distributed", "engines", "mixin.py", "rules.py"]
LONGEST = 600


# -- no family's name below the registry -----------------------------------------------------------------------------


def _words(text: str) -> list[str]:
    """The words of an identifier or a string (camelCase and separators split), lower case."""
    text = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", text)
    text = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1 \2", text)
    return [w.lower() for w in re.split(r"[^A-Za-z0-9]+", text) if w]


def _normal(name: str) -> str:
    return "".join(_words(name))


def family_names() -> set[str]:
    """What names a family, from the registry: every ``optim`` name, every family label and family module but the
    generic ``torch`` ones, the packages the families import, and the classes each family module exports."""
    names: set[str] = set()
    for name in registry.registered_names():
        spec = registry.get_spec(name)
        names |= {name, *spec.packages}
        if spec.family != "torch":
            names.add(spec.family)
    for module in registry.FAMILIES:
        short = module.__name__.rsplit(".", 1)[-1]
        if short != "torch_native":
            names.add(short)
        names |= {n for n in getattr(module, "__all__", ()) if n[:1].isupper() and n != "SPECS" and n.lower() != n}
    return {_normal(n) for n in names}


def _docstrings(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body:
            first = body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                lines |= set(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    return lines


def family_mentions(path: Path, names: set[str], root: Path = ROOT) -> list[str]:
    """Where the code of ``path`` (identifiers and string literals; not comments, not docstrings) names a family: a
    run of consecutive words of a token that spells one of ``names``."""
    source = path.read_text()
    docs = _docstrings(ast.parse(source))
    hits = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT or (token.type == tokenize.STRING and token.start[0] in docs):
            continue
        if token.type not in (tokenize.NAME, tokenize.STRING) and token.type != getattr(tokenize, "FSTRING_MIDDLE", -1):
            continue
        words = _words(token.string)
        spans = {"".join(words[i:j]) for i in range(len(words)) for j in range(i + 1, len(words) + 1)}
        if spans & names:
            hits.append(f"{path.relative_to(root)}:{token.start[0]}: {token.string[:60]!r} ({sorted(spans & names)})")
    return hits


def _family_free_files(package: Path) -> list[Path]:
    files = []
    for entry in FAMILY_FREE:
        path = package / entry
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


def test_no_family_name_in_the_engines_the_distributed_layer_the_mixin_or_the_rules():
    names = family_names()
    assert {"lomo", "adalomo", "apollo", "galore", "grokadamw", "schedulefree", "adafactor", "sgd"} <= names
    hits = [hit for path in _family_free_files(PACKAGE) for hit in family_mentions(path, names)]
    assert hits == []


def test_the_family_check_finds_a_family_in_code_not_in_comments(tmp_path):
    """What the check above reads: a family's name in an identifier or a string is found (also inside a word, as
    ``AdaLomo`` or ``isinstance(x, GrokAdamW)``), in a comment or a docstring it is not."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        '"""A docstring may say LOMO and APOLLO."""\n'
        "def f(x):\n"
        '    """So may this one: GaLore."""\n'
        "    y = x  # and a comment: schedule_free\n"
        '    if x.kind == "lomo":\n'
        "        return AdaLomo\n"
        "    return isinstance(x, GrokAdamW) or 'optimizer groups'\n"
    )
    hits = family_mentions(sample, family_names(), root=tmp_path)
    assert [h.split(":")[1] for h in hits] == ["5", "6", "7"], hits


# -- no import cycle --------------------------------------------------------------------------------------------------


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """Which of the package's modules each one imports, at its top or inside a function (``if TYPE_CHECKING:`` blocks
    aside: they never run); importing ``a.b.c`` also runs the package ``a.b`` (not counted where ``a.b`` holds the
    importing module: a package runs before its modules anyway). The package's root ``__init__`` (the public names,
    imported first whatever is imported) is left out."""
    modules = {_module_name(p, root): p for p in (root / "lightning_optims").rglob("*.py")}

    def parents(name: str) -> set[str]:
        parts = name.split(".")
        return {".".join(parts[:i]) for i in range(2, len(parts))}

    def imported(tree: ast.AST) -> set[str]:
        found: set[str] = set()

        def visit(node: ast.AST) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    for other in child.orelse:
                        visit(other)
                    continue
                if isinstance(child, ast.Import):
                    found.update(a.name for a in child.names if a.name in modules)
                elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                    for alias in child.names:
                        full = f"{child.module}.{alias.name}"
                        found.add(full if full in modules else child.module)
                visit(child)

        visit(tree)
        return {m for m in found if m in modules}

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = imported(ast.parse(path.read_text()))
        graph[name] = (
            {target for m in found for target in {m} | parents(m)} - {"lightning_optims", name} - parents(name)
        )
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_between_the_packages_modules():
    graph = import_graph(ROOT)
    assert "lightning_optims.engines.sharded" in graph["lightning_optims.families.apollo"]
    assert cycles(graph) == []


def _copy_package(to: Path) -> Path:
    shutil.copytree(PACKAGE, to / "lightning_optims", ignore=shutil.ignore_patterns("__pycache__"))
    return to / "lightning_optims"


def test_the_cycle_check_finds_an_import_inside_a_function(tmp_path):
    """An engine that asks the registry (inside a function: the cycle Python tolerates until it does not) is a
    cycle: registry -> families -> engines -> registry."""
    copy = _copy_package(tmp_path)
    engine = copy / "engines" / "sharded.py"
    engine.write_text(engine.read_text() + "\n\ndef _spec(name):\n    from lightning_optims import registry\n")
    found = cycles(import_graph(tmp_path))
    assert any({"lightning_optims.registry", "lightning_optims.engines.sharded"} <= set(c) for c in found), found


# -- sizes ---------------------------------------------------------------------------------------------------------


def test_no_module_over_600_lines():
    lengths = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {p: n for p, n in lengths.items() if n > LONGEST} == {}


# -- adding a family by the steps of docs/architecture.md -------------------------------------------------------------

NEW_FAMILY = '''"""Normalized SGD with momentum: each tensor's gradient divided by its norm (a test family)."""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor

from lightning_optims.distributed.placements import local
from lightning_optims.distributed.sums import Along, Sums
from lightning_optims.engines.sharded import PartStep, ShardedStepOptimizer, grad_of
from lightning_optims.optim_args import Arg
from lightning_optims.spec import WEIGHT_DECAY, OptimizerSpec, Sharding

__all__ = ["SPECS", "NormalizedSGD"]


class NormalizedSGD(torch.optim.Optimizer):
    def __init__(self, params: Any, lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    update(p, p.grad, p.grad.square().sum(), state["momentum_buffer"], group)
        return loss


def update(p: torch.Tensor, grad: torch.Tensor, square: torch.Tensor, buffer: torch.Tensor, group: dict) -> None:
    buffer.mul_(group["momentum"]).add_(grad / (square.sqrt() + 1e-8))
    p.mul_(1 - group["lr"] * group["weight_decay"]).add_(buffer, alpha=-group["lr"])


class NormalizedSGDPartStep(PartStep):
    def elementwise(self, group: dict[str, Any]) -> bool:
        return False

    def steps_on_part(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        return True

    def step(self, parts: ShardedStepOptimizer, p: DTensor, group: dict[str, Any]) -> Sums:
        grad = local(grad_of(p))
        (square,) = yield [Along(grad.square().sum(), p)]  # the whole tensor's squared norm
        state = parts.state_of(p)
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad)
        update(local(p), grad, square, state["momentum_buffer"], group)
        every = {d: d for d in range(p.dim())}
        parts.keep_state(p, state, {"momentum_buffer": every})


SPECS = [
    OptimizerSpec(
        name="normalized_sgd",
        target="lightning_optims.families.normalized_sgd:NormalizedSGD",
        family="normalized_sgd",
        arguments=(Arg("momentum", float, 0.9),),
        kwargs=lambda ctx: dict(ctx.optim_args),
        uses=WEIGHT_DECAY,
        sharding=Sharding("parts", part_step=NormalizedSGDPartStep()),
        description="normalized SGD with momentum (a test family)",
    )
]
'''

FIT = """
import json, sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import lightning_optims
from lightning_optims import OptimizerMixin
from tests.helpers import leave_process_group

out, processes = Path(sys.argv[1]), int(sys.argv[2])
assert Path(lightning_optims.__file__).parent == out / "lightning_optims", lightning_optims.__file__


class Net(OptimizerMixin, L.LightningModule):
    def __init__(self, **settings):
        super().__init__(**settings)
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
        self.x, self.y = torch.randn(4, 16, 8), torch.randn(4, 16, 4)  # 4 batches of 16

    def configure_model(self):
        if processes > 1:
            for layer in (self.body[0], self.body[2]):
                fully_shard(layer, mesh=self.device_mesh["data_parallel"])
            fully_shard(self.body, mesh=self.device_mesh["data_parallel"])

    def train_dataloader(self):
        part = 16 // processes  # (each process its rows of every batch: one process on the combined batch)
        rows = slice(self.global_rank * part, (self.global_rank + 1) * part)
        data = torch.utils.data.TensorDataset(self.x[:, rows].reshape(-1, 8), self.y[:, rows].reshape(-1, 4))
        return torch.utils.data.DataLoader(data, batch_size=part)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.body(x), y)

    def on_fit_end(self):
        state = self.body.state_dict()
        full = {k: (v.full_tensor() if isinstance(v, DTensor) else v).tolist() for k, v in state.items()}
        (out / f"weights.{processes}.rank{self.global_rank}.json").write_text(json.dumps(full))
        if self.global_rank == 0:
            (out / f"optimizer.{processes}.json").write_text(type(self.trainer.optimizers[0]).__name__)


module = Net(optim="normalized_sgd", learning_rate=0.05, weight_decay=0.01, optim_args="momentum=0.8", max_grad_norm=0)
trainer = L.Trainer(
    accelerator="cpu", devices=processes, max_epochs=1, logger=False, enable_checkpointing=False,
    enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
    strategy=ModelParallelStrategy(data_parallel_size=processes, tensor_parallel_size=1) if processes > 1 else "auto",
)
trainer.fit(module)
leave_process_group()
"""


@pytest.mark.slow
@needs("fsdp2_on_gloo")
def test_adding_a_family_by_the_steps(tmp_path):
    """docs/architecture.md's "adding a family", followed: one new file in families/ and its name in the registry's
    import and FAMILIES, nothing else. The new family is registered and listed, trains through OptimizerMixin on one
    device with its own optimizer, and under FSDP2 on two processes through the sharded engine with its PartStep
    (its norm summed over the shards, its momentum kept as a DTensor like the parameter): both processes end with
    the weights of one device (within 1e-6: the norm is summed over the processes' rows in another order)."""
    copy = _copy_package(tmp_path)
    (copy / "families" / "normalized_sgd.py").write_text(NEW_FAMILY)
    registry_file = copy / "registry.py"
    text = registry_file.read_text()
    text = text.replace("    lomo,\n", "    lomo,\n    normalized_sgd,\n", 1)  # (the import, as ruff formats it)
    text = text.replace("FAMILIES = (", "FAMILIES = (normalized_sgd, ", 1)
    registry_file.write_text(text)
    assert len(text.splitlines()) == len(PACKAGE.joinpath("registry.py").read_text().splitlines()) + 1
    script = tmp_path / "fit.py"
    script.write_text(FIT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    for processes in (1, 2):
        done = subprocess.run(
            [sys.executable, str(script), str(tmp_path), str(processes)], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, launch_failure(done.stderr)
    listed = subprocess.run(
        [sys.executable, "-c", "from lightning_optims import available_optimizers as a; print([r.name for r in a()])"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "'normalized_sgd'" in listed.stdout
    assert (tmp_path / "optimizer.1.json").read_text() == "NormalizedSGD"
    assert (tmp_path / "optimizer.2.json").read_text() == "ShardedStepOptimizer"
    single = json.loads((tmp_path / "weights.1.rank0.json").read_text())
    torch.manual_seed(0)
    initial = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).state_dict()
    for rank in (0, 1):
        sharded = json.loads((tmp_path / f"weights.2.rank{rank}.json").read_text())
        for key in single:
            torch.testing.assert_close(torch.tensor(sharded[key]), torch.tensor(single[key]), atol=1e-6, rtol=0)
            assert not torch.equal(torch.tensor(single[key]), initial[key])  # (it trained)
