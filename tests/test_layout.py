"""The package's layout: no import circles among cmdistill's modules (lazy imports inside functions included),
the science imports nothing above it, and the speed wing (cmdistill.fast) stays a wing."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "cmdistill"
SCIENCE = {"schedule", "solvers", "guidance", "sampling", "objectives", "noise", "step", "errors"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the cmdistill modules it imports anywhere in its file}, e.g. 'cmdistill.fast.views'."""
    modules = {module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if not target.startswith("cmdistill"):
                    continue
                for alias in node.names:  # "from . import fast" names a module
                    sub = f"{target}.{alias.name}"
                    deps.add(sub if sub in modules else target)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("cmdistill."))
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def test_no_import_circles():
    graph = import_graph()
    # A package's __init__ importing its own submodules is no circle.
    edges = {m: {d for d in deps if not (m.startswith(d + ".") and d in graph)} for m, deps in graph.items()}
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = 1
        for d in edges[m]:
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_science_imports_only_science():
    graph = import_graph()
    for name in SCIENCE:
        bad = {d for d in graph[f"cmdistill.{name}"] if d.split(".")[1] not in SCIENCE}
        assert not bad, (name, bad)


def test_the_speed_wing_imports_science_only():
    graph = import_graph()
    for name, deps in graph.items():
        if name.startswith("cmdistill.fast"):  # and files.py, the atomic writers (no project import of its own)
            allowed = SCIENCE | {"files"}
            bad = {d for d in deps if not d.startswith("cmdistill.fast") and d.split(".")[1] not in allowed}
            assert not bad, (name, bad)


def test_no_module_is_long_without_a_reason():
    """No module much over 400 lines: at most 420 (train.py, the Trainer's setup, checkpoints, validation and loop,
    stays under 400)."""
    long = {module_name(p): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > 420}
    assert not long, long
