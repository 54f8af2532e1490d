"""The package layout's own rules (docs/architecture.md); the import contracts are checked
by ``lint-imports`` in ``make lint``.

A package's ``__init__`` must not define a name that is also one of its sub-modules: the
first ``import keybrake.cli._x`` anywhere sets the attribute ``_x`` on ``keybrake.cli`` to the
module, replacing the function of that name (``keybrake audit --follow`` once called a module).
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "addon" / "keybrake"


def _defined(init: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.parse(init.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def _submodules(package: Path) -> set[str]:
    modules = {p.stem for p in package.glob("*.py") if p.stem != "__init__"}
    return modules | {p.name for p in package.iterdir() if (p / "__init__.py").is_file()}


def test_no_package_defines_a_name_of_its_own_submodule() -> None:
    inits = sorted(PACKAGE.rglob("__init__.py"))
    assert len(inits) >= 8  # the sub-packages of docs/architecture.md
    clashes = {
        str(init.relative_to(PACKAGE)): sorted(_defined(init) & _submodules(init.parent))
        for init in inits
    }
    assert {k: v for k, v in clashes.items() if v} == {}


def test_the_check_finds_a_clash(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "_follow.py").write_text("")
    (package / "__init__.py").write_text("def _follow() -> None: ...\n")
    assert _defined(package / "__init__.py") & _submodules(package) == {"_follow"}
