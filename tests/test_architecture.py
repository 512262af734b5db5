"""The architecture's rules, checked: layers, no cycles, SQL only in store/, CRM names only in providers/.

ARCHITECTURE.md states these rules; the test keeps them true as the code changes.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "crmsync"
#: Test doubles are allowed to be long and to name their CRM.
EMULATORS = PACKAGE / "emulators"
MAX_LINES = 700


def _sources(*exclude: Path) -> list[Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py")) if not any(p.is_relative_to(e) for e in exclude)]


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycles_not_even_inside_functions() -> None:
    # grimp reads every import statement, those inside functions included; like the import-linter contract,
    # it leaves out imports under `if TYPE_CHECKING:`, which never run.
    graph = grimp.build_graph("crmsync", exclude_type_checking_imports=True)
    assert _cycles(graph) == []


def test_the_layer_contract_holds() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


#: SQLAlchemy's select()/text() called as bare names or through the module, and any execute; a method of the
#: same name (``selector.select()``, ``metrics.text()``) or a local ``def select(`` is not SQL.
SQL = re.compile(
    r"(?<![\w.])(?<!def )(?:select|text)\(|\b(?:sa|sqlalchemy)\.(?:select|text)\("
    r"|\.execute\(|\.exec\(|\bexec_driver_sql\("
)


def test_no_sql_outside_the_store() -> None:
    offenders = [
        f"{p.relative_to(ROOT)}:{n}"
        for p in _sources(PACKAGE / "store", PACKAGE / "migrations", EMULATORS)
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if SQL.search(line)
    ]
    assert offenders == []


def test_only_provider_packages_name_a_crm() -> None:
    from crmsync.providers import provider_names

    names = "|".join(re.escape(n) for n in provider_names())
    literal = re.compile(rf"""["']({names})["']""")
    offenders = [
        f"{p.relative_to(ROOT)}:{n}"
        for p in _sources(PACKAGE / "providers", EMULATORS)
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if literal.search(line)
    ]
    assert offenders == []


@pytest.mark.parametrize("path", _sources(EMULATORS), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_small(path: Path) -> None:
    assert len(path.read_text().splitlines()) <= MAX_LINES
