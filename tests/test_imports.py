"""The package's import graph: layers import downwards only, and no two files import each other
(directly or around a loop). Read from the source with ast, lazy imports inside functions
included: a lazy import hides a circle from Python, not from the reader."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "elasticserve"
# the types every layer shares, the package version, and the torch-free writer of
# docs/BENCHMARKS.md sections
SHARED = {"config", "sampling_params", "request", "outputs", "errors", "version", "docs_section"}

# what each layer may import besides itself and the shared types
ALLOWED: dict[str, set[str]] = {
    "shared": set(),
    "core": set(),
    "memory": set(),
    "kernels": set(),
    "workload": set(),
    "models": {"kernels"},
    "worker": {"kernels", "models"},
    "sim": {"core", "workload"},
    "engine": {"core", "memory", "kernels", "models", "worker"},
    "procs": {"core", "memory", "kernels", "models", "worker", "engine"},
    "server": {"core", "memory", "kernels", "models", "worker", "engine", "procs"},
    "bench": {"core", "memory", "kernels", "models", "worker", "engine", "procs", "server", "sim",
              "workload", "package"},
    "cli": {"core", "memory", "kernels", "models", "worker", "engine", "procs", "server", "sim",
            "workload", "bench", "package"},
    "package": {"engine"},  # elasticserve/__init__.py re-exports the offline API
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "package"
    if parts[1] in SHARED:
        return "shared"
    return parts[1]


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in ast.walk(node):
                if hasattr(child, "lineno"):
                    lines.add(child.lineno)
    return lines


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Package modules that `path` imports (TYPE_CHECKING-only imports excluded)."""
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_lines(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found.update(n for n in names if n in modules)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PKG.rglob("*.py")}
    return {m: imports_of(p, set(files)) - {m} for m, p in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def _package_inits(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """A package's __init__ that re-exports its own files is not a circle with them."""
    return {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}


def test_no_import_circles() -> None:
    cycle = find_cycle(_package_inits(import_graph()))
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_layers_import_downwards_only() -> None:
    wrong = []
    for module, deps in import_graph().items():
        layer = layer_of(module)
        allowed = ALLOWED[layer] | {layer, "shared"}
        wrong += [f"{module} -> {d}" for d in sorted(deps) if layer_of(d) not in allowed]
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_the_checker_sees_a_circle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_checker_reads_lazy_imports(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from elasticserve.engine import llm\n")
    assert imports_of(src, {"elasticserve.engine", "elasticserve.engine.llm"}) == {
        "elasticserve.engine", "elasticserve.engine.llm"}
