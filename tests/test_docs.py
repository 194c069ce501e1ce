"""Checks on README.md and docs/: wording, length, and the reading-order table against the code.

The README's "Reading the code" section holds one markdown table whose rows read

    | `path` | `name`, `name`, ... | lines | what to look for |

`path` is a file from the repository root; each `name` is a top-level function or class of
it, or `Class.method`; `lines` is the length of the named definitions together, each counted
from its `def`/`class` line to its last line. A row whose second cell names nothing (`—`)
counts the whole file. Standard library only; runs in milliseconds.
"""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))

README_MAX_LINES = 250
READING_PATH_MAX_LINES = 1000
LINE_TOLERANCE = 0.10  # a stated count may be this far from the code's, either way
# Wording that only made sense to whoever wrote it, when they wrote it.
SESSION_WORDING = re.compile(r"\b(?:(?:last|this|previous|latest|earlier|next) session|session before last)\b", re.I)


def reading_rows() -> list[tuple[str, list[str], int]]:
    """(path, names, stated lines) for each row of the README's reading-order table."""
    lines = README.read_text(encoding="utf-8").splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "## Reading the code"), None)
    if start is None:
        return []
    table = []
    for line in lines[start + 1 :]:
        if line.startswith("## "):
            break
        if line.startswith("|"):
            table.append(line)
        elif table:
            break  # the first table of the section only
    rows = []
    for line in table[2:]:  # after the header and the separator
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        rows.append((cells[0].strip("`"), re.findall(r"`([^`]+)`", cells[1]), int(cells[2])))
    return rows


def definition_lines(tree: ast.Module, name: str) -> int | None:
    """Lines of the top-level function or class `name` (or `Class.method`); None if absent."""
    scope, *rest = name.split(".")
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == scope:
            if not rest:
                return node.end_lineno - node.lineno + 1
            for sub in node.body if isinstance(node, ast.ClassDef) else []:
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)) and sub.name == rest[0]:
                    return sub.end_lineno - sub.lineno + 1
    return None


ROWS = reading_rows()


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_session_wording(path):
    found = [
        f"{path.name}:{n}: {m.group(0)!r}"
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        for m in SESSION_WORDING.finditer(line)
    ]
    assert not found, "session-relative wording:\n" + "\n".join(found)


def test_readme_length():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines, more than {README_MAX_LINES}"


def test_docs_pages_exist():
    names = {p.name for p in DOCS}
    assert {"results.md", "experiments.md", "kernels.md", "distributed.md", "robustness.md"} <= names


def test_reading_table_is_there():
    assert len(ROWS) >= 5, "README.md: no reading-order table under '## Reading the code'"
    total = sum(n for _, _, n in ROWS)
    assert total <= READING_PATH_MAX_LINES, f"the reading path is {total} lines, over {READING_PATH_MAX_LINES}"


@pytest.mark.parametrize("path,names,stated", ROWS, ids=[f"{p}:{','.join(n) or 'file'}" for p, n, _ in ROWS])
def test_reading_row_matches_code(path, names, stated):
    file = ROOT / path
    assert file.is_file(), f"README reading table: {path} does not exist"
    source = file.read_text(encoding="utf-8")
    if names:
        tree = ast.parse(source)
        counts = {name: definition_lines(tree, name) for name in names}
        missing = [name for name, n in counts.items() if n is None]
        assert not missing, f"README reading table: {path} has no {', '.join(missing)}"
        actual = sum(counts.values())
    else:
        actual = len(source.splitlines())
    assert abs(stated - actual) <= LINE_TOLERANCE * actual, (
        f"README reading table: {path} {', '.join(names) or '(whole file)'} is {actual} lines, the README says {stated}"
    )
