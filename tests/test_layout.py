"""The layout shows the architecture: the product modules import one another without a circle,
the packages every layer uses never import upward, and tests/ holds tests only.

Imports are read from the source (ast), lazy ones inside functions included: a circle hidden
behind an import inside a function is still a circle. A script's `if __name__ == "__main__":`
block is not part of its module (importing the module never runs it), so it is left out.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "data", "kernels")  # product packages; tests/ and scripts/ are not product code
LOWER = ("common", "data")  # what every layer uses: may import only each other (common: only itself)


def product_modules() -> dict[str, Path]:
    """Module name -> file, for the top-level modules and the product packages."""
    files = [p for p in ROOT.glob("*.py")] + [p for pkg in PACKAGES for p in (ROOT / pkg).glob("*.py")]
    names = {}
    for path in files:
        parts = path.relative_to(ROOT).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def is_main_block(node) -> bool:
    return isinstance(node, ast.If) and "__name__" in ast.unparse(node.test) and "__main__" in ast.unparse(node.test)


def imported(path: Path, module: str) -> set[str]:
    """Every module name `path` imports anywhere (functions included), resolved against the product modules."""
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if is_main_block(node):
            tree.body.remove(node)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from . import x, from .pt_loss import y
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            names.add(base)
            names |= {f"{base}.{a.name}" for a in node.names}  # from data import dataset: the submodule
    return names


def graph() -> dict[str, set[str]]:
    """Product module -> the product modules it imports."""
    modules = product_modules()
    edges = {}
    for name, path in modules.items():
        found = set()
        for target in imported(path, name):
            while target and target not in modules:  # data.dataset.IGNORE -> data.dataset
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
        edges[name] = found
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path of module names, or None."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_the_graph_is_read():
    """The reader finds what is plainly there (so an empty graph cannot pass the tests below)."""
    edges = graph()
    assert {"common.files", "data.dataset"} <= edges["records"]
    assert "ptalign" in edges["commands"] and "evaluation" in edges["train"]
    assert "kernels.reference" in edges["kernels.pt_loss"]  # a relative import


def test_no_import_circle():
    assert find_cycle(graph()) is None, " -> ".join(find_cycle(graph()))


def test_lower_layers_never_import_upward():
    """common/ imports only common/; data/ only data/ and common/: never a top-level module or kernels/."""
    for name, targets in graph().items():
        if name.split(".")[0] in LOWER:
            allowed = ("common",) if name.startswith("common") else LOWER
            upward = sorted(t for t in targets if t.split(".")[0] not in allowed)
            assert not upward, f"{name} imports {upward}"


def test_tests_hold_only_tests_and_their_helpers():
    """tests/ has test_*.py, conftest.py, and helper modules that a test imports; runnable
    benchmarks and tables live in scripts/."""
    tests = ROOT / "tests"
    imported_by_tests = set()
    for path in tests.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported_by_tests |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported_by_tests.add(node.module)
    text_of_tests = "\n".join(p.read_text() for p in tests.glob("test_*.py"))
    for path in tests.glob("*.py"):
        if path.name.startswith("test_") or path.name == "conftest.py":
            continue
        used = path.stem in imported_by_tests or f"tests/{path.name}" in text_of_tests  # run as a subprocess
        assert used, f"{path.relative_to(ROOT)} is not a test nor used by one: move it to scripts/"
    assert not [p for p in tests.iterdir() if p.is_file() and p.suffix not in (".py",)], "tests/ holds only Python"


MAX_FUNCTION_LINES = 50


def test_no_function_over_50_lines():
    """Every function of the product code (methods and nested functions too) is at most 50 lines,
    counted from its `def` line to its last line, docstring included."""
    long = []
    for path in sorted(product_modules().values()):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"over {MAX_FUNCTION_LINES} lines: " + ", ".join(long)
