"""The package's import structure: no module imports another that imports it back (function-
level imports included), and the DeNS trainer holds no checkpoint plumbing."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "fairchem_dens"


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(REPO).with_suffix("").parts)
    return name.removesuffix(".__init__")


def imports(path: Path) -> set[str]:
    """fairchem_dens modules imported anywhere in ``path`` (``from fairchem_dens import x``
    counts as ``fairchem_dens.x`` when that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fairchem_dens"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                is_module = (REPO / (full.replace(".", "/") + ".py")).exists()
                found.add(full if is_module else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("fairchem_dens")}
    return found - {module_name(path)}


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, done = [], set()

    def visit(node: str, path: list[str]) -> None:
        for dep in sorted(graph.get(node, ())):
            if dep in path:
                found.append([*path[path.index(dep):], dep])
            elif dep not in done:
                visit(dep, [*path, dep])
        done.add(node)

    for start in sorted(graph):
        visit(start, [start])
    return found


def test_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_package_has_no_import_cycles() -> None:
    graph = import_graph()
    assert "fairchem_dens.checkpoints" in graph and "fairchem_dens.finetune" in graph
    assert "fairchem_dens.checkpoints" in graph["fairchem_dens.finetune"]
    assert cycles(graph) == []


def test_checkpoint_layout_has_one_owner() -> None:
    graph = import_graph()
    layout_users = ("finetune", "export", "pretrain")
    for name in layout_users:
        assert "fairchem_dens.checkpoints" in graph[f"fairchem_dens.{name}"], name
    assert not {f"fairchem_dens.{n}" for n in layout_users} & graph["fairchem_dens.checkpoints"]


def test_trainer_holds_the_dens_step_not_resume_plumbing() -> None:
    source = (PACKAGE / "trainer.py").read_text()
    methods = {n.name for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef)}
    assert {"_forward", "_compute_loss", "_compute_metrics", "load_loss"} <= methods
    assert not {"save", "_align_scheduler_with_step", "train"} & methods
    assert "fairchem_dens.rng" not in imports(PACKAGE / "trainer.py")
